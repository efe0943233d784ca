"""Joint fine-tuning of a unified plugin (:mod:`mtcpeft.plugins.merge`) on mixed-task batches.

Every task encodes its examples with its own contexts; the plugin's routing table maps them, token by token, to
the unified groups (``vqa.question -> qa.question``), so one batch may hold caption, QA and VQA examples and no
adapter is ever switched. Text-only rows of a batch that also holds images carry placeholder image inputs that the
model ignores (only rows with image positions are encoded and projected).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, default_collate

from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.task import offline_config
from mtcpeft.models.vlm import VisionLanguageModel
from mtcpeft.plugins.manifest import JointInfo, Manifest, save_plugin
from mtcpeft.plugins.merge import route_map
from .build import build_datasets

IMAGE_KEYS = ("image_features", "pixel_values")


def task_data_config(task_name: str, joint_cfg, config_dir: str | Path | None = None,
                     overrides: dict[str, str] | None = None):
    """A task's data section: its offline default (:func:`~mtcpeft.data.task.offline_config` in ``config_dir``) or
    ``overrides[task]`` (a YAML path), with the joint run's layout and limits (one seq_len for every task: the rows
    of a mixed batch are stacked)."""
    path = (overrides or {}).get(task_name) or offline_config(task_name, config_dir)
    if not Path(path).is_file():
        raise ConfigError(f"no data config for task {task_name!r}: {path} does not exist; pass --data "
                          f"{task_name}=FILE.yaml")
    cfg = load_config(path)
    cfg.task, cfg.output_dir = task_name, joint_cfg.output_dir
    cfg.model, cfg.adaptor = joint_cfg.model, joint_cfg.adaptor
    for key in ("seq_len", "max_target_tokens", "train_limit", "val_limit", "augment", "cache_features"):
        setattr(cfg.data, key, getattr(joint_cfg.data, key))
    return cfg


def joint_datasets(joint_cfg, tasks: list, model: VisionLanguageModel, tokenizer, manifest: Manifest,
                   config_dir=None, data_overrides: dict[str, str] | None = None, progress: bool = True):
    """{"train": ConcatDataset of every task, "val": {task: dataset}, "reports": {task: {split: DataReport}},
    "layouts": {task: SequenceLayout}}; each task's context ids routed to the plugin's groups."""
    train, val, reports, layouts = [], {}, {}, {}
    for task in tasks:
        if task.uses_images and model.encoder is None:
            raise ConfigError(f"task {task.name!r} needs images but the plugin has no vision encoder/projector; merge "
                              "in a plugin of an image task (e.g. caption)")
        cfg = task_data_config(task.name, joint_cfg, config_dir, data_overrides)
        layout = task.layout(cfg.data, model.encoder)
        routes = route_map(manifest, task.name, task.contexts)
        data = build_datasets(cfg, task, model, tokenizer, layout, progress=progress, routes=routes)
        train.append(data["train"][0])
        val[task.name] = data["val"][0]
        reports[task.name] = {s: r for s, (_, r) in data.items()}
        layouts[task.name] = layout
    return {"train": ConcatDataset(train), "val": val, "reports": reports, "layouts": layouts}


def mixed_collate(items: list[dict]) -> dict:
    """Stack a mixed-task batch: rows without images get zero placeholders of the image rows' shape."""
    for key in IMAGE_KEYS:
        have = [it[key] for it in items if key in it]
        if have and len(have) < len(items):
            blank = torch.zeros_like(have[0])
            items = [it if key in it else {**it, key: blank} for it in items]
    return default_collate(items)


def save_joint_plugin(model: VisionLanguageModel, manifest: Manifest, out_dir: str | Path, tasks: list[str],
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """The unified plugin with the jointly trained tensors (same groups, routes and layout of names)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = state if state is not None else dict(model.named_parameters())
    tensors = {n: t.detach().contiguous() for n, t in state.items() if n in trainable}
    start = manifest.joint.from_task if manifest.joint is not None else manifest.task
    joint = JointInfo(tasks=list(tasks), from_task=start)
    return save_plugin(out_dir, replace(manifest, joint=joint, adaptor_prefix=None), tensors)  # the model's names
