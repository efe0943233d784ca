"""Plugins: what a task's training leaves behind, and what the merger composes.

A plugin is a directory:

* ``adaptor.safetensors`` — the trainable tensors: per-context adaptor tensors under ``lm.<module>.<param>``
  (stacked over contexts, leading dim C) and projector weights under ``projector.<name>``;
* ``plugin.json`` — the manifest: format version, task, context vocabulary, adaptor kind and hyper-parameters,
  targeted layers, base LM id and a fingerprint of its frozen weights, vision encoder id, tensor names/shapes.

Written atomically (a complete temporary directory is renamed into place); never pickle. Loading validates the
manifest and the tensor file against each other before anything touches a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .io import save_tensors, write_json

FORMAT_VERSION = 1
TENSORS, MANIFEST = "adaptor.safetensors", "plugin.json"


class PluginError(ValueError):
    """A plugin directory is missing, incomplete, or does not fit the model it is loaded into."""


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


def save_plugin(out_dir: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``manifest`` (plus format version and tensor shapes) as a plugin directory."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_tensors(tensors, tmp / TENSORS, metadata={"format": "mtcpeft-plugin", "version": str(FORMAT_VERSION)})
        write_json(manifest, tmp / MANIFEST)
        old = out.with_name(out.name + ".old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_plugin(plugin_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) after checking the format version and that the tensors match the manifest."""
    d = Path(plugin_dir)
    if not (d / MANIFEST).is_file() or not (d / TENSORS).is_file():
        raise PluginError(f"{d} is not a plugin directory: it needs {MANIFEST} and {TENSORS}")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise PluginError(f"{d / MANIFEST} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PluginError(f"{d} has plugin format version {version!r}; this mtcpeft reads version {FORMAT_VERSION}")
    tensors = load_file(str(d / TENSORS))
    want = manifest.get("tensors", {})
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise PluginError(f"{d}: tensors do not match the manifest (missing {missing[:5]}, unexpected {extra[:5]})")
    bad = [k for k, shape in want.items() if list(tensors[k].shape) != shape]
    if bad:
        raise PluginError(f"{d}: tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, manifest says {want[bad[0]]}")
    return manifest, tensors
