"""The one loader: any plugin directory — a task plugin or a unified (merged / jointly trained) one — to a ready
model.

The plugin is read once (manifest and tensors), its model is built as the manifest describes it (the base LM, the
contexts, the adaptor kind and options, the placement, the vision encoder and projector), the plugin is checked
against that model once (:func:`~mtcpeft.plugins.manifest.check_compatible`, the encoder's fingerprint), and the
tensors are copied in by parameter name. Tasks are handed over by name from the task registry
(:func:`mtcpeft.data.task.get_task`): register them first (the launch scripts import ``tasks``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtcpeft.core.model import ContextModel
from mtcpeft.data.packing import SequenceLayout
from mtcpeft.data.task import TASKS, Task, get_task
from mtcpeft.models.lm import load_lm, load_tokenizer
from mtcpeft.models.projector import Projector
from mtcpeft.models.vision import build_vision_encoder
from mtcpeft.models.vlm import VisionLanguageModel
from .manifest import DEFAULT_PREFIX, Manifest, PluginError, check_compatible, lm_fingerprint, read_tensors
from .merge import PROJECTOR_PREFIX, generated_group, route_map, task_routes


@dataclass
class Loaded:
    """A plugin turned into a model, with what it takes to feed it."""

    model: VisionLanguageModel  # eval mode; adaptors and projector trainable, everything else frozen
    tokenizer: Any  # the base LM's tokenizer (None when the caller passed a loaded LM and no tokenizer)
    layout: SequenceLayout | None  # a task plugin's layout as trained; None for a unified plugin (see layout_for)
    tasks: dict[str, Task]  # the registered tasks the plugin routes, by name
    manifest: Manifest

    @property
    def task(self) -> Task:
        """The task a task plugin was trained for."""
        if self.manifest.unified:
            raise PluginError(f"the unified plugin {self.manifest.task!r} serves several tasks "
                              f"({', '.join(task_routes(self.manifest))}); name one")
        return get_task(self.manifest.task)

    def layout_for(self, task: Task, data) -> SequenceLayout:
        """The layout of ``task``'s rows: the trained one for a task plugin, else the one ``data`` (a data config:
        ``seq_len``, ``max_target_tokens``) asks for (:meth:`~mtcpeft.data.task.Task.layout`)."""
        return self.layout if self.layout is not None else task.layout(data, self.model.encoder)

    def routing(self, task: Task) -> dict:
        """``{"routes", "generated_context"}``: how ``task``'s context ids reach the plugin's groups (the keyword
        arguments of :func:`mtcpeft.evaluation.evaluate.evaluate_task` and ``generate_texts``)."""
        return {"routes": route_map(self.manifest, task.name, task.contexts),
                "generated_context": generated_group(self.manifest, task)}


def load_model(plugin_dir: str | os.PathLike, lm: str | nn.Module | None = None, *, manifest: Manifest | None = None,
               tokenizer: Any = None, check_base: bool = True) -> Loaded:
    """Turn a plugin directory into a ready model (see the module docstring).

    ``lm``: where to load the base LM from (default: the manifest's ``base_lm``), or an already loaded causal LM
    (then the tokenizer is ``tokenizer``). ``manifest``: the plugin's manifest when the caller read it already
    (:meth:`Manifest.read`), so that it is not read twice. ``check_base``: refuse an LM (or vision encoder) other
    than the plugin's base, by fingerprint.
    """
    where = str(plugin_dir)
    manifest = manifest if manifest is not None else Manifest.read(plugin_dir)
    tensors = read_tensors(plugin_dir, manifest)
    if isinstance(lm, nn.Module):
        base = lm
    else:
        name = lm or manifest.base_lm
        base, tokenizer = load_lm(name), tokenizer if tokenizer is not None else load_tokenizer(name)
    ctx_lm = ContextModel(base, manifest.contexts, manifest.adaptor.config(), manifest.target_spec,
                          generated_context=manifest.generated_context)
    if set(ctx_lm.target_names) != set(manifest.targets):
        raise PluginError(f"{where}: the placement {manifest.placement!r} selects other layers on this LM than the "
                          f"plugin adapts (e.g. {manifest.targets[:2]}); was the base LM changed?")
    encoder = projector = None
    if manifest.vision is not None:
        v = manifest.vision
        encoder = build_vision_encoder(v.name, v.pretrained, v.image_size)
    if manifest.projector is not None:
        p = manifest.projector
        projector = Projector(p.in_dim, p.out_dim, p.kind)
    model = VisionLanguageModel(ctx_lm, projector, encoder)
    # taken now, before the plugin's tensors land (a fully fine-tuned LM's own weights change)
    model.fingerprints = {"lm": lm_fingerprint(ctx_lm), "vision": encoder.fingerprint() if encoder else None}
    if check_base:
        check_compatible(manifest, base_lm_fingerprint=model.fingerprints["lm"], where=where)
        if encoder is not None and model.fingerprints["vision"] != v.fingerprint:
            raise PluginError(f"{where} was trained with other {v.name} weights (fingerprints differ)")
    check_compatible(manifest, model=ctx_lm, tensors=tensors, where=where)
    _copy_by_name(model, tensors, manifest.prefix, where)
    tasks = {name: get_task(name) for name in task_routes(manifest) if name in TASKS}
    layout = None
    if manifest.layout is not None and not manifest.unified:
        layout = SequenceLayout.of(manifest.layout, encoder.num_tokens if encoder is not None else 0)
    return Loaded(model.eval(), tokenizer, layout, tasks, manifest)


def _copy_by_name(model: VisionLanguageModel, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    """Copy plugin tensors into the model's parameters of the same name (adaptor names under ``prefix`` are the
    LM's: ``lm.model.<module>.<param>``)."""
    own = dict(model.named_parameters())
    renamed = {k if k.startswith(PROJECTOR_PREFIX) or prefix == DEFAULT_PREFIX else DEFAULT_PREFIX + k[len(prefix):]: v
               for k, v in tensors.items()}
    missing = sorted(set(renamed) - set(own))
    if missing:
        raise PluginError(f"{where}: tensors {missing[:3]} have no place in the rebuilt model")
    with torch.no_grad():
        for k, v in renamed.items():
            own[k].copy_(v)
