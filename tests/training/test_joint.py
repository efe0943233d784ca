"""Joint fine-tuning on one process: mixed-task batches route every token to its unified group, and a short
joint run validates each task on its own and leaves a unified plugin that keeps its routes."""
import json
from pathlib import Path

import pytest
import torch

from support.joint import joint_overrides, unified_plugin
from mtcpeft.config import load_config
from mtcpeft.plugins.load import load_model
from mtcpeft.training.joint import joint_datasets, mixed_collate
from tasks import get_task


def launch_module(name: str):
    """A launch script as a module (by path: ``evaluate`` would otherwise clash with the pip package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", Path(__file__).resolve().parents[2] / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_mixed_batch_gives_each_row_what_it_gets_alone(tiny_lm_dir, tmp_path):
    plugin = unified_plugin(tiny_lm_dir, tmp_path)
    loaded = load_model(plugin)
    model, tok, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    model.eval()
    cfg = load_config(None, joint_overrides(tmp_path / "joint"))
    tasks = [get_task(n) for n in ("vqa", "caption", "qa")]
    data = joint_datasets(cfg, tasks, model, tok, manifest, Path(__file__).resolve().parents[2] / "configs",
                          progress=False)
    sets = data["train"].datasets
    items = [sets[0][0], sets[1][0], sets[2][0], sets[2][1], sets[0][1]]  # vqa, caption, qa, qa, vqa
    # routed ids: vqa's question tokens use qa's question group, its image tokens caption's image group
    groups = manifest.contexts
    vqa_ctx = {groups[i] for i in items[0]["context_ids"].tolist() if i >= 0}
    assert vqa_ctx == {"caption.image", "qa.question", "qa.answer"}
    batch = mixed_collate(items)
    assert batch["image_features"].shape[0] == 5 and not batch["image_features"][2].any()  # text row: placeholder
    with torch.no_grad():
        mixed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, item in enumerate(items):
            alone = model(**{k: v for k, v in mixed_collate([item]).items() if k != "labels"}).logits[0]
            live = item["attention_mask"].bool()
            torch.testing.assert_close(mixed[row][live], alone[live], atol=1e-5, rtol=1e-5)


def test_short_joint_run_validates_each_task_and_keeps_routes(tiny_lm_dir, tmp_path):
    train_joint = launch_module("train_joint")

    plugin = unified_plugin(tiny_lm_dir, tmp_path)
    out = tmp_path / "joint"
    r = train_joint.main(["--plugin", str(plugin), "--tasks", "vqa,qa", "--eval-limit", "4",
                          *joint_overrides(out), "train.epochs=2"])
    first, last = r["history"][0], r["history"][-1]
    assert {"val_ppl/vqa", "val_ppl/qa"} <= set(last) and "val_ppl/caption" not in last
    assert last["val_ppl/vqa"] < first["val_ppl/vqa"] and last["val_ppl/qa"] < first["val_ppl/qa"]
    assert r["world_size"] == 1 and r["metrics"]["vqa"]["count"] == 4 and "f1" in r["metrics"]["qa"]
    saved = json.loads((out / "plugin" / "plugin.json").read_text())
    merged = json.loads((plugin / "plugin.json").read_text())
    assert saved["routes"] == merged["routes"] and saved["contexts"] == merged["contexts"]
    assert saved["joint"]["tasks"] == ["vqa", "qa"]
    # the jointly trained plugin loads again as a unified model (round trip of the routed groups)
    manifest = load_model(out / "plugin").manifest
    assert manifest.routes["vqa"]["question"] == "qa.question"


def test_evaluating_a_task_through_the_unified_plugin_equals_its_own_plugin(tiny_lm_dir, tmp_path):
    """Merge exactness end to end: launch/evaluate.py on the merged plugin, routed for qa, gives the qa plugin's
    own perplexity and generations."""
    evaluate_cli = launch_module("evaluate")

    from support.joint import LAYOUT

    unified = unified_plugin(tiny_lm_dir, tmp_path)
    common = ["--task", "qa", "--limit", "6", "--batch-size", "3", *LAYOUT]
    own = evaluate_cli.main([*common, "--plugin", str(tmp_path / "qa" / "plugin"), "--out", str(tmp_path / "own.json")])
    merged = evaluate_cli.main([*common, "--plugin", str(unified), "--out", str(tmp_path / "merged.json")])
    assert merged["perplexity"]["ppl"] == pytest.approx(own["perplexity"]["ppl"], rel=1e-5)
    assert [s["generated"] for s in merged["samples"]] == [s["generated"] for s in own["samples"]]
    assert merged["metrics"]["count"] == own["metrics"]["count"] == 6
