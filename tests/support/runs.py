"""A seconds-long caption training run on the tiny LM of ``conftest.tiny_lm_dir`` (shared by the training tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_overrides
from mtcpeft.config import RunConfig, load_config
from mtcpeft.data.task import get_task
from mtcpeft.training.build import build_datasets, build_task_model
from mtcpeft.training.trainer import Trainer


def tiny_run_config(lm_dir: str, out: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*tiny_overrides(lm_dir, out), *overrides])


def run(cfg, on_best=None):
    task = get_task("caption")
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_task_model(cfg, task)
    data = build_datasets(cfg, task, model, tok, layout, progress=False)
    trainer = Trainer(cfg, model, data["train"][0], data["val"][0], on_best=on_best)
    return trainer, task


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
