"""Run configuration: nested dataclasses, filled from YAML, then from dotted command-line overrides.

    cfg = load_config("configs/caption_offline.yaml", ["train.lr=3e-4", "adaptor.kind=bitfit"])

A YAML file is a nested mapping mirroring the dataclasses (``train: {lr: 1.0e-4}``); an override is
``section.key=value`` with the value read as YAML (``3e-4`` -> float, ``null`` -> None, ``[0.9,0.95]`` -> list).
Every value is then checked against its field's annotation and every dataclass runs its ``__post_init__`` checks,
so a typo or a wrong type fails at start-up with the key, the problem and the fix in the message.
:func:`save_config` writes the exact config a run used; :func:`load_config` of that file gives an equal config.

Why no config library (issue 11): OmegaConf 2.4 structured configs (as torchtune) and jsonargparse 4.53 (as
litgpt) were given the same mistakes. OmegaConf suggests a key within its section (``Did you mean: 'lr'?``) but
not across sections (``lr=1`` for ``train.lr``), names the full key and the type of a wrong value, lists
``Literal`` choices and passes PyYAML's (multi-line) syntax error with file, line and column through; but it
silently reads ``train.resume=1`` as True and an unquoted ``mixed_precision: no`` as the string ``'False'``, and
refuses an empty section (``train:``). jsonargparse is strict on types and lists choices, but suggests nothing for
an unknown key, names ``<unicode string>`` instead of the file in a YAML error and wants ``--train.lr=`` where
our scripts take ``train.lr=``. Keeping today's errors would mean wrapping either library in most of the checks
below, so they stay here (172 lines, 184 before) and no dependency is added.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import atomic_path

T = TypeVar("T")


class ConfigError(MtcpeftError, ValueError):
    """A config problem; the message names the key, what is wrong and how to fix it."""


class _FieldError(ConfigError):
    """A ``__post_init__`` check failed; the loader re-raises it with the key's section (``train.lr``)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"config key {key!r} {detail}")
        self.key, self.detail = key, detail


