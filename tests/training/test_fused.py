"""Fused per-task training (mtcpeft/training/fused.py): two tiny tasks of different adaptor kinds, one with images
(caption, LoRA) and one text-only (qa, IA3), trained in one process on one frozen LM; each task's plugin equals
the plugin ``launch/train_task.py`` writes when that task trains alone with the same seed and batches."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from support.cli import load_script as launch_module
from mtcpeft.errors import MtcpeftError
from mtcpeft.training.fused import FusedConfigError, shared_copy
from mtcpeft.training.trainer import CheckpointMismatchError

LAYOUT = ["data.seq_len=160", "data.max_target_tokens=20"]  # QA prompts are long
# different kinds, learning rates, clipping and lengths (qa: 2 steps an epoch, so it sits out the fused run's last 2)
KINDS = {"caption": ["adaptor.kind=lora"],
         "qa": ["adaptor.kind=ia3", "train.lr=5e-2", "train.max_grad_norm=0.5", "data.train_limit=16"]}


def common(lm_dir: str, out: Path) -> list[str]:
    """Tiny overrides for both tasks; 24 training examples, batch 8: 3 steps an epoch, 2 epochs; the caption
    projector keeps its dropout (0.1), which each task's own random stream must reproduce."""
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
        assert mine and ref
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{name} {k}: {(mine[k] - ref[k]).abs().max()}"
        r = fused["tasks"][name]
        assert r["best_epoch"] == alone[name]["best_epoch"]
        assert r["global_step"] == alone[name]["global_step"] == {"caption": 6, "qa": 4}[name]
        assert r["best_val_ppl"] == pytest.approx(alone[name]["best_val_ppl"], rel=1e-5)
        assert [row["val_ppl"] for row in r["history"]] == pytest.approx(
            [row["val_ppl"] for row in alone[name]["history"]], rel=1e-5)
        progress = json.loads((root / "fused" / name / "progress.json").read_text())
        assert progress["status"] == "done" and progress["step"] == progress["total_steps"] == r["global_step"]
        assert (root / "fused" / name / "results.json").is_file()
    for name in ("caption", "qa"):  # training changed both (the test would pass vacuously otherwise)
        history = fused["tasks"][name]["history"]
        assert history[-1]["val_ppl"] < history[0]["val_ppl"]


class Killed(Exception):
    pass


def test_an_interrupted_fused_run_resumes_exactly(runs, tiny_lm_dir, monkeypatch, capsys):
    """Killed right after the checkpoint of fused step 4 (qa's 2nd epoch end; caption is 1 batch into its 2nd),
    then resumed with train.resume=true: every plugin ends equal to the uninterrupted run's."""
    import mtcpeft.training.fused as fused_mod

    root, _, fused = runs
    train_fused = launch_module("train_fused.py")
    save = fused_mod.save_fused_checkpoint

    def save_then_die(trainer, out):
        save(trainer, out)
        if trainer.global_step == 4:
            raise Killed

    sets = [f"--set={name}.{o}" for name, over in KINDS.items() for o in over]
    argv = ["--tasks", "caption,qa", "--out", str(root / "resumed"), *sets, *common(tiny_lm_dir, root)]
    monkeypatch.setattr(fused_mod, "save_fused_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_fused.main(argv)
    monkeypatch.setattr(fused_mod, "save_fused_checkpoint", save)
    capsys.readouterr()
    resumed = train_fused.main([*argv, "train.resume=true"])
    assert "fused step 4" in capsys.readouterr().out  # it resumed (a fresh start would end equal too)
    for name in ("caption", "qa"):
        mine, ref = plugin_tensors(root / "resumed" / name), plugin_tensors(root / "fused" / name)
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref), name
        assert resumed["tasks"][name]["history"] == fused["tasks"][name]["history"]
    # resuming with another adaptor kind for a task is refused, naming a tensor that differs
    with pytest.raises(CheckpointMismatchError, match="trainable tensors differ"):
        train_fused.main([*argv, "train.resume=true", "--set=qa.adaptor.kind=bitfit"])


def test_a_ratio_changes_when_a_task_trains_not_what_it_learns(runs, tiny_lm_dir):
    """--ratio caption=1,qa=2: qa trains in every step and caption in every other one while qa runs (then in
    every step); each plugin still equals its task trained alone."""
    from mtcpeft.training.fused import takes_part

    assert [takes_part(1, 2, s) for s in range(4)] == [False, True, False, True]
    assert [takes_part(2, 3, s) for s in range(6)] == [False, True, True, False, True, True]
    root, alone, _ = runs
    sets = [f"--set={name}.{o}" for name, over in KINDS.items() for o in over]
    r = launch_module("train_fused.py").main(["--tasks", "caption,qa", "--out", str(root / "ratio"), "--ratio",
                                              "caption=1,qa=2", *sets, *common(tiny_lm_dir, root)])
    # qa's 4 steps fill fused steps 0-3, with caption's first 2 in steps 1 and 3; caption's other 4 follow
    assert r["global_step"] == 8
    for name in ("caption", "qa"):
        mine, ref = plugin_tensors(root / "ratio" / name), plugin_tensors(root / "alone" / name)
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref), name
        assert r["tasks"][name]["history"] == alone[name]["history"]


