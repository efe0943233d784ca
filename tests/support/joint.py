"""A unified plugin made of two tiny task plugins (caption: image, text; qa: question, answer) with routes for
vqa, built in seconds: adaptors are random (non-zero) instead of trained, which is all the joint tests need."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_overrides
from mtcpeft.config import load_config
from mtcpeft.plugins.merge import merge_to_dir
from mtcpeft.training.build import build_task_model, task_plugin
from tasks import get_task

LAYOUT = ["data.seq_len=160", "data.max_target_tokens=20"]  # one layout for every task (QA prompts are long)
VQA_ROUTES = ["vqa.image=caption.image", "vqa.question=qa.question", "vqa.answer=qa.answer"]


def random_task_plugin(lm_dir: str, out: Path, task_name: str, seed: int) -> Path:
    cfg = load_config(None, [*tiny_overrides(lm_dir, out), f"task={task_name}", *LAYOUT])
    task = get_task(task_name)
    torch.manual_seed(seed)
    model, _, _ = build_task_model(cfg, task)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 0.05)
    return task_plugin(model, cfg, task, out / "plugin")


def unified_plugin(lm_dir: str, root: Path) -> Path:
    cap = random_task_plugin(lm_dir, root / "caption", "caption", 1)
    qa = random_task_plugin(lm_dir, root / "qa", "qa", 2)
    out, _ = merge_to_dir(root / "merged", [("caption", str(cap)), ("qa", str(qa))], VQA_ROUTES)
    return out


def joint_overrides(out: Path) -> list[str]:
    """A seconds-long joint run: 16 training / 8 validation examples per task, fp32."""
    return [f"output_dir={out}", "data.seq_len=160", "data.max_target_tokens=20", "data.train_limit=16",
            "data.val_limit=8", "train.batch_size=8", "train.epochs=1", "train.lr=1e-2", "train.log_every=1",
            "train.mixed_precision=no", "seed=0"]