def _check(ok: bool, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise _FieldError(key, f"{requirement}, got {value!r}")


def _one_of(key: str, value: Any, choices) -> None:
    _check(value in choices, key, "must be one of " + ", ".join(map(repr, choices)), value)


def _dropout(key: str, value: float | None) -> None:
    _check(value is None or 0.0 <= value < 1.0, key, "must be in [0, 1)", value)


def _positive_or_none(key: str, value) -> None:
    _check(value is None or value > 0, key, "must be positive (or null)", value)


# ------------------------------------------------------------------------------------------------ dataclasses
@dataclass
class ModelConfig:
    """The frozen backbones and the projector between them."""

    lm: str = "smollm2"  # causal LM: hub id, local folder or .gguf, or the packaged alias "smollm2"
    vision: str = "efficientnet_lite0"  # vision encoder: any timm model name
    vision_pretrained: str = "packaged"  # "hub" | "packaged" | "none" | a local checkpoint path
    image_size: int | None = None  # input resolution in pixels; None = the encoder's default
    projector: str = "linear"  # vision -> LM embedding projector: "linear" (as in the paper) | "mlp"
    projector_dropout: float = 0.1  # dropout on image features before the projector
    residual_dropout: float | None = None  # LM residual dropout; None leaves the LM's own setting
    gradient_checkpointing: bool = False  # recompute LM activations in backward to save memory

    def __post_init__(self):
        _check(bool(self.lm), "lm", "must name a model", self.lm)
        _check(bool(self.vision), "vision", "must name a timm model", self.vision)
        # any other string is a checkpoint path; the loader checks that it exists
        _check(bool(self.vision_pretrained), "vision_pretrained", "must be hub, packaged, none or a path",
               self.vision_pretrained)
        _positive_or_none("image_size", self.image_size)
        _one_of("projector", self.projector, ("linear", "mlp"))
        _dropout("projector_dropout", self.projector_dropout)
        _dropout("residual_dropout", self.residual_dropout)


@dataclass
class AdaptorSpec:
    """Which adaptor is trained and where. The option keys (rank, alpha, dropout) are the command line's spelling
    of the options the kinds declare (their config dataclass fields, e.g. ``LoRAConfig``); :meth:`build` hands a
    kind the ones it declares, which the kind checks, and ignores the rest. Fine-tuning the whole LM is not an
    adaptor: ``train.mode``."""

    kind: str = "lora"  # a registered adaptor kind (mtcpeft.core.adaptors.ADAPTORS: bitfit, ia3, lora, none)
    rank: int = 8  # LoRA rank per context
    alpha: float | None = None  # LoRA scaling numerator (update scaled by alpha / rank); None = rank
    dropout: float = 0.0  # LoRA dropout on the adapted branch's input
    targets: str = "AF"  # "A" attention, "F" feed-forward, "AF" both, or comma-separated module-name patterns
    context_agnostic: bool = False  # one parameter group shared by all contexts instead of one per context

    def __post_init__(self):
        # imported here, not at module import: keeps config importable without the layers
        from mtcpeft.core.adaptors import ADAPTORS, OptionError

        kinds = ADAPTORS.names()
        _check(self.kind in kinds, "kind", "must be one of " + ", ".join(map(repr, kinds)) + " (fine-tuning the "
               "whole LM is not an adaptor kind: set train.mode='full' with adaptor.kind='none')", self.kind)
        _check(bool(self.targets.strip()), "targets", 'must be "A", "F", "AF" or module-name patterns', self.targets)
        try:  # the kind checks the options it declares (one place: its config class)
            self.build()
        except OptionError as e:
            raise _FieldError(e.option, f"{e.requirement} (adaptor {self.kind}), got {e.value!r}") from None

    def build(self):
        """The registered kind's :class:`~mtcpeft.core.adaptors.AdaptorConfig` from the options it declares."""
        from mtcpeft.core.adaptors import ADAPTORS, adaptor_config

        declared = ADAPTORS.get(self.kind).option_names()
        unknown = [k for k in declared if not hasattr(self, k)]
        if unknown:
            raise ConfigError(f"adaptor kind {self.kind!r} has options {unknown} that the adaptor section cannot set; "
                              f"add them to mtcpeft.config.AdaptorSpec")
        return adaptor_config(self.kind, **{k: getattr(self, k) for k in declared})

    def set_options(self, options: dict) -> None:
        """Set the kind's options (``{"rank": 8, "alpha": 16.0, "dropout": 0.0}``), e.g. read from a plugin."""
        keys = {f.name for f in dataclasses.fields(self)} - {"kind", "targets", "context_agnostic"}
        unknown = sorted(k for k in options if k not in keys)
        if unknown:
            raise ConfigError(f"adaptor options {unknown} have no key in the adaptor section; add them to "
                              "mtcpeft.config.AdaptorSpec")
        for k, v in options.items():
            setattr(self, k, v)


SOURCES = ("easyvqa", "coco", "karpathy", "squad", "vqa2", "hf")
# files each source needs for training; "val_*" twins are needed for validation (easyvqa needs nothing)
SOURCE_KEYS = {"coco": ("annotations", "images"), "karpathy": ("karpathy_json", "images"),
                "squad": ("annotations",), "vqa2": ("questions", "annotations", "images"), "hf": ("hf_path",)}


@dataclass
class DataConfig:
    """Where examples come from and how they are laid out. Which sources a task reads: ``tasks/<task>.py``."""

    source: str = "easyvqa"  # easyvqa (packaged, offline) | coco | karpathy (captions) | squad (QA) | vqa2 (VQA) |
    #   hf (a Hugging Face `datasets` split, any task: the hf_* keys)
    annotations: str | None = None  # training annotations: COCO captions JSON | SQuAD JSON or a saved HF
    #   `datasets` folder / JSON-lines of its rows | VQA v2 annotations JSON
    val_annotations: str | None = None  # the same for validation
    questions: str | None = None  # VQA v2 questions JSON (training)
    val_questions: str | None = None  # VQA v2 questions JSON (validation)
    images: str | None = None  # image folder (coco: the split folder; karpathy: holds train2014/, val2014/)
    val_images: str | None = None  # validation image folder when it differs (coco, vqa2); None = images
    image_pattern: str = "auto"  # VQA v2 image file name, with {image_id} and {subtype} (the questions file's
    #   data_subtype, e.g. train2014), e.g. "COCO_{subtype}_{image_id:012d}.jpg"; "auto": that or "{image_id:012d}.jpg"
    karpathy_json: str | None = None  # dataset_coco.json of the Karpathy split (source karpathy)
    hf_path: str | None = None  # source hf: a hub id, a save_to_disk folder, an imagefolder / data folder, or a
    #   parquet / JSON-lines / CSV file or glob
    hf_name: str | None = None  # source hf: the hub dataset's config name
    hf_train_split: str = "train"  # source hf: the split trained on
    hf_val_split: str = "validation"  # source hf: the split validated on
    hf_columns: dict[str, str] | None = None  # source hf: {example field: column} where the task's defaults (the
    #   common hub schemas) do not fit, e.g. {image: img, caption: text}
    drop_impossible: bool = True  # SQuAD v2.0: leave out unanswerable questions when training
    seq_len: int = 128  # tokens per example after padding
    max_target_tokens: int = 63  # caption / answer tokens kept, counting [EOS]
    augment: bool = False  # random flip / crop / colour jitter on training images (disables feature caching)
    cache_features: bool = True  # encode each image once with the frozen encoder and reuse the features
    train_limit: int | None = None  # use only the first N training examples; None = all
    val_limit: int | None = None  # use only the first N validation examples; None = all
    on_bad_image: str = "skip"  # unreadable image: "skip" it (and count it) | "fail"
    num_workers: int = 0  # DataLoader worker processes
    streaming: bool = False  # source hf: read the training split as a stream (datasets' IterableDataset) while
    #   training, never whole; needs train.max_steps and data.val_limit (validation: the split's first val_limit rows)
    shuffle_buffer: int = 1000  # streaming: examples drawn at random from a buffer of this many rows (seeded, reshuffled
    #   every epoch, shard order too); 0 = the split's own order

    def __post_init__(self):
        _one_of("source", self.source, SOURCES)
        for key in SOURCE_KEYS.get(self.source, ()):
            _check(getattr(self, key) is not None, key, f"must be set for source {self.source!r} "
                   f"(override it: data.{key}=PATH)", None)
        _check(self.max_target_tokens >= 2, "max_target_tokens", "must be >= 2 (one token and [EOS])",
               self.max_target_tokens)
        _check(self.seq_len > self.max_target_tokens, "seq_len",
               f"must exceed max_target_tokens ({self.max_target_tokens})", self.seq_len)
        _positive_or_none("train_limit", self.train_limit)
        _positive_or_none("val_limit", self.val_limit)
        _one_of("on_bad_image", self.on_bad_image, ("skip", "fail"))
        _check(self.num_workers >= 0, "num_workers", "must be >= 0", self.num_workers)
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0 (0: no shuffling)", self.shuffle_buffer)
        if self.streaming:
            _check(self.source == "hf", "streaming", "needs data.source=hf (a Hugging Face datasets split); the "
                   f"other sources are read whole, so set data.streaming=false for source {self.source!r}", True)
            _check(self.val_limit is not None, "streaming", "validates on the first data.val_limit examples of the "
                   "validation split, read once; set data.val_limit=N (e.g. 500)", True)
            _check(self.train_limit is None, "train_limit", "does not apply to a stream (it has no fixed order of "
                   "examples); bound training with train.max_steps and leave data.train_limit null", self.train_limit)
            _check(self.num_workers == 0, "num_workers", "must be 0 with data.streaming=true: the stream's position "
                   "(what a resumed run continues from) is read from the dataset in the training process, which "
                   "worker processes would hide", self.num_workers)

    def describe(self, split: str) -> str:
        """Where ``split``'s examples come from: ``"data.source=coco val (data.val_annotations=..., ...)"``."""
        if self.source == "hf":
            split_name = self.hf_train_split if split == "train" else self.hf_val_split
            name = f", data.hf_name={self.hf_name}" if self.hf_name else ""
            return f"data.source=hf {split} (data.hf_path={self.hf_path}{name}, split {split_name!r})"
        paths = []
        for key in SOURCE_KEYS.get(self.source, ()):
            val = f"val_{key}"
            if split != "train" and self.source != "karpathy" and (getattr(self, val, None) is not None
                                                                    or key != "images"):
                key = val  # validation files; only the image folder falls back to the training one
            paths.append(f"data.{key}={getattr(self, key)}")
        where = f" ({', '.join(paths)})" if paths else " (packaged easy-VQA)" if self.source == "easyvqa" else ""
        return f"data.source={self.source} {split}{where}"


TRAIN_MODES = ("adaptors", "full")  # train.mode: the injected adaptors train | the whole LM trains


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Adam(W) on the trainable parameters only."""

    batch_size: int = 96  # examples per optimizer step per process (before gradient accumulation)
    epochs: int = 8  # passes over the training set
    lr: float = 1e-4  # learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # Adam betas
    weight_decay: float = 0.0  # decoupled weight decay
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (DeepSpeed: its config's value wins)
    mixed_precision: str = "auto"  # "auto" (bf16 where the GPU/CPU does bf16 natively, else fp32) | "no" | "fp16" | "bf16"
    max_grad_norm: float | None = None  # clip gradients to this norm; None = no clipping
    max_steps: int | None = None  # stop after this many optimizer steps; None = run all epochs
    eval_every_epochs: int = 1  # validate every N epochs (the best-validation epoch is reported)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps; 0 = only at epoch ends
    log_every: int = 10  # log loss / lr every N optimizer steps
    resume: bool = False  # continue from the last checkpoint in output_dir
    mode: str = "adaptors"  # what trains besides the projector: "adaptors" (the adaptor section; kind none = the
    #   frozen LM) | "full" (every LM weight, no adaptor: set adaptor.kind=none)

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _check(self.lr > 0, "lr", "must be positive", self.lr)
        _check(all(0.0 <= b < 1.0 for b in self.betas), "betas", "must both be in [0, 1)", self.betas)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1", self.grad_accum)
        _one_of("mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))
        _positive_or_none("max_grad_norm", self.max_grad_norm)
        _positive_or_none("max_steps", self.max_steps)
        _check(self.eval_every_epochs >= 1, "eval_every_epochs", "must be >= 1", self.eval_every_epochs)
        _check(self.save_every_steps >= 0, "save_every_steps", "must be >= 0", self.save_every_steps)
        _check(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        _one_of("mode", self.mode, TRAIN_MODES)


@dataclass
class RunConfig:
    """One training run: the task, where it writes, and the sections above."""

    task: str = "caption"  # a registered task name
    output_dir: str = "runs/caption"  # checkpoints, logs, config.yaml and results of this run
    seed: int = 0  # seed for Python, NumPy and torch
    model: ModelConfig = field(default_factory=ModelConfig)  # backbones and projector
    adaptor: AdaptorSpec = field(default_factory=AdaptorSpec)  # what is trained
    data: DataConfig = field(default_factory=DataConfig)  # examples
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation

    def __post_init__(self):
        _check(bool(self.task), "task", "must name a registered task", self.task)
        _check(bool(self.output_dir), "output_dir", "must be a directory path", self.output_dir)
        if self.train.mode == "full" and self.adaptor.build().param_names():
            raise ConfigError(f"config key 'train.mode' is 'full' (every LM weight trains) but adaptor.kind is "
                              f"{self.adaptor.kind!r}; set adaptor.kind=none for full fine-tuning, or train.mode="
                              "adaptors to train the adaptor")
        if self.data.streaming and not self.train.max_steps:
            raise ConfigError("config key 'data.streaming' is true but train.max_steps is not set: a stream has no "
                              "length to count epochs of steps by; set train.max_steps=N (train.epochs still caps the "
                              "passes over the split)")


# ------------------------------------------------------------------------------------------- type checking
def _type_name(tp) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


_SCALARS = {bool: bool, int: int, float: (int, float), str: str}  # annotation -> the Python types it accepts


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` as annotation ``tp`` requires, or ConfigError naming key, expected type and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    hint = "; quote it in YAML (\"no\", \"123\") to keep it a string" if _is_str_field(tp) else ""
    bad = ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif tp in _SCALARS:
        if tp is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool)):  # True is no number
            return float(value) if tp is float else value
    elif origin is dict and isinstance(value, dict):
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        item_types = [args[0]] * len(value) if origin is list or args[1:] == (Ellipsis,) else args
        if len(item_types) == len(value):
            return origin(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, item_types)))
    raise bad


def _fields(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        keys += _all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return keys


def _unknown_key(root, cls, prefix: str, name: str) -> ConfigError:
    siblings = list(_fields(cls))
    guess = difflib.get_close_matches(name, siblings, n=1)
    if guess:
        hint = f"did you mean {prefix + guess[0]!r}?"
    else:  # maybe the right key in the wrong section: `lr` for `train.lr`
        leaves = {k.rsplit(".", 1)[-1]: k for k in _all_keys(root)}
        guess = difflib.get_close_matches(name, list(leaves), n=1)
        hint = f"did you mean {leaves[guess[0]]!r}?" if guess else "no similar key"
    where = f"keys of {prefix[:-1]}" if prefix else "top-level keys"
    return ConfigError(f"unknown config key {prefix + name!r}; {hint} ({where}: {', '.join(siblings)})")


def _build(cls: type[T], data: Any, prefix: str = "", root=None) -> T:
    """An instance of dataclass ``cls`` from a nested mapping, every value checked against its annotation."""
    root = root or cls
    if not isinstance(data, dict):
        what = f"section {prefix[:-1]!r}" if prefix else "the config file"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {type(data).__name__} {data!r}")
    fields = _fields(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(root, cls, prefix, str(name))
    kwargs = {}
    for name, value in data.items():
        tp = fields[name]
        if dataclasses.is_dataclass(tp):  # an empty section (`train:` alone) reads as None
            kwargs[name] = _build(tp, {} if value is None else value, f"{prefix}{name}.", root)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise ConfigError(f"config key {prefix + e.key!r} {e.detail}") from None


# --------------------------------------------------------------------------------------- overrides and files
def _set_override(data: dict, text: str, cls) -> None:
    """Apply one ``a.b.c=value`` to the nested mapping ``data`` (in place)."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4 or "
                          "data.train_limit=null")
    *sections, leaf = key.split(".")
    node, node_cls, prefix = data, cls, ""
    for n, section in enumerate(sections):
        tp = _fields(node_cls).get(section)
        if n == len(sections) - 1 and _dict_value_type(tp) is not None:  # data.hf_columns.image=img: one entry
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node, tp = node[section], _dict_value_type(tp)
            break
        if not dataclasses.is_dataclass(tp):
            if tp is None:
                raise _unknown_key(cls, node_cls, prefix, section)
            raise ConfigError(f"bad override {text!r}: {prefix + section!r} is a value, not a section")
        if node.get(section) is None:
            node[section] = {}
        child = node[section]
        if not isinstance(child, dict):  # let _build report the bad section
            return
        node, node_cls, prefix = child, tp, f"{prefix}{section}."
    else:
        tp = _fields(node_cls).get(leaf)
        if tp is None:
            raise _unknown_key(cls, node_cls, prefix, leaf)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    if value is not None and not isinstance(value, str) and _is_str_field(tp):
        value = raw.strip()  # output_dir=2024 or data.images=no: a string field keeps the text as typed
    node[leaf] = value


