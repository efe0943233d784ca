"""What a task declares: its contexts, where its data comes from, how an example becomes tokens, the context of
generated tokens. A task file stays small; format readers live in :mod:`mtcpeft.data`."""
from __future__ import annotations

from typing import ClassVar

from mtcpeft.contexts import ContextVocab
from mtcpeft.registry import Registry

TASKS: Registry[type["Task"]] = Registry("task")


class Task:
    """Base of tasks. Subclasses set ``name``, ``contexts``, ``generated_context`` and implement the hooks."""

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]]
    generated_context: ClassVar[str]
    uses_images: ClassVar[bool] = False

    @property
    def vocab(self) -> ContextVocab:
        return ContextVocab(self.contexts)

    def examples(self, split: str, data) -> list[dict]:  # pragma: no cover - interface
        """Read ``split`` ("train" / "val") of the data named by a DataConfig into example dicts."""
        raise NotImplementedError

    def encode(self, example: dict, tokenizer, layout) -> dict:  # pragma: no cover - interface
        """One example -> {"input_ids", "context_ids", "labels", "attention_mask", ...} (lists or tensors)."""
        raise NotImplementedError


def register_task(cls: type[Task]) -> type[Task]:
    return TASKS.register(cls.name)(cls)


def get_task(name: str) -> Task:
    """An instance of a registered task; an unknown name lists the known ones."""
    return TASKS.get(name)()
