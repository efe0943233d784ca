"""What a task declares — its contexts, data sources, prompt segments, target and metric — and the registry that
finds tasks by name.

A task is a small class (``tasks/caption.py`` is one screen): class attributes name its contexts and sources, and
four methods say how one example reads (:meth:`Task.prompt_segments`, :meth:`Task.target_text`,
:meth:`Task.example_id`) and how predictions score (:meth:`Task.score`). Packing, truncation and generation
prompts are shared (:mod:`mtcpeft.data.packing`), and so is reading (:mod:`mtcpeft.data.sources`).

Registering a task of your own package (the library never imports the top-level ``tasks`` package: the launch
scripts import it, and they hand task objects to the library):

* decorate the class with :func:`register_task` and import its module before the task is named — the launch
  scripts take ``--task-module mypkg.mytask`` (repeatable) for that; or
* declare an entry point in the group ``mtcpeft.tasks`` of your package, named after the task, pointing at its
  module or its class (``[project.entry-points."mtcpeft.tasks"] mytask = "mypkg.mytask:MyTask"``): it is loaded
  the first time the name is looked up, by any script or process, with no flag.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from typing import ClassVar, Iterable

from mtcpeft.config import ConfigError
from mtcpeft.core.contexts import ContextVocab
from mtcpeft.errors import MtcpeftError
from mtcpeft.registry import Registry, UnknownNameError

from .packing import EmptyTargetError, Segment, SequenceLayout, pack_example, pack_prompt
from .sources import Reader

TASKS: Registry[type["Task"]] = Registry("task")
ENTRY_POINT_GROUP = "mtcpeft.tasks"
HOW_TO_REGISTER = (f"a task of your own package registers with @mtcpeft.data.task.register_task: pass its module "
                   f"as --task-module MODULE, or declare it as an entry point of the group {ENTRY_POINT_GROUP!r}")
# the shipped configs of a source checkout; `<task>_offline.yaml` there is each task's offline default
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class TaskModuleError(MtcpeftError, ImportError):
    """A task module named on the command line or by an entry point cannot be imported."""


class Task:
    """Base of tasks. Subclasses set the class attributes and implement :meth:`prompt_segments`,
    :meth:`target_text`, :meth:`example_id` and :meth:`score`."""

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]]
    generated_context: ClassVar[str]  # context of target / generated tokens
    bos_context: ClassVar[str]  # context of the leading [BOS]
    uses_images: ClassVar[bool] = False
    sources: ClassVar[dict[str, Reader]]  # data.source -> reader (mtcpeft.data.sources); the first: offline default
    metric: ClassVar[str]  # the headline generation metric (a key of :meth:`score`)
    inputs: ClassVar[tuple[str, ...]] = ()  # example fields a prompt reads (launch/generate.py asks for these)

    @property
    def vocab(self) -> ContextVocab:
        return ContextVocab(self.contexts)

    # ------------------------------------------------------------------------------------- declared per task
    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:  # pragma: no cover
        """The segments after [BOS] and before the target (image tokens, question ...)."""
        raise NotImplementedError

    def target_text(self, example: dict) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def example_id(self, example: dict):  # pragma: no cover - interface
        """The key one prediction is made for (captioning: the image; QA/VQA: the question)."""
        raise NotImplementedError

    def score(self, predictions: dict, examples: list[dict]) -> dict:  # pragma: no cover - interface
        """Generation metrics of ``predictions`` {example_id: text} against the examples' references."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- shared
    def read(self, split: str, data) -> tuple[list[dict], str]:
        """(the examples of ``split`` of the data ``data.source`` names, what the reader dropped in one line)."""
        reader = self.sources.get(data.source)
        if reader is None:
            raise ConfigError(f"task {self.name!r} reads data.source {' | '.join(self.sources)}, not "
                              f"{data.source!r}; set data.source=... (configs/{self.name}_offline.yaml is a start)")
        return reader(split, data)

    def examples(self, split: str, data) -> list[dict]:
        """The examples of ``split`` (see :meth:`read`)."""
        return self.read(split, data)[0]

    def layout(self, data, encoder=None) -> SequenceLayout:
        """The layout of this task's examples under a data config, on a model whose vision ``encoder`` (None: a
        text-only model) gives ``encoder.num_tokens`` image tokens; a task that reads no images gets none."""
        return SequenceLayout.of(data, encoder.num_tokens if self.uses_images and encoder is not None else 0)

    def image_segment(self, layout: SequenceLayout) -> Segment:
        return Segment(self.vocab.id("image"), [0] * layout.num_image_tokens, image=True)

    def encode(self, example: dict, tokenizer, layout: SequenceLayout) -> dict:
        """One training example -> lists of length seq_len: input_ids, context_ids, labels, attention_mask,
        image_mask; plus ``truncated`` (bool). Raises :class:`EmptyTargetError` on an empty target and
        :class:`~mtcpeft.data.packing.PromptTooLongError` on a prompt that does not fit."""
        target = self.target_text(example) or ""  # a leading space is kept: it is part of the first word's token
        if not target.strip():
            raise EmptyTargetError(f"empty {self.name} target for example {self.example_id(example)}")
        return pack_example(self.prompt_segments(example, tokenizer, layout), target,
                            self.vocab.id(self.generated_context), self.vocab.id(self.bos_context), tokenizer, layout,
                            self.name)

    def prompt(self, example: dict, tokenizer, layout: SequenceLayout) -> dict:
        """The generation prompt of one example (unpadded lists): [BOS] + prompt segments."""
        return pack_prompt(self.prompt_segments(example, tokenizer, layout), self.vocab.id(self.bos_context),
                           tokenizer, layout, self.name)


