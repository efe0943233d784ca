"""Plugins: what a task's training leaves behind, and what the merger composes.

A plugin is a directory:

* ``adaptor.safetensors`` — the trainable tensors: per-context adaptor tensors under
  ``<prefix><module>.<param>`` (prefix ``lm.model.``: the VisionLanguageModel's name of the LM; stacked over
  contexts, leading dim C) and projector weights under ``projector.<name>``;
* ``plugin.json`` — the manifest (format version 1)::

    format_version  1
    task            the task that trained it ("caption"), or the name of a merged plugin ("unified")
    contexts        the adaptor groups, in stacking order (leading dim of every adaptor tensor)
    adaptor         {kind, <the kind's options (its config's fields)>, full_finetune}
    placement       "A" / "F" / "AF" or comma-separated module-name patterns (how the targets were chosen)
    targets         adapted module names of the LM, in model order
    base_lm         where the base LM came from; base_lm_fingerprint: hash of its frozen weights
    tensors         {name: shape} of every tensor in adaptor.safetensors
    optional: task_contexts, generated_context, vision, projector, layout, adaptor_prefix (default
    "lm.model."), and for merged plugins routes, generated, merge, sources (see :mod:`mtcpeft.plugins.merge`).

Written atomically (a complete temporary directory is renamed into place; a folder holding other files is never
replaced) and only with finite tensors; never pickle. Loading validates the
manifest on its own (:func:`validate_manifest`) and against the tensor file before anything touches a model;
:func:`check_compatible` then checks it against a base LM and a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


class PluginError(MtcpeftError, ValueError):
    """A plugin directory is missing, incomplete, or does not fit the model it is loaded into."""


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


# -------------------------------------------------------------------------------------------- manifest
def adaptor_prefix(manifest: dict) -> str:
    """Prefix of the adaptor tensor names: ``lm.model.`` unless the manifest names another one."""
    return manifest.get("adaptor_prefix", DEFAULT_PREFIX)


def adaptor_param_names(kind: str) -> tuple[str, ...]:
    """Per-context tensor names of an adaptor kind (``("lora_A", "lora_B")``), read from its layer class."""
    from mtcpeft.core.adaptors import ADAPTORS  # late: the adaptors package is heavier than this file

    return ADAPTORS.get(kind).param_names()


def adaptor_options(manifest: dict) -> dict:
    """The adaptor config options of a manifest (``{"rank": 8, "alpha": 16.0, "dropout": 0.0}``)."""
    return {k: v for k, v in manifest["adaptor"].items() if k not in ("kind", "full_finetune")}


def adaptor_tensor_names(manifest: dict) -> dict[str, tuple[str, str]]:
    """``{tensor name: (target module, param)}`` that the manifest's targets and adaptor kind call for."""
    if manifest["adaptor"].get("full_finetune"):
        return {}
    prefix, params = adaptor_prefix(manifest), adaptor_param_names(manifest["adaptor"]["kind"])
    return {f"{prefix}{t}.{p}": (t, p) for t in manifest["targets"] for p in params}


def _fail(where: str, message: str) -> PluginError:
    return PluginError(f"{where}: {message}" if where else message)


def _check_version(manifest: dict, where: str) -> None:
    version = manifest.get("format_version")
    if version not in KNOWN_VERSIONS:
        raise _fail(where, f"unknown plugin format version {version!r}; this mtcpeft reads versions "
                           f"{list(KNOWN_VERSIONS)} (upgrade mtcpeft, or re-save the plugin with this version)")