def test_manifests_match_the_alone_runs(runs):
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
    with pytest.raises(FusedConfigError, match="mixed_precision"):
        train_fused.main([*base, "--set=qa.train.mixed_precision=bf16"])
    with pytest.raises(FusedConfigError, match="grad_accum"):
        train_fused.main([*base, "train.grad_accum=2"])
    with pytest.raises(FusedConfigError, match="positive integer"):
        train_fused.main([*base, "--ratio", "caption=0"])
    with pytest.raises(MtcpeftError, match="two or more"):
        train_fused.main(["--tasks", "qa", "--out", str(tmp_path)])


def test_a_task_without_label_tokens_takes_no_optimizer_step(tiny_lm_dir, tmp_path):
    """One process: qa's every training batch has no label tokens, so its tensors stay as initialised (AdamW's
    weight decay would move them on an empty step); caption trains as usual."""
    from mtcpeft.training.fused import FusedTrainer, build_fused_model, fused_data
    from mtcpeft.training.trainer import make_accelerator
    from support.fused_ddp import NoLabels
    from tasks import get_task

    train_fused = launch_module("train_fused.py")
    args = train_fused.parse_args(["--tasks", "caption,qa", "--out", str(tmp_path), *common(tiny_lm_dir, tmp_path),
                                   "train.epochs=1", "train.weight_decay=0.1"])
    cfgs = train_fused.task_configs(args)
    tasks_ = {n: get_task(n) for n in cfgs}
    fused, extras = build_fused_model(cfgs, tasks_)
    data = fused_data(cfgs, tasks_, fused, extras, progress=False)
    data["qa"] = (NoLabels(data["qa"][0]), data["qa"][1])
    before = {n: {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
              for n, m in fused.tasks.items()}
    acc = make_accelerator(cfgs["qa"].train, str(tmp_path), log=False, find_unused_parameters=True)
    FusedTrainer(cfgs, tasks_, fused, data, acc, write_plugins=False).fit()
    after = {n: dict(m.named_parameters()) for n, m in fused.tasks.items()}
    assert all(torch.equal(t, after["qa"][k]) for k, t in before["qa"].items())
    assert any(not torch.equal(t, after["caption"][k]) for k, t in before["caption"].items())


def test_a_non_finite_tensor_is_never_checkpointed(tiny_lm_dir, tmp_path, monkeypatch):
    """A task's update that overflows (its loss still finite) stops the run before the checkpoint is written."""
    import mtcpeft.training.fused as fused_mod
    from mtcpeft.training.trainer import DivergenceError

    real = fused_mod.FusedTrainer._advance

    def overflow(self, run, loss):
        if run.name == "qa" and run.done is False and run.state.global_step + 1 == run.total_steps:  # its last
            with torch.no_grad():
                run.params[0].fill_(float("inf"))
        return real(self, run, loss)

    monkeypatch.setattr(fused_mod.FusedTrainer, "_advance", overflow)
    with pytest.raises(DivergenceError, match="qa: .* is not finite"):
        launch_module("train_fused.py").main(["--tasks", "caption,qa", "--out", str(tmp_path / "f"),
                                              *common(tiny_lm_dir, tmp_path), "train.epochs=1",
                                              "train.eval_every_epochs=2"])  # no validation before the save
    assert not (tmp_path / "f" / "checkpoint").exists()


@pytest.mark.slow
def test_two_process_ddp_with_a_task_without_label_tokens_on_one_rank(tiny_lm_dir, tmp_path):
    """2 CPU processes (gloo DDP): qa has no label tokens on rank 1 at every step, and sits out the last steps on
    both ranks (unused parameters); the run neither hangs nor errors, both ranks end with identical tensors, and qa
    still learns from rank 0's tokens."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
           "ACCELERATE_USE_CPU": "1"}
    sets = [f"--set={name}.{o}" for name, over in KINDS.items() for o in over]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(root / "tests" / "support" / "fused_ddp.py"),
           "--tasks", "caption,qa", "--out", str(out), *sets, *common(tiny_lm_dir, tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU"
    assert len(r["rank_digests"]) == 2 and r["rank_digests"][0] == r["rank_digests"][1], "ranks diverged"
    # 24 caption examples over 2 ranks x batch 8: 2 steps an epoch; qa's 16: 1 step an epoch
    assert r["tasks"]["caption"]["global_step"] == 4 and r["tasks"]["qa"]["global_step"] == 2
    qa = r["tasks"]["qa"]["history"]
    assert qa[-1]["val_ppl"] < qa[0]["val_ppl"]
    assert (out / "qa" / "plugin" / "plugin.json").is_file() and (out / "caption" / "plugin" / "plugin.json").is_file()
