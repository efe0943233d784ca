"""Stored-loss regression: a few training steps of a tiny captioning model must reproduce the losses stored in
``tests/fixtures/loss_regression.json`` (as torchtune's recipe regression tests do).

Every other test checks one piece against a reference; this one watches the whole path at once — task packing,
image features, routing, the adaptor arithmetic, loss normalisation, the optimizer and scheduler, the logged values
— so a change anywhere that moves the numbers fails here even when each piece still agrees with its own oracle.
Nothing random comes from a dependency: the LM and encoder weights are drawn from a seeded generator in sorted
parameter order (not by transformers' or timm's initialisers, which may change between releases), the tokenizer is
trained from a fixed corpus and the data are easy-VQA's real images.

If a change is meant to move the numbers (a new default, a fixed bug), regenerate and say why in the commit::

    MTCPEFT_REGEN_LOSSES=1 python -m pytest tests/training/test_loss_regression.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, tiny_overrides

STORED = Path(__file__).resolve().parents[1] / "fixtures" / "loss_regression.json"
RTOL = 2e-4  # summation order across thread counts; a real change moves the losses by far more


def _seeded_(module: torch.nn.Module, std: float, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted name order: norms get ones, biases zeros."""
    g = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def fixed_lm_dir(tmp_path_factory):
    """A tiny Llama + BPE tokenizer + timm test encoder, all with weights that depend on no library's initialiser."""
    import timm
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from support.tokenizer import make_tokenizer

    d = tmp_path_factory.mktemp("fixed_llama")
    cfg = tiny_config("llama")
    cfg.vocab_size = 300
    lm = AutoModelForCausalLM.from_config(cfg)
    _seeded_(lm, std=0.2, seed=11)
    lm.save_pretrained(d)
    make_tokenizer(d)
    encoder = timm.create_model("test_efficientnet", pretrained=False)
    _seeded_(encoder, std=0.1, seed=12)
    save_file(encoder.state_dict(), str(d / "encoder.safetensors"))
    return str(d)


def _train_and_read_logs(lm_dir: str, out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtcpeft.config import load_config
    from mtcpeft.data.task import get_task
    from mtcpeft.training.build import build_datasets, build_task_model
    from mtcpeft.training.trainer import Trainer

    cfg = load_config(None, [*tiny_overrides(lm_dir, out), "train.mixed_precision=no"])
    task = get_task("caption")
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_task_model(cfg, task)
    data = build_datasets(cfg, task, model, tok, layout, progress=False)
    state = Trainer(cfg, model, data["train"][0], data["val"][0]).fit()
    events = EventAccumulator(str(out / "tb")).Reload()
    return {
        "train_loss": [e.value for e in events.Scalars("train/loss")],
        "val_loss": [row["val_loss"] for row in state.history if "val_loss" in row],
    }


def test_a_few_steps_reproduce_the_stored_losses(fixed_lm_dir, tmp_path):
    got = _train_and_read_logs(fixed_lm_dir, tmp_path / "run")
    if os.environ.get("MTCPEFT_REGEN_LOSSES"):
        STORED.write_text(json.dumps({k: [round(v, 6) for v in vs] for k, vs in got.items()}, indent=1) + "\n")
        pytest.skip(f"regenerated {STORED.name}")
    want = json.loads(STORED.read_text())
    assert len(got["train_loss"]) == len(want["train_loss"]) == 12, "2 epochs of 6 steps, logged every step"
    assert len(got["val_loss"]) == len(want["val_loss"]) == 3, "before training and after each epoch"
    for key in ("train_loss", "val_loss"):
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                   torch.tensor(want[key], dtype=torch.float64), rtol=RTOL, atol=0,
                                   msg=lambda m: f"{key} moved from the stored values: {m}")
    assert want["val_loss"][-1] < want["val_loss"][0], "the stored run itself must learn"