def validate_manifest(manifest: dict, where: str = "") -> None:
    """Raise :class:`PluginError` naming the first problem of a manifest on its own; return None when it is sound.

    Checks: format version, required keys, a registered adaptor kind with valid options, non-empty unique
    contexts, every adaptor tensor present for every target, leading dim = number of contexts, the shapes the
    adaptor kind declares (:meth:`~mtcpeft.core.adaptors.AdaptorConfig.shape_problem`), and routes (merged
    plugins) naming known contexts.
    """
    from mtcpeft.core.adaptors import ADAPTORS, adaptor_config

    if not isinstance(manifest, dict):
        raise _fail(where, f"the manifest must be a JSON object, got {type(manifest).__name__}")
    _check_version(manifest, where)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(where, f"the manifest lacks required keys {missing}; was it written by save_plugin?")
    if not isinstance(manifest["task"], str) or not manifest["task"]:
        raise _fail(where, f"'task' must be a non-empty string, got {manifest['task']!r}")
    contexts = manifest["contexts"]
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) and c for c in contexts):
        raise _fail(where, f"'contexts' must be a non-empty list of context names, got {contexts!r}")
    dup = sorted({c for c in contexts if contexts.count(c) > 1})
    if dup:
        raise _fail(where, f"'contexts' repeats {dup}; every context names one adaptor group")
    gen = manifest.get("generated_context")
    if gen is not None and gen not in contexts:
        raise _fail(where, f"generated_context {gen!r} is not one of the contexts {contexts}")
    adaptor = manifest["adaptor"]
    if not isinstance(adaptor, dict) or "kind" not in adaptor:
        raise _fail(where, f"'adaptor' must be an object with a 'kind', got {adaptor!r}")
    if adaptor["kind"] not in ADAPTORS.names():
        raise _fail(where, f"unknown adaptor kind {adaptor['kind']!r}; this mtcpeft knows {ADAPTORS.names()}")
    try:
        config = adaptor_config(adaptor["kind"], **adaptor_options(manifest))
    except (TypeError, ValueError) as e:
        raise _fail(where, f"bad adaptor options: {e}") from None
    targets = manifest["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise _fail(where, f"'targets' must be a list of module names, got {targets!r}")
    if len(set(targets)) != len(targets):
        raise _fail(where, f"'targets' repeats module names: {sorted({t for t in targets if targets.count(t) > 1})}")
    shapes = manifest["tensors"]
    if not isinstance(shapes, dict) or not all(
        isinstance(s, list) and all(isinstance(n, int) and n >= 0 for n in s) for s in shapes.values()
    ):
        raise _fail(where, "'tensors' must map tensor names to shapes (lists of sizes)")
    _check_adaptor_shapes(manifest, config, where)
    _check_routes(manifest, where)


def _check_adaptor_shapes(manifest: dict, config, where: str) -> None:
    """Every target has its tensors, stacked over the contexts, in the shapes the adaptor kind declares."""
    shapes, n_ctx = manifest["tensors"], len(manifest["contexts"])
    wanted = adaptor_tensor_names(manifest)
    params = adaptor_param_names(config.name)
    missing = [n for n in wanted if n not in shapes]
    if missing:
        target, param = wanted[missing[0]]
        raise _fail(where, f"missing tensor {missing[0]!r}: target {target!r} needs its {param} "
                           f"({len(missing)} adaptor tensors missing in all)")
    if manifest["adaptor"].get("full_finetune"):
        return
    stray = [n for n in shapes if n.rpartition(".")[2] in params and n not in wanted]
    if stray:
        raise _fail(where, f"tensor {stray[0]!r} is an adaptor tensor of no listed target; add its module to "
                           "'targets' or drop the tensor")
    for name in wanted:
        if not shapes[name] or shapes[name][0] != n_ctx:
            raise _fail(where, f"tensor {name!r} has leading dim {(shapes[name] or [None])[0]} but the manifest "
                               f"lists {n_ctx} contexts {manifest['contexts']}; adaptor tensors are stacked over "
                               "contexts")
    prefix = adaptor_prefix(manifest)
    for t in manifest["targets"]:
        problem = config.shape_problem({p: shapes[f"{prefix}{t}.{p}"] for p in params})
        if problem is not None:
            param, what = problem
            raise _fail(where, f"tensor {prefix + t + '.' + param!r} {what}")


def _check_routes(manifest: dict, where: str) -> None:
    routes = manifest.get("routes")
    if routes is None:
        return
    if not isinstance(routes, dict) or not all(isinstance(r, dict) and r for r in routes.values()):
        raise _fail(where, "'routes' must map each task to {task context: plugin context}")
    contexts = set(manifest["contexts"])
    for task, table in routes.items():
        for ctx, group in table.items():
            if group not in contexts:
                raise _fail(where, f"route {task}.{ctx} -> {group!r} names no context of the plugin "
                                   f"(contexts: {manifest['contexts']})")


def check_tensors(manifest: dict, tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """The tensor file holds exactly the tensors the manifest lists, with the listed shapes."""
    want = manifest["tensors"]
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing:
        raise _fail(where, f"missing tensor {missing[0]!r} listed in the manifest ({len(missing)} missing in all)")
    if extra:
        raise _fail(where, f"tensor {extra[0]!r} is not listed in the manifest ({len(extra)} unexpected in all)")
    bad = [k for k, shape in want.items() if list(tensors[k].shape) != shape]
    if bad:
        raise _fail(where, f"tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, manifest says {want[bad[0]]}")


def check_compatible(manifest: dict, *, base_lm_fingerprint: str | None = None, model: nn.Module | None = None,
                     tensors: dict[str, torch.Tensor] | None = None, where: str = "") -> None:
    """Raise :class:`PluginError` naming why a plugin does not fit: an unknown format version, another base LM
    (``base_lm_fingerprint``, see :func:`lm_fingerprint`), or — given a ContextModel ``model`` and the plugin
    ``tensors`` — another adaptor kind or rank, other contexts, a missing tensor or a shape that differs."""
    _check_version(manifest, where)
    if base_lm_fingerprint is not None and manifest.get("base_lm_fingerprint") != base_lm_fingerprint:
        raise _fail(where, f"the plugin was trained on another base LM ({manifest.get('base_lm')!r}, fingerprint "
                           f"{manifest.get('base_lm_fingerprint')}) than this one (fingerprint {base_lm_fingerprint})")
    if model is None:
        return
    kind = manifest["adaptor"]["kind"]
    if model.adaptor.name != kind:
        raise _fail(where, f"the plugin holds {kind} adaptors but the model has {model.adaptor.name} adaptors")
    if list(model.vocab.names) != list(manifest["contexts"]):
        raise _fail(where, f"the plugin's contexts {manifest['contexts']} differ from the model's "
                           f"{list(model.vocab.names)}; build the model with the plugin's contexts")
    if tensors is None:
        return
    prefix = adaptor_prefix(manifest)
    for name, own in model.adaptor_state_dict().items():
        key = prefix + name
        if key not in tensors:
            raise _fail(where, f"missing tensor {key!r}: the model adapts {name.rpartition('.')[0]!r}, the plugin "
                               "does not (same placement?)")
        if tuple(tensors[key].shape) != tuple(own.shape):
            raise _fail(where, f"tensor {key!r} has shape {list(tensors[key].shape)} but the model needs "
                               f"{list(own.shape)} (contexts, rank, widths)")


# -------------------------------------------------------------------------------------------- read/write
def save_plugin(out_dir: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``manifest`` (plus format version and tensor shapes) as a plugin directory."""
    out = Path(out_dir)
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    validate_manifest(manifest, where=f"plugin for {out}")  # never write a plugin that cannot be loaded
    bad = first_nonfinite(tensors)
    if bad is not None:  # a diverged training must not leave a plugin that looks like a result
        raise PluginError(f"plugin for {out}: tensor {bad!r} holds non-finite values (nan or inf); refusing to "
                          "write it (did the training diverge? lower train.lr)")
    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / TENSORS, metadata={"format": "mtcpeft-plugin", "version": str(FORMAT_VERSION)})
        write_json(manifest, tmp / MANIFEST)
    return out


def read_manifest(plugin_dir: str | os.PathLike) -> dict:
    """The validated manifest of a plugin directory (tensors not read)."""
    d = Path(plugin_dir)
    recover_dir(d)  # a save killed between its two renames left complete copies beside it
    if not (d / MANIFEST).is_file() or not (d / TENSORS).is_file():
        raise PluginError(f"{d} is not a plugin directory: it needs {MANIFEST} and {TENSORS}")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise PluginError(f"{d / MANIFEST} is not valid JSON: {e}") from None
    validate_manifest(manifest, where=str(d))
    return manifest


def load_plugin(plugin_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) after validating the manifest and that the tensors match it."""
    d = Path(plugin_dir)
    manifest = read_manifest(d)
    try:
        tensors = load_file(str(d / TENSORS))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise PluginError(f"{d / TENSORS} is not a readable safetensors file: {e}") from None
    check_tensors(manifest, tensors, where=str(d))
    return manifest, tensors


def context_plugin_manifest(model: nn.Module, task: str, placement: str | list[str], base_lm: str = "",
                            task_contexts: list[str] | None = None, generated_context: str | None = None) -> dict:
    """The manifest of an LM-only plugin of a :class:`~mtcpeft.core.model.ContextModel` (tensors under ``lm.model.``).

    ``placement``: what the model was built with (``"AF"`` or module-name patterns), so that it can be rebuilt.
    """
    return {
        "task": task,
        "contexts": list(model.vocab.names),
        "task_contexts": list(task_contexts or model.vocab.names),
        "generated_context": generated_context,
        "adaptor": {**model.adaptor.to_dict(), "full_finetune": False},
        "placement": placement if isinstance(placement, str) else ",".join(placement),
        "targets": list(model.target_names),
        "base_lm": base_lm,
        "base_lm_fingerprint": lm_fingerprint(model),
    }


def save_context_plugin(out_dir: str | os.PathLike, model: nn.Module, task: str, placement: str | list[str],
                        base_lm: str = "", prefix: str = DEFAULT_PREFIX, **extra) -> Path:
    """Save the adaptors of an LM-only ContextModel as a plugin (text-only tasks, tests, PEFT imports)."""
    manifest = {**context_plugin_manifest(model, task, placement, base_lm), **extra}
    if prefix != DEFAULT_PREFIX:
        manifest["adaptor_prefix"] = prefix
    tensors = {prefix + k: v.detach() for k, v in model.adaptor_state_dict().items()}
    return save_plugin(out_dir, manifest, tensors)
