"""Fused per-task training (mtcpeft/training/fused.py): two tiny tasks of different adaptor kinds, one with images
(caption, LoRA) and one text-only (qa, IA3), trained in one process on one frozen LM; each task's plugin equals
the plugin ``launch/train_task.py`` writes when that task trains alone with the same seed and batches."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from support.cli import load_script as launch_module
from mtcpeft.errors import MtcpeftError
from mtcpeft.training.fused import FusedConfigError, shared_copy

LAYOUT = ["data.seq_len=160", "data.max_target_tokens=20"]  # QA prompts are long
KINDS = {"caption": ["adaptor.kind=lora"], "qa": ["adaptor.kind=ia3", "train.lr=5e-2", "train.max_grad_norm=0.5"]}


def common(lm_dir: str, out: Path) -> list[str]:
    """Tiny overrides for both tasks; 24 training examples, batch 8: 3 steps an epoch, 2 epochs."""
    over = [o for o in tiny_overrides(lm_dir, out) if not o.startswith(("output_dir=", "data.train_limit",
                                                                          "data.val_limit"))]
    return [*over, *LAYOUT, "data.train_limit=24", "data.val_limit=8", "train.mixed_precision=no",
            "adaptor.dropout=0.0"]


def plugin_tensors(d: Path) -> dict[str, torch.Tensor]:
    files = sorted((d / "plugin").glob("*.safetensors"))
    assert files, f"no plugin in {d}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def runs(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    train_task, train_fused = launch_module("train_task.py"), launch_module("train_fused.py")
    alone = {}
    for name in ("caption", "qa"):
        alone[name] = train_task.main(["--task", name, *common(tiny_lm_dir, root), *KINDS[name],
                                       f"output_dir={root / 'alone' / name}"])
    sets = [f"--set={name}.{o}" for name, over in KINDS.items() for o in over]
    fused = train_fused.main(["--tasks", "caption,qa", "--out", str(root / "fused"), *sets,
                              *common(tiny_lm_dir, root)])
    return root, alone, fused


def test_each_fused_plugin_equals_the_task_trained_alone(runs):
    root, alone, fused = runs
    for name in ("caption", "qa"):
        mine, ref = plugin_tensors(root / "fused" / name), plugin_tensors(root / "alone" / name)
        assert mine.keys() == ref.keys()
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{name} {k}: {(mine[k] - ref[k]).abs().max()}"
        r = fused["tasks"][name]
        assert r["best_epoch"] == alone[name]["best_epoch"]
        assert r["global_step"] == alone[name]["global_step"] == 6
        assert r["best_val_ppl"] == pytest.approx(alone[name]["best_val_ppl"], rel=1e-5)
        assert [row["val_ppl"] for row in r["history"]] == pytest.approx(
            [row["val_ppl"] for row in alone[name]["history"]], rel=1e-5)
        assert (root / "fused" / name / "results.json").is_file()
    for name in ("caption", "qa"):  # training changed both (the test would pass vacuously otherwise)
        history = fused["tasks"][name]["history"]
        assert history[-1]["val_ppl"] < history[0]["val_ppl"]


def test_manifests_match_the_alone_runs(runs):
    import json

    root, _, _ = runs
    for name in ("caption", "qa"):
        a = json.loads((root / "alone" / name / "plugin" / "plugin.json").read_text())
        b = json.loads((root / "fused" / name / "plugin" / "plugin.json").read_text())
        for key in ("task", "contexts", "adaptor", "targets", "base_lm_fingerprint", "layout", "vision", "projector"):
            assert a.get(key) == b.get(key), key
    assert a["adaptor"]["kind"] == "ia3"


def test_shared_copy_holds_the_frozen_weights_once(tiny_lm_dir):
    from mtcpeft.models.lm import load_lm

    lm = load_lm(tiny_lm_dir)
    twin = shared_copy(lm)
    assert twin is not lm and next(twin.modules()) is not next(lm.modules())
    pairs = list(zip(lm.parameters(), twin.parameters()))
    assert pairs and all(a is b for a, b in pairs)


def test_the_fused_model_holds_each_frozen_weight_once(tiny_lm_dir, tmp_path):
    from mtcpeft.training.fused import build_fused_model
    from tasks import get_task

    train_fused = launch_module("train_fused.py")
    args = train_fused.parse_args(["--tasks", "caption,qa", "--out", str(tmp_path), *common(tiny_lm_dir, tmp_path),
                                   "--set=qa.adaptor.kind=ia3"])
    cfgs = train_fused.task_configs(args)
    fused, _ = build_fused_model(cfgs, {n: get_task(n) for n in cfgs})
    cap, qa = (dict(fused.tasks[n].lm.model.named_parameters()) for n in ("caption", "qa"))
    weight = "model.layers.0.mlp.up_proj.weight"  # wrapped by LoRA in caption, bare in qa (IA3 scales down_proj)
    assert cap[weight.replace("up_proj.", "up_proj.base_layer.")] is qa[weight]
    frozen = {id(p) for m in fused.tasks.values() for p in m.lm.parameters() if not p.requires_grad}
    assert len(frozen) == sum(1 for p in fused.tasks["qa"].lm.parameters() if not p.requires_grad)


def test_fused_refuses_what_it_cannot_do(tiny_lm_dir, tmp_path):
    train_fused = launch_module("train_fused.py")
    base = ["--tasks", "caption,qa", "--out", str(tmp_path), *common(tiny_lm_dir, tmp_path)]
    with pytest.raises(FusedConfigError, match="model.lm"):
        train_fused.main([*base, "--set=qa.model.lm=other"])
    with pytest.raises(FusedConfigError, match="grad_accum"):
        train_fused.main([*base, "train.grad_accum=2"])
    with pytest.raises(MtcpeftError, match="two or more"):
        train_fused.main(["--tasks", "qa", "--out", str(tmp_path)])
