"""The one loader: a task plugin and a unified plugin both become ready models through load_model, each reading
plugin.json and adaptor.safetensors exactly once, and compute what the model that was saved computes."""
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_overrides
from support.joint import LAYOUT, VQA_ROUTES
from mtcpeft.config import load_config
from mtcpeft.plugins import manifest as manifest_module
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import MANIFEST, TENSORS, Manifest, PluginError
from mtcpeft.plugins.merge import merge_to_dir
from mtcpeft.training.build import build_datasets, build_task_model, task_plugin
from tasks import get_task


def _random_task_model(lm_dir, out: Path, name: str, seed: int):
    """(model, tokenizer, cfg, task, layout, plugin dir) of an untrained task with random non-zero adaptors."""
    cfg = load_config(None, [*tiny_overrides(lm_dir, out), f"task={name}", *LAYOUT])
    task = get_task(name)
    torch.manual_seed(seed)
    model, tokenizer, layout = build_task_model(cfg, task)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # the projector too: a plugin whose projector were not loaded would differ
    return model.eval(), tokenizer, cfg, task, layout, task_plugin(model, cfg, task, out / "plugin")


def _count_reads(monkeypatch) -> dict[str, int]:
    """Counts of reads of plugin.json and of adaptor.safetensors, whoever reads them."""
    counts = {MANIFEST: 0, TENSORS: 0}
    read_text, load_file = Path.read_text, safetensors.torch.load_file

    def counting_read_text(self, *args, **kwargs):
        counts[MANIFEST] += self.name == MANIFEST
        return read_text(self, *args, **kwargs)

    def counting_load_file(path, *args, **kwargs):
        counts[TENSORS] += Path(path).name == TENSORS
        return load_file(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(safetensors.torch, "load_file", counting_load_file)
    monkeypatch.setattr(manifest_module, "load_file", counting_load_file)
    return counts


def test_task_and_unified_plugins_load_through_one_loader_reading_each_file_once(tiny_lm_dir, tmp_path,
                                                                                  monkeypatch):
    caption, tokenizer, cfg, task, layout, cap_dir = _random_task_model(tiny_lm_dir, tmp_path / "caption", "caption", 1)
    *_, qa_dir = _random_task_model(tiny_lm_dir, tmp_path / "qa", "qa", 2)
    unified_dir, _ = merge_to_dir(tmp_path / "merged", [("caption", str(cap_dir)), ("qa", str(qa_dir))], VQA_ROUTES)
    data = build_datasets(cfg, task, caption, tokenizer, layout, splits=("val",), progress=False)["val"][0]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    with torch.no_grad():
        want = caption(**batch).logits

    counts = _count_reads(monkeypatch)
    own = load_model(cap_dir)
    assert counts == {MANIFEST: 1, TENSORS: 1}
    assert not own.manifest.unified and own.layout == layout and list(own.tasks) == ["caption"]
    assert own.task.name == "caption" and own.tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(own.model(**batch).logits, want, atol=0, rtol=0)

    counts = _count_reads(monkeypatch)
    unified = load_model(unified_dir)
    assert counts == {MANIFEST: 1, TENSORS: 1}
    assert unified.manifest.unified and unified.layout is None and set(unified.tasks) == {"caption", "qa", "vqa"}
    assert unified.layout_for(task, layout) == layout
    routing = unified.routing(task)
    assert routing["generated_context"] == "caption.text"
    routed = {**batch, "context_ids": routing["routes"][batch["context_ids"] + 1]}
    with torch.no_grad():
        torch.testing.assert_close(unified.model(**routed).logits, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(PluginError, match="serves several tasks"):
        unified.task

    # a manifest the caller read already is not read again
    counts = _count_reads(monkeypatch)
    manifest = Manifest.read(cap_dir)
    load_model(cap_dir, manifest=manifest)
    assert counts == {MANIFEST: 1, TENSORS: 1}


def test_a_plugin_of_another_base_lm_is_refused_before_anything_is_copied(tiny_lm_dir, tmp_path):
    from conftest import tiny_lm

    *_, cap_dir = _random_task_model(tiny_lm_dir, tmp_path / "caption", "caption", 1)
    other = tiny_lm("llama", seed=3)
    other.resize_token_embeddings(300)
    with pytest.raises(PluginError, match="trained on another base LM"):
        load_model(cap_dir, other)


def test_a_fully_fine_tuned_plugin_loads_through_the_same_loader(tiny_lm_dir, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_lm_dir, tmp_path), "task=qa", *LAYOUT, "train.mode=full",
                             "adaptor.kind=none"])
    task = get_task("qa")
    model, _, layout = build_task_model(cfg, task)
    with torch.no_grad():
        for p in model.lm.model.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained" LM weights, the plugin's own tensors
    plugin = task_plugin(model.eval(), cfg, task, tmp_path / "plugin")
    loaded = load_model(plugin)
    assert loaded.manifest.adaptor.full_finetune and loaded.layout == layout
    ids = torch.randint(0, 300, (2, 12))
    ctx = torch.zeros_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.lm(ids, context_ids=ctx).logits, model.lm(ids, context_ids=ctx).logits,
                                   atol=0, rtol=0)
