"""The caption trainer end to end on a tiny random LM + tiny timm encoder over easy-VQA images."""
import json

import pytest
import torch

from mtcpeft.plugins.load import load_model
from mtcpeft.training.build import build_task_model, build_datasets, task_plugin
from support.runs import run, tiny_run_config, trainable
from tasks import get_task


def test_few_steps_lower_validation_perplexity_and_leave_a_plugin(tiny_lm_dir, tmp_path):
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "run")
    saved = []

    def on_best(tr):
        saved.append(tr.state.best_epoch)
        task_plugin(tr.acc.unwrap_model(tr.model), cfg, task, tmp_path / "run" / "plugin")

    trainer, task = run(cfg, on_best)
    state = trainer.fit()
    ppl = [row["val_ppl"] for row in state.history]
    assert [row["epoch"] for row in state.history] == [0, 1, 2]  # epoch 0: before any update
    assert ppl[2] < ppl[1] < ppl[0] and ppl[2] < 0.7 * ppl[0]
    assert state.best_epoch == 2 and saved == [1, 2]
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents*")), "tensorboard events"
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == trainer.state.global_step
    # checkpoints hold only the trainable tensors, not the frozen LM
    from safetensors.torch import load_file
    weights = load_file(str(next(ckpt.glob("model*.safetensors"))))
    assert set(weights) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}

    # the plugin rebuilds the same model: same validation perplexity
    loaded = load_model(tmp_path / "run" / "plugin")
    model, manifest = loaded.model, loaded.manifest
    assert manifest.contexts == ["image", "text"] and manifest.adaptor.kind == "lora"
    ref = trainer.acc.unwrap_model(trainer.model).eval()
    batch = next(iter(torch.utils.data.DataLoader(trainer.val_dls[""].dataset, batch_size=4)))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits)


def test_resume_after_interruption_reaches_the_same_parameters(tiny_lm_dir, tmp_path):
    full, _ = run(tiny_run_config(tiny_lm_dir, tmp_path / "full"))
    full.fit()
    want = trainable(full.acc.unwrap_model(full.model))

    part, _ = run(tiny_run_config(tiny_lm_dir, tmp_path / "part", "train.max_steps=4"))  # stops mid-epoch 1 of 6 steps
    part.fit()
    assert part.state.global_step == 4 and part.state.step_in_epoch == 4
    resumed, _ = run(tiny_run_config(tiny_lm_dir, tmp_path / "part", "train.resume=true"))
    resumed.fit()
    got = trainable(resumed.acc.unwrap_model(resumed.model))
    assert resumed.state.global_step == full.state.global_step
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert [r["val_ppl"] for r in resumed.state.history] == pytest.approx([r["val_ppl"] for r in full.state.history])


def test_context_agnostic_and_full_finetune_variants(tiny_lm_dir, tmp_path):
    task = get_task("caption")
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "a", "adaptor.context_agnostic=true")
    model, tok, layout = build_task_model(cfg, task)
    assert model.lm.vocab.names == ("shared",)
    ds = build_datasets(cfg, task, model, tok, layout, splits=("val",), progress=False)["val"][0]
    assert set(ds.tensors["context_ids"].unique().tolist()) == {-1, 0}
    full = build_task_model(tiny_run_config(tiny_lm_dir, tmp_path / "f", "train.mode=full", "adaptor.kind=none"),
                            task)[0]
    n_lm = sum(p.numel() for p in full.lm.parameters())
    assert sum(p.numel() for p in full.lm.parameters() if p.requires_grad) == n_lm
    frozen = build_task_model(tiny_run_config(tiny_lm_dir, tmp_path / "n", "adaptor.kind=none"), task)[0]
    assert not any(p.requires_grad for p in frozen.lm.parameters())
    assert all(p.requires_grad for p in frozen.projector.parameters())
    assert not any(p.requires_grad for p in frozen.encoder.parameters())


def test_full_finetune_plugin_rebuilds_in_full_mode(tiny_lm_dir, tmp_path):
    """A fully fine-tuned LM saves as a plugin whose manifest says so; loading it rebuilds a train.mode=full model
    holding the saved weights (the mode, not an adaptor kind, travels through the manifest)."""
    task = get_task("caption")
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "f", "train.mode=full", "adaptor.kind=none")
    model = build_task_model(cfg, task)[0]
    lm_weight = next(p for n, p in model.named_parameters() if p.requires_grad and n.startswith("lm."))
    with torch.no_grad():
        lm_weight.add_(0.5)
    task_plugin(model, cfg, task, tmp_path / "plugin")
    loaded = load_model(tmp_path / "plugin")
    assert loaded.manifest.adaptor.kind == "none" and loaded.manifest.adaptor.full_finetune is True
    own = dict(loaded.model.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(own[n], p.detach())
