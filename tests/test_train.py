"""The caption trainer end to end on a tiny random LM + tiny timm encoder over easy-VQA images."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from mtcpeft.build import build_captioner, build_image_datasets, captioner_plugin, load_captioner
from mtcpeft.config import RunConfig, load_config
from mtcpeft.train import Trainer
from tasks import get_task
from tokenizer_fixture import make_tokenizer


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny Llama (random weights) with a small BPE tokenizer: a local model folder like a real one."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = tiny_config("llama")
    cfg.vocab_size = 300
    # the LM is frozen, so its output head must be able to express confident predictions: with the default
    # initializer_range (0.02) a 32-wide random head caps every logit near 0.6 and no adaptor can lower perplexity
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    make_tokenizer(d)
    # a local encoder checkpoint, as users pass one: plugins can check and rebuild it
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(d / "encoder.safetensors"))
    return str(d)


def tiny_run_config(lm_dir: str, out: Path, *overrides: str) -> RunConfig:
    return load_config(None, [
        f"model.lm={lm_dir}", "model.vision=test_efficientnet", f"model.vision_pretrained={lm_dir}/encoder.safetensors",
        "model.image_size=64",
        "data.source=easyvqa", "data.train_limit=48", "data.val_limit=16", "data.seq_len=32",
        "data.max_caption_tokens=20", "train.batch_size=8", "train.epochs=2", "train.lr=2e-2", "train.log_every=1",
        f"output_dir={out}", "seed=0", *overrides,
    ])


def run(cfg, on_best=None):
    task = get_task("caption")
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_captioner(cfg, task)
    data = build_image_datasets(cfg, task, model, tok, layout, progress=False)
    trainer = Trainer(cfg, model, data["train"][0], data["val"][0], on_best=on_best)
    return trainer, task


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_few_steps_lower_validation_perplexity_and_leave_a_plugin(tiny_lm_dir, tmp_path):
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "run")
    saved = []

    def on_best(tr):
        saved.append(tr.state.best_epoch)
        captioner_plugin(tr.acc.unwrap_model(tr.model), cfg, task, tmp_path / "run" / "plugin")

    trainer, task = run(cfg, on_best)
    before = trainer.evaluate()["val_ppl"]
    state = trainer.fit()
    ppl = [row["val_ppl"] for row in state.history]
    assert len(ppl) == 2 and ppl[-1] < ppl[0] < before and ppl[-1] < 0.7 * before
    assert state.best_epoch == 2 and saved == [1, 2]
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents*")), "tensorboard events"
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == trainer.state.global_step
    # checkpoints hold only the trainable tensors, not the frozen LM
    from safetensors.torch import load_file
    weights = load_file(str(next(ckpt.glob("model*.safetensors"))))
    assert set(weights) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}

    # the plugin rebuilds the same model: same validation perplexity
    model, tok, layout, task, manifest = load_captioner(tmp_path / "run" / "plugin")
    assert manifest["contexts"] == ["image", "text"] and manifest["adaptor"]["kind"] == "lora"
    ref = trainer.acc.unwrap_model(trainer.model).eval()
    batch = next(iter(torch.utils.data.DataLoader(trainer.val_dl.dataset, batch_size=4)))
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
    model, tok, layout = build_captioner(cfg, task)
    assert model.lm.vocab.names == ("shared",)
    ds = build_image_datasets(cfg, task, model, tok, layout, splits=("val",), progress=False)["val"][0]
    assert set(ds.tensors["context_ids"].unique().tolist()) == {-1, 0}
    full = build_captioner(tiny_run_config(tiny_lm_dir, tmp_path / "f", "adaptor.kind=full"), task)[0]
    n_lm = sum(p.numel() for p in full.lm.parameters())
    assert sum(p.numel() for p in full.lm.parameters() if p.requires_grad) == n_lm
    frozen = build_captioner(tiny_run_config(tiny_lm_dir, tmp_path / "n", "adaptor.kind=none"), task)[0]
    assert not any(p.requires_grad for p in frozen.lm.parameters())
    assert all(p.requires_grad for p in frozen.projector.parameters())
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