# ------------------------------------------------------------------------------------------------ registry
def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register ``cls`` under ``cls.name`` (a name registered twice is refused)."""
    return TASKS.register(cls.name)(cls)


def import_task_modules(modules: Iterable[str]) -> None:
    """Import each module (``mypkg.mytask``) so the tasks it registers can be named; a module that cannot be
    imported stops with its name and the reason."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TaskModuleError(f"cannot import task module {module!r}: {e}; check the name and that its "
                                  "package is installed (or on PYTHONPATH)") from None


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(name: str) -> None:
    """Register the task an installed package declares under ``name`` in the ``mtcpeft.tasks`` group, if any."""
    ep = _entry_points().get(name)
    if ep is None:
        return
    try:
        obj = ep.load()  # importing the module registers its decorated tasks
    except ImportError as e:
        raise TaskModuleError(f"the entry point {ENTRY_POINT_GROUP}:{name} = {ep.value!r} cannot be imported: {e}"
                              ) from None
    if isinstance(obj, type) and issubclass(obj, Task) and obj.name not in TASKS:
        register_task(obj)
    if name not in TASKS:
        raise TaskModuleError(f"the entry point {ENTRY_POINT_GROUP}:{name} = {ep.value!r} registers no task "
                              f"{name!r}; point it at a Task subclass named {name!r} or at the module that "
                              "registers it")


def task_names() -> list[str]:
    """Every task that can be named: the registered ones and those installed packages declare as entry points."""
    return sorted(set(TASKS.names()) | set(_entry_points()))


def get_task(name: str) -> Task:
    """An instance of a registered task (an installed entry point of that name is loaded first); an unknown name
    lists the known ones and says how to register one."""
    if name not in TASKS:
        _load_entry_point(name)
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known: {', '.join(task_names()) or '(none)'}; "
                               f"{HOW_TO_REGISTER}")
    return TASKS.get(name)()


def offline_config(task: str, config_dir: str | os.PathLike | None = None) -> Path:
    """``<config_dir>/<task>_offline.yaml`` (default: the checkout's ``configs/``): a task's offline default run
    config. The path is returned whether or not it exists; callers decide what its absence means."""
    return Path(config_dir if config_dir is not None else CONFIG_DIR) / f"{task}_offline.yaml"
