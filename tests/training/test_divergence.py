"""A diverged training is stopped, never saved as the best plugin; a run that stops on max_steps mid-epoch still
validates and leaves its plugin (issue 10)."""
import json
import math

import pytest
import torch

from support.cli import error_lines, run_script
from conftest import tiny_lm, tiny_overrides
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.plugins.manifest import PluginError, load_plugin, save_context_plugin
from mtcpeft.training.trainer import DivergenceError, Trainer
from support.runs import run, tiny_run_config


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_script("train_task.py", ["--task", "caption", *tiny_overrides(tiny_lm_dir, out),
                                                "train.lr=1e30", "train.mixed_precision=no"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: training diverged: the loss is") and "lower train.lr (now 1e+30)" in lines[0]
    assert not (out / "plugin").exists() and not (out / "results.json").exists()


def test_a_nan_validation_perplexity_is_never_the_best(tiny_lm_dir, tmp_path, monkeypatch):
    best = []
    trainer, _ = run(tiny_run_config(tiny_lm_dir, tmp_path / "run"), on_best=lambda tr: best.append(tr.state.epoch))
    real = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate",
                        lambda self: {**real(self), "val_ppl": math.nan} if self.state.global_step else real(self))
    with pytest.raises(DivergenceError, match=r"validation perplexity is nan at epoch 1"):
        trainer.fit()
    assert best == [] and trainer.state.best_val_ppl is None
    assert not (tmp_path / "run" / "checkpoint").exists()  # the epoch's checkpoint is not written either


def test_non_finite_trainable_tensors_are_never_checkpointed(tiny_lm_dir, tmp_path):
    trainer, _ = run(tiny_run_config(tiny_lm_dir, tmp_path / "run"))
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = math.inf
    with pytest.raises(DivergenceError, match=f"trainable tensor {name} is not finite"):
        trainer.save_checkpoint()
    assert not any((tmp_path / "run").glob("checkpoint*"))


def test_the_plugin_writer_refuses_non_finite_tensors_naming_them(tmp_path):
    model = ContextModel(tiny_lm("llama"), "question,answer", LoRAConfig(rank=2), "A")
    good = save_context_plugin(tmp_path / "plugin", model, "qa", "A")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    key = sorted(k for k in model.adaptor_state_dict() if k.endswith("lora_B"))[0]
    with torch.no_grad():
        model.adaptor_state_dict()[key][1, 0, 0] = math.nan  # one value of one context
    with pytest.raises(PluginError, match=rf"tensor 'lm\.model\.{key}' holds non-finite values"):
        save_context_plugin(tmp_path / "plugin", model, "qa", "A")
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the good plugin is untouched
    with pytest.raises(PluginError, match="non-finite"):
        save_context_plugin(tmp_path / "other", model, "qa", "A")
    assert not (tmp_path / "other").exists()


def test_max_steps_mid_epoch_validates_and_leaves_a_plugin(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "caption", *tiny_overrides(tiny_lm_dir, out), "train.max_steps=4", "train.mixed_precision=no"]
    code, results, err = run_script("train_task.py", args, capsys)  # 6 steps per epoch: stops mid-epoch 1
    assert code == 0 and not error_lines(err)
    last = results["history"][-1]
    assert last["step"] == 4 and last["epoch"] == pytest.approx(4 / 6, abs=1e-3) and math.isfinite(last["val_ppl"])
    assert results["best_val_ppl"] == min(r["val_ppl"] for r in results["history"][1:])
    manifest, tensors = load_plugin(out / "plugin")
    assert manifest.task == "caption" and all(torch.isfinite(t).all() for t in tensors.values())
    assert json.loads((out / "results.json").read_text())["best_epoch"] == results["best_epoch"]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["global_step"] == 4
