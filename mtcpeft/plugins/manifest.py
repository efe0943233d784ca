"""Plugins: what a task's training leaves behind, and what the merger composes.

A plugin is a directory:

* ``adaptor.safetensors`` — the trainable tensors: per-context adaptor tensors under
  ``<prefix><module>.<param>`` (prefix ``lm.model.``: the VisionLanguageModel's name of the LM; stacked over
  contexts, leading dim C) and projector weights under ``projector.<name>``;
* ``plugin.json`` — the :class:`Manifest` (format version 1)::

    format_version  1
    task            the task that trained it ("caption"), or the name of a merged plugin ("unified")
    contexts        the adaptor groups, in stacking order (leading dim of every adaptor tensor)
    adaptor         {kind, <the kind's options (its config's fields)>, full_finetune}; a mixed-kind plugin (kind
                    "mixed") records the kind of each context ("kinds", in context order) and each kind's options
                    ("kind_options"), and the placement of a kind placed unlike ``placement`` ("placements"); its
                    targets are then ``<module>.<kind>``, one per kind acting on a module, each stacked over that
                    kind's contexts only
    placement       "A" / "F" / "AF" or comma-separated module-name patterns (how the targets were chosen)
    targets         adapted module names of the LM, in model order
    base_lm         where the base LM came from; base_lm_fingerprint: hash of its frozen weights
    tensors         {name: shape} of every tensor in adaptor.safetensors
    optional: task_contexts, generated_context, vision, projector, layout, data, adaptor_prefix (default
    "lm.model."), for merged plugins routes, generated, merge, sources (see :mod:`mtcpeft.plugins.merge`), and
    for jointly trained ones joint.

The manifest is one typed object, :class:`Manifest`: read and type-checked field by field by
:meth:`Manifest.from_json` / :meth:`Manifest.read`, checked as a whole by :meth:`Manifest.validate` (when read,
and before :func:`save_plugin` writes one), written by :func:`save_plugin` alone. Writes are atomic (a complete
temporary directory is renamed into place; a folder holding other files is never replaced) and only with finite
tensors; never pickle. :func:`check_compatible` checks a plugin against a base LM and a model;
:func:`mtcpeft.plugins.load.load_model` turns a plugin directory into a model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
from safetensors.torch import load_file
from torch import nn

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import atomic_dir, first_nonfinite, recover_dir, save_tensors, write_json

FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
TENSORS, MANIFEST = "adaptor.safetensors", "plugin.json"
DEFAULT_PREFIX = "lm.model."  # the VisionLanguageModel's name of the LM inside its ContextModel
REQUIRED_KEYS = ("format_version", "task", "contexts", "adaptor", "placement", "targets", "base_lm",
                 "base_lm_fingerprint", "tensors")
PRESETS = ("A", "F", "AF")  # placements that name an architecture preset, not module patterns


class PluginError(MtcpeftError, ValueError):
    """A plugin directory is missing, incomplete, or does not fit the model it is loaded into."""


def _fail(where: str, message: str) -> PluginError:
    return PluginError(f"{where}: {message}" if where else message)


# ------------------------------------------------------------------------------------------ fingerprints
def weights_fingerprint(module: torch.nn.Module, every: int = 4099) -> str:
    """A short hash of frozen weights: names, shapes, dtypes and a strided sample of every tensor's values.

    Cheap (a sample, not every byte) yet different for any two real checkpoints; used to refuse plugins trained
    on another base model.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.detach().reshape(-1)[::every].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lm_fingerprint(lm: nn.Module) -> str:
    """The ``base_lm_fingerprint`` of a causal LM or a ContextModel: the hash of its input embedding table (the
    one weight that is present and frozen in every PEFT run), as the task trainer records it."""
    from mtcpeft.core.model import ContextModel

    inner = lm.model if isinstance(lm, ContextModel) else lm
    return weights_fingerprint(inner.get_input_embeddings())


