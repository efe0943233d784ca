"""Checkpoints of a fused run (:mod:`.fused`): ``<out>/checkpoint`` holds every task's trainable tensors and
optimizer (accelerate's ``save_state``), the process RNG, each task's own random stream and progress, so that
``train.resume=true`` continues exactly where the run stopped. Written as ``checkpoint.tmp`` and swapped in, with
its state file last: a kill at any moment leaves a complete checkpoint (see
:func:`~mtcpeft.training.trainer.recover_checkpoint`, shared with single-task runs)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from mtcpeft.io import swap_dir, write_json
from .trainer import CHECKPOINT, STATE_FILE, CheckpointMismatchError, DivergenceError, TrainState, recover_checkpoint

STREAMS = "task_rng.pt"  # each task's own torch random stream


def keep_trainable(model: torch.nn.Module):
    """accelerate save_state pre-hook: checkpoints hold the trainable tensors only, not copies of the frozen LM."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def hook(models, weights, _dir):
        for w in weights:
            for k in [k for k in w if k not in trainable]:
                del w[k]
    return hook


def check_finite(trainer) -> None:
    """Refuse to checkpoint non-finite trainable tensors (an update may overflow while its loss was finite); every
    rank learns of a bad tensor on any rank, so all stop."""
    bad = next((f"{name}: {n}" for name, run in trainer.runs.items()
                for n, p in trainer.task_model(name).named_parameters()  # ZeRO-3: this rank's shard
                if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())), None)
    flags = trainer.acc.gather(torch.tensor([bad is not None], dtype=torch.float32, device=trainer.acc.device))
    if bool(flags.any()):
        raise DivergenceError(f"fused training diverged: trainable tensor {bad or '(on another process)'} is not "
                              f"finite after fused step {trainer.global_step}; lower that task's train.lr or set "
                              "its train.max_grad_norm (nothing diverged was saved)")


def save_fused_checkpoint(trainer, root: str | Path) -> None:
    """Every rank calls it (accelerate and DeepSpeed save collectively)."""
    check_finite(trainer)
    acc, final = trainer.acc, Path(root) / CHECKPOINT
    tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
    if acc.is_main_process:
        recover_checkpoint(root)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save({name: run.rng.state for name, run in trainer.runs.items()}, tmp / STREAMS)
        write_json({"global_step": trainer.global_step,  # last: from here on tmp is a complete checkpoint
                    "tasks": {name: asdict(run.state) for name, run in trainer.runs.items()}}, tmp / STATE_FILE)
        swap_dir(tmp, final, old)
    acc.wait_for_everyone()


def load_fused_checkpoint(trainer, root: str | Path) -> bool:
    """Restore the newest complete checkpoint of ``root``; False (nothing changed) when there is none."""
    acc = trainer.acc
    if acc.is_main_process:
        recover_checkpoint(root)
    acc.wait_for_everyone()
    ckpt = Path(root) / CHECKPOINT
    if not (ckpt / STATE_FILE).is_file():
        acc.print(f"no fused checkpoint in {ckpt}: starting from scratch")
        return False
    saved = json.loads((ckpt / STATE_FILE).read_text())
    if sorted(saved.get("tasks", ())) != sorted(trainer.runs):
        raise CheckpointMismatchError(f"the checkpoint in {ckpt} is of tasks {sorted(saved.get('tasks', ()))}, this run "
                                      f"trains {sorted(trainer.runs)}; resume with the same --tasks or train into "
                                      "another --out")
    check_fits(trainer, ckpt)
    # our checkpoints hold the trainable tensors only (strict=False); DeepSpeed saves and loads its own way
    acc.load_state(str(ckpt), **({} if trainer.zero is not None else {"strict": False}))
    streams = torch.load(ckpt / STREAMS, weights_only=False)
    trainer.global_step = saved["global_step"]
    for name, run in trainer.runs.items():
        run.state = TrainState(**saved["tasks"][name])
        run.rng.state = streams[name]
    acc.print(f"resumed from {ckpt}: fused step {trainer.global_step}")
    return True


def check_fits(trainer, ckpt: Path) -> None:
    """Refuse a checkpoint whose trainable tensors (names, shapes) are not this run's, naming one that differs
    (another adaptor kind, rank or targets for a task), before accelerate fails deep inside ``load_state``."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    own = {n: list(p.shape) for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters() if p.requires_grad}
    differ = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
    if differ:
        k = differ[0]
        raise CheckpointMismatchError(
            f"the checkpoint in {ckpt} was made with other adaptors: {len(differ)} trainable tensors differ, e.g. "
            f"{k} is {saved.get(k, 'absent')} there and {own.get(k, 'absent')} here; resume with the configs the "
            "checkpoint was made with, or train into another --out")
