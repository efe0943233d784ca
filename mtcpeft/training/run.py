"""The shared start and end of a training run (``launch/train_task.py``, ``launch/train_joint.py``).

    start_run(cfg, overwrite)                 # output_dir checked, seed set, CPU threads chosen: before any build
    ... build the model (before the Accelerator: under ZeRO-3 transformers would otherwise load the LM partitioned),
        the accelerator and the datasets ...
    trainer, state = fit_run(cfg, model, train, val, acc, save_plugin)   # best validation epoch -> plugin/
    results = {**run_results(trainer, state), ...}
    trainer.finish()
    end_run(acc, results, cfg.output_dir, state)                          # results.json + one closing line
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from mtcpeft.io import prepare_run_dir, write_json
from .trainer import Trainer, TrainState, configure_cpu_threads

# (unwrapped model, plugin directory, full state dict) -> the plugin directory written
SavePlugin = Callable[[torch.nn.Module, Path, dict], Path]


def start_run(cfg, overwrite: bool = False) -> Path:
    """Check ``cfg.output_dir`` (a bad one must not cost a model load and an encoding of every image; processes
    other than the first only check it), seed the run (the trainable initialisation is part of it) and choose the
    CPU thread count. Returns the output directory."""
    out = prepare_run_dir(cfg.output_dir, resume=cfg.train.resume, overwrite=overwrite,
                          check_only=os.environ.get("RANK", "0") != "0")
    set_seed(cfg.seed)
    configure_cpu_threads()
    return out


def fit_run(cfg, model: torch.nn.Module, train, val, acc: Accelerator, save_plugin: SavePlugin,
            collate: Callable | None = None) -> tuple[Trainer, TrainState]:
    """Train ``model``; each new best validation epoch is written by ``save_plugin`` to ``<output_dir>/plugin``."""
    plugin_dir = Path(cfg.output_dir) / "plugin"

    def save_best(trainer: Trainer) -> None:
        state = trainer.acc.get_state_dict(trainer.model)  # gathers ZeRO-3 shards; every rank must call it
        if trainer.acc.is_main_process:
            save_plugin(trainer.acc.unwrap_model(trainer.model), plugin_dir, state)

    trainer = Trainer(cfg, model, train, val, collate=collate, accelerator=acc, on_best=save_best)
    return trainer, trainer.fit()


def run_results(trainer: Trainer, state: TrainState) -> dict:
    """What every run reports in results.json: best epoch and perplexity, history, size and world."""
    acc = trainer.acc
    return {"best_epoch": state.best_epoch, "best_val_ppl": state.best_val_ppl, "history": state.history,
            "global_step": state.global_step, "trainable_parameters": trainer.num_trainable, "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type)}


def end_run(acc: Accelerator, results: dict, output_dir: str | os.PathLike, state: TrainState) -> None:
    """Write ``results.json`` (main process) and print where the best plugin is."""
    out = Path(output_dir)
    if acc.is_main_process:
        write_json(results, out / "results.json")
        acc.print(f"best epoch {state.best_epoch}: val perplexity {state.best_val_ppl:.3f}; plugin: {out / 'plugin'}"
                  if state.best_val_ppl is not None else "no validation: no plugin written")