# ------------------------------------------------------------------------------------ reading JSON by type
_WHAT = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _parse(tp, value, name: str, where: str):
    """``value`` (parsed JSON) as the annotated type ``tp``; a PluginError names the field ``name`` otherwise."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, name, where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return tp.from_json(value, where, name)
    if origin in (list, dict):
        container = list if origin is list else dict
        if not isinstance(value, container):
            what = "a list" if origin is list else "an object"
            raise _fail(where, f"field {name!r} must be {what}, got {value!r}")
        if origin is list:
            return [_parse(args[0], v, f"{name}[{i}]", where) for i, v in enumerate(value)]
        return {k: _parse(args[1], v, f"{name}.{k}", where) for k, v in value.items()}
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise _fail(where, f"field {name!r} must be {_WHAT.get(tp, tp.__name__)}, got {value!r}")
    return value


class _Record:
    """A JSON object with typed fields: :meth:`from_json` type-checks each field, :meth:`to_json` writes it back.

    A field's JSON key is its name, or ``metadata["json"]``; fields without a default are required; an optional
    field (``metadata["optional"]``) is left out of the JSON while it is None."""

    @classmethod
    def from_json(cls, obj, where: str = "", name: str = ""):
        label = f"field {name!r}" if name else "the manifest"
        if not isinstance(obj, dict):
            raise _fail(where, f"{'field ' + repr(name) if name else 'the manifest'} must be a JSON object, "
                               f"got {type(obj).__name__}")
        hints, values = get_type_hints(cls), {}
        fields = dataclasses.fields(cls)
        required = [f for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [_key(f) for f in required if _key(f) not in obj]
        if missing:
            raise _fail(where, f"{label} lacks required keys {missing}" +
                        ("; was it written by save_plugin?" if not name else ""))
        for f in fields:
            if _key(f) in obj:
                values[f.name] = _parse(hints[f.name], obj[_key(f)], f"{name}.{_key(f)}" if name else _key(f), where)
        return cls(**values)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or not f.metadata.get("optional"):
                out[_key(f)] = _to_json(value)
        return out


def _optional():
    """A field that is left out of the JSON while it is None."""
    return field(default=None, metadata={"optional": True})


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


def _to_json(value):
    if isinstance(value, (_Record, AdaptorInfo)):
        return value.to_json()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------- the manifest
@dataclass
class AdaptorInfo:
    """``{"kind": ..., <the kind's options>, "full_finetune": ...}``: the options stay flat in the JSON."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # the kind's config options, e.g. rank, alpha, dropout
    full_finetune: bool = False  # the whole LM was trained (no adaptor tensors; the LM's own ones instead)

    @classmethod
    def from_json(cls, obj, where: str = "", name: str = "adaptor") -> "AdaptorInfo":
        if not isinstance(obj, dict) or "kind" not in obj:
            raise _fail(where, f"{name!r} must be an object with a 'kind', got {obj!r}")
        kind = _parse(str, obj["kind"], f"{name}.kind", where)
        full = _parse(bool, obj.get("full_finetune", False), f"{name}.full_finetune", where)
        return cls(kind, {k: v for k, v in obj.items() if k not in ("kind", "full_finetune")}, full)

    @classmethod
    def of(cls, config, full_finetune: bool = False) -> "AdaptorInfo":
        """The record of an adaptor config object (:class:`~mtcpeft.core.adaptors.AdaptorConfig`)."""
        options = {k: v for k, v in config.to_dict().items() if k != "kind"}
        return cls(config.name, options, full_finetune)

    def to_json(self) -> dict:
        return {"kind": self.kind, **self.options, "full_finetune": self.full_finetune}

    def config(self):
        """The kind's config object (from the adaptor registry), built from the options."""
        from mtcpeft.core.adaptors import adaptor_config  # late: the adaptors package is heavier than this file

        return adaptor_config(self.kind, **self.options)


@dataclass
class VisionInfo(_Record):
    name: str  # timm model name
    pretrained: str  # how its weights were obtained (see mtcpeft.models.vision.build_vision_encoder)
    image_size: int | None
    fingerprint: str | None = None  # hash of the frozen encoder weights


@dataclass
class ProjectorInfo(_Record):
    kind: str
    in_dim: int
    out_dim: int


@dataclass
class LayoutInfo(_Record):
    seq_len: int
    max_target_tokens: int


@dataclass
class MergeInfo(_Record):
    strategy: str
    density: float | None  # ties only
    new_groups: dict[str, list[str]]
    exact: bool
    projector_from: str | None = None


@dataclass
class SourceInfo(_Record):
    task: str  # the name that namespaces its contexts
    source_task: str  # the task its manifest names
    dir: str
    fingerprint: str
    contexts: list[str]
    adaptor: AdaptorInfo
    layout: LayoutInfo | None = None


@dataclass
class JointInfo(_Record):
    tasks: list[str]  # the tasks it was jointly fine-tuned on
    from_task: str = field(metadata={"json": "from"})  # the merged plugin it started from


@dataclass(kw_only=True)
class Manifest(_Record):
    """The typed contents of ``plugin.json`` (fields in file order); see the module docstring for each field."""

    format_version: int = FORMAT_VERSION
    task: str
    contexts: list[str]
    task_contexts: list[str] | None = _optional()
    generated_context: str | None = None
    adaptor: AdaptorInfo
    placement: str
    targets: list[str]
    base_lm: str
    base_lm_fingerprint: str
    vision: VisionInfo | None = None
    projector: ProjectorInfo | None = None
    layout: LayoutInfo | None = _optional()
    data: dict[str, Any] | None = _optional()  # the data section it was trained on (a RunConfig's ``data``)
    adaptor_prefix: str | None = _optional()  # None: DEFAULT_PREFIX (written only when it differs)
    routes: dict[str, dict[str, str]] | None = _optional()  # merged plugins: {task: {task context: group}}
    generated: dict[str, str] | None = _optional()
    merge: MergeInfo | None = _optional()
    sources: list[SourceInfo] | None = _optional()
    joint: JointInfo | None = _optional()
    tensors: dict[str, list[int]] = field(default_factory=dict)  # {name: shape}, filled by save_plugin

    @property
    def prefix(self) -> str:
        """Prefix of the adaptor tensor names: ``lm.model.`` unless the manifest names another one."""
        return self.adaptor_prefix or DEFAULT_PREFIX

    @property
    def unified(self) -> bool:
        """A merged (or jointly trained) plugin: its contexts are namespaced groups routed per task."""
        return self.routes is not None

    @property
    def target_spec(self) -> str | list[str]:
        """The placement as :class:`~mtcpeft.core.model.ContextModel` takes it: a preset or module patterns."""
        return self.placement if self.placement.upper() in PRESETS else self.placement.split(",")

    @classmethod
    def from_json(cls, obj, where: str = "", name: str = "") -> "Manifest":
        """A manifest from parsed JSON, every field type-checked and the whole validated (:meth:`validate`)."""
        if not isinstance(obj, dict):
            raise _fail(where, f"the manifest must be a JSON object, got {type(obj).__name__}")
        _check_version(obj.get("format_version"), where)
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise _fail(where, f"the manifest lacks required keys {missing}; was it written by save_plugin?")
        manifest = super().from_json(obj, where, name)
        manifest.validate(where)
        return manifest

    @classmethod
    def read(cls, plugin_dir: str | os.PathLike) -> "Manifest":
        """The validated manifest of a plugin directory (tensors not read)."""
        d = Path(plugin_dir)
        recover_dir(d)  # a save killed between its two renames left complete copies beside it
        if not (d / MANIFEST).is_file() or not (d / TENSORS).is_file():
            raise PluginError(f"{d} is not a plugin directory: it needs {MANIFEST} and {TENSORS}")
        try:
            obj = json.loads((d / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise PluginError(f"{d / MANIFEST} is not valid JSON: {e}") from None
        return cls.from_json(obj, where=str(d))

    def validate(self, where: str = "") -> None:
        """Raise :class:`PluginError` naming the first problem of the manifest on its own.

        Checks: format version, a non-empty task, non-empty unique contexts, a registered adaptor kind with valid
        options, unique targets, every adaptor tensor present for every target with the kind's shapes, routes
        (merged plugins) naming known contexts.
        """
        from mtcpeft.core.adaptors import ADAPTORS

        _check_version(self.format_version, where)
        if not self.task:
            raise _fail(where, f"'task' must be a non-empty string, got {self.task!r}")
        contexts = self.contexts
        if not contexts or not all(contexts):
            raise _fail(where, f"'contexts' must be a non-empty list of context names, got {contexts!r}")
        dup = sorted({c for c in contexts if contexts.count(c) > 1})
        if dup:
            raise _fail(where, f"'contexts' repeats {dup}; every context names one adaptor group")
        if self.generated_context is not None and self.generated_context not in contexts:
            raise _fail(where, f"generated_context {self.generated_context!r} is not one of the contexts {contexts}")
        if self.adaptor.kind not in ADAPTORS.names():
            raise _fail(where, f"unknown adaptor kind {self.adaptor.kind!r}; this mtcpeft knows {ADAPTORS.names()}")
        try:
            config = self.adaptor.config()
        except (TypeError, ValueError) as e:
            raise _fail(where, f"bad adaptor options: {e}") from None
        if not all(self.targets):
            raise _fail(where, f"'targets' must be a list of module names, got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise _fail(where, f"'targets' repeats module names: "
                               f"{sorted({t for t in self.targets if self.targets.count(t) > 1})}")
        if not all(n >= 0 for s in self.tensors.values() for n in s):
            raise _fail(where, "'tensors' must map tensor names to shapes (lists of sizes)")
        _check_adaptor_shapes(self, config, where)
        _check_routes(self, where)


def _check_version(version, where: str) -> None:
    if version not in KNOWN_VERSIONS:
        raise _fail(where, f"unknown plugin format version {version!r}; this mtcpeft reads versions "
                           f"{list(KNOWN_VERSIONS)} (upgrade mtcpeft, or re-save the plugin with this version)")


def adaptor_param_names(kind: str) -> tuple[str, ...]:
    """Per-context tensor names of an adaptor kind (``("lora_A", "lora_B")``), read from its layer class."""
    from mtcpeft.core.adaptors import ADAPTORS  # late: the adaptors package is heavier than this file

    return ADAPTORS.get(kind).param_names()


def adaptor_tensor_names(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """``{tensor name: (target module, param)}`` that the manifest's targets and adaptor kind call for (each
    target's tensors are those of its kind: :meth:`~mtcpeft.core.adaptors.AdaptorConfig.at`)."""
    if manifest.adaptor.full_finetune:
        return {}
    prefix, config = manifest.prefix, manifest.adaptor.config()
    return {f"{prefix}{t}.{p}": (t, p) for t in manifest.targets for p in config.at(t).param_names()}


def _check_adaptor_shapes(manifest: Manifest, config, where: str) -> None:
    """Every target has its tensors, stacked over its contexts (all of them; in a mixed-kind plugin, those of the
    target's kind), in the shapes its adaptor kind declares."""
    shapes = manifest.tensors
    try:
        wanted = adaptor_tensor_names(manifest)
    except ValueError as e:  # a target the config cannot place (a mixed plugin's layer names end in their kind)
        raise _fail(where, f"bad targets: {e}") from None
    params = {p for member in config.members() for p in member.param_names()}
    missing = [n for n in wanted if n not in shapes]
    if missing:
        target, param = wanted[missing[0]]
        raise _fail(where, f"missing tensor {missing[0]!r}: target {target!r} needs its {param} "
                           f"({len(missing)} adaptor tensors missing in all)")
    if manifest.adaptor.full_finetune:
        return
    stray = [n for n in shapes if n.rpartition(".")[2] in params and n not in wanted]
    if stray:
        raise _fail(where, f"tensor {stray[0]!r} is an adaptor tensor of no listed target; add its module to "
                           "'targets' or drop the tensor")
    prefix = manifest.prefix
    for name, (t, _) in wanted.items():
        groups = config.groups_at(t, manifest.contexts)
        if not shapes[name] or shapes[name][0] != len(groups):
            raise _fail(where, f"tensor {name!r} has leading dim {(shapes[name] or [None])[0]} but the manifest "
                               f"lists {len(groups)} contexts {groups} for it; adaptor tensors are stacked over "
                               "contexts")
    for t in manifest.targets:
        kind = config.at(t)
        problem = kind.shape_problem({p: shapes[f"{prefix}{t}.{p}"] for p in kind.param_names()})
        if problem is not None:
            param, what = problem
            raise _fail(where, f"tensor {prefix + t + '.' + param!r} {what}")


def _check_routes(manifest: Manifest, where: str) -> None:
    if manifest.routes is None:
        return
    if not all(manifest.routes.values()):
        raise _fail(where, "'routes' must map each task to {task context: plugin context}")
    contexts = set(manifest.contexts)
    for task, table in manifest.routes.items():
        for ctx, group in table.items():
            if group not in contexts:
                raise _fail(where, f"route {task}.{ctx} -> {group!r} names no context of the plugin "
                                   f"(contexts: {manifest.contexts})")


def check_tensors(manifest: Manifest, tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """The tensor file holds exactly the tensors the manifest lists, with the listed shapes."""
    want = manifest.tensors
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing:
        raise _fail(where, f"missing tensor {missing[0]!r} listed in the manifest ({len(missing)} missing in all)")
    if extra:
        raise _fail(where, f"tensor {extra[0]!r} is not listed in the manifest ({len(extra)} unexpected in all)")
    bad = [k for k, shape in want.items() if list(tensors[k].shape) != shape]
    if bad:
        raise _fail(where, f"tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, manifest says {want[bad[0]]}")


def check_compatible(manifest: Manifest, *, base_lm_fingerprint: str | None = None, model: nn.Module | None = None,
                     tensors: dict[str, torch.Tensor] | None = None, where: str = "") -> None:
    """Raise :class:`PluginError` naming why a plugin does not fit: an unknown format version, another base LM
    (``base_lm_fingerprint``, see :func:`lm_fingerprint`), or — given a ContextModel ``model`` and the plugin
    ``tensors`` — another adaptor kind or rank, other contexts, a missing tensor or a shape that differs."""
    _check_version(manifest.format_version, where)
    if base_lm_fingerprint is not None and manifest.base_lm_fingerprint != base_lm_fingerprint:
        raise _fail(where, f"the plugin was trained on another base LM ({manifest.base_lm!r}, fingerprint "
                           f"{manifest.base_lm_fingerprint}) than this one (fingerprint {base_lm_fingerprint})")
    if model is None:
        return
    kind = manifest.adaptor.kind
    if model.adaptor.name != kind:
        raise _fail(where, f"the plugin holds {kind} adaptors but the model has {model.adaptor.name} adaptors")
    if list(model.vocab.names) != list(manifest.contexts):
        raise _fail(where, f"the plugin's contexts {manifest.contexts} differ from the model's "
                           f"{list(model.vocab.names)}; build the model with the plugin's contexts")
    if tensors is None:
        return
    for name, own in model.adaptor_state_dict().items():
        key = manifest.prefix + name
        if key not in tensors:
            raise _fail(where, f"missing tensor {key!r}: the model adapts {name.rpartition('.')[0]!r}, the plugin "
                               "does not (same placement?)")
        if tuple(tensors[key].shape) != tuple(own.shape):
            raise _fail(where, f"tensor {key!r} has shape {list(tensors[key].shape)} but the model needs "
                               f"{list(own.shape)} (contexts, rank, widths)")


# -------------------------------------------------------------------------------------------- read/write
def save_plugin(out_dir: str | os.PathLike, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Path:
    """The one writer of plugins: ``tensors`` and ``manifest`` (with this format version and the tensors' shapes)
    as a plugin directory, after validating that it would load."""
    out = Path(out_dir)
    manifest = dataclasses.replace(manifest, format_version=FORMAT_VERSION,
                                   tensors={k: list(v.shape) for k, v in sorted(tensors.items())})
    manifest.validate(where=f"plugin for {out}")  # never write a plugin that cannot be loaded
    bad = first_nonfinite(tensors)
    if bad is not None:  # a diverged training must not leave a plugin that looks like a result
        raise PluginError(f"plugin for {out}: tensor {bad!r} holds non-finite values (nan or inf); refusing to "
                          "write it (did the training diverge? lower train.lr)")
    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / TENSORS, metadata={"format": "mtcpeft-plugin", "version": str(FORMAT_VERSION)})
        write_json(manifest.to_json(), tmp / MANIFEST)
    return out


def read_tensors(plugin_dir: str | os.PathLike, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The tensors of a plugin whose ``manifest`` was read already, checked against it."""
    d = Path(plugin_dir)
    try:
        tensors = load_file(str(d / TENSORS))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise PluginError(f"{d / TENSORS} is not a readable safetensors file: {e}") from None
    check_tensors(manifest, tensors, where=str(d))
    return tensors


def load_plugin(plugin_dir: str | os.PathLike) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """(manifest, tensors) after validating the manifest and that the tensors match it."""
    manifest = Manifest.read(plugin_dir)
    return manifest, read_tensors(plugin_dir, manifest)


def context_plugin_manifest(model: nn.Module, task: str, placement: str | list[str], base_lm: str = "",
                            task_contexts: list[str] | None = None, generated_context: str | None = None) -> Manifest:
    """The manifest of an LM-only plugin of a :class:`~mtcpeft.core.model.ContextModel` (tensors under ``lm.model.``).

    ``placement``: what the model was built with (``"AF"`` or module-name patterns), so that it can be rebuilt.
    """
    return Manifest(
        task=task,
        contexts=list(model.vocab.names),
        task_contexts=list(task_contexts or model.vocab.names),
        generated_context=generated_context,
        adaptor=AdaptorInfo.of(model.adaptor),
        placement=placement if isinstance(placement, str) else ",".join(placement),
        targets=list(model.target_names),
        base_lm=base_lm,
        base_lm_fingerprint=lm_fingerprint(model),
    )


def save_context_plugin(out_dir: str | os.PathLike, model: nn.Module, task: str, placement: str | list[str],
                        base_lm: str = "", prefix: str = DEFAULT_PREFIX, **fields) -> Path:
    """Save the adaptors of an LM-only ContextModel as a plugin (text-only tasks, tests, PEFT imports);
    ``fields``: other manifest fields (``generated_context="text"``)."""
    manifest = dataclasses.replace(context_plugin_manifest(model, task, placement, base_lm), **fields)
    if prefix != DEFAULT_PREFIX:
        manifest.adaptor_prefix = prefix
    tensors = {prefix + k: v.detach() for k, v in model.adaptor_state_dict().items()}
    return save_plugin(out_dir, manifest, tensors)