def _dict_value_type(tp):
    """The value annotation of a ``dict[K, V]`` (or ``dict[K, V] | None``) field, else None."""
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) is dict:
            return (typing.get_args(t) or (Any, Any))[1]
    return None


def _is_str_field(tp) -> bool:
    return tp is str or set(typing.get_args(tp)) == {str, type(None)}


def _read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML file ``path``; a missing, unreadable or malformed file is one ConfigError line naming the
    file (and the line, column and problem of a syntax error)."""
    if not os.path.isfile(path):
        what = "is a folder, not a YAML file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"config file {path} {what}; check the --config path (configs/ holds the shipped ones)")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a YAML "
                          "file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None:
            context = f"{context} that starts at line {cmark.line + 1}"
        raise ConfigError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None


def load_config(path: str | os.PathLike | None, overrides=(), cls: type[T] = RunConfig) -> T:
    """Defaults of ``cls``, updated from the YAML file ``path`` (if any), then from ``overrides`` in order."""
    data = {} if path is None else _read_yaml(path)
    return config_from_dict({} if data is None else data, overrides, cls, where=path)


def config_from_dict(data: Any, overrides=(), cls: type[T] = RunConfig, where: str | os.PathLike | None = None) -> T:
    """Defaults of ``cls``, updated from the nested mapping ``data``, then from ``overrides``; ``where`` (the file
    the mapping came from) is named in errors."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    data = copy.deepcopy(data)
    if isinstance(data, dict):
        for text in overrides:
            _set_override(data, text, cls)
    try:
        return _build(cls, data)
    except ConfigError as e:
        if where is None:
            raise
        source = f"{where}" + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(f"{e} (loading {source})") from None


def config_to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) that YAML can write and :func:`load_config` reads back."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_config(cfg) -> dict[str, Any]:
    """A config (dataclass or nested dict) as one flat ``{"train.lr": 1e-4, ...}`` mapping of dotted keys."""
    out = {}
    for k, v in (config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        out.update({f"{k}.{key}": x for key, x in flat_config(v).items()} if isinstance(v, dict) else {k: v})
    return out


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML, atomically; ``load_config(path)`` returns an equal config."""
    text = "# the exact config of this run; rerun with: --config <this file>\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
