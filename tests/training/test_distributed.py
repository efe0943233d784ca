"""Joint fine-tuning on 2 CPU processes: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3, each asserting it really ran
distributed (world size, distributed type, ZeRO stage) and that both ranks ended with identical trainable tensors;
a DeepSpeed checkpoint saved mid-run and resumed ends where an uninterrupted run does.

The CPU routes (see configs/accelerate/*.yaml): DDP needs ACCELERATE_USE_CPU=1 with --multi_gpu semantics (the
ddp.yaml config); DeepSpeed must run WITHOUT ACCELERATE_USE_CPU (the trainer passes the gloo backend itself).
Each process gets one thread (two processes on two cores with default threading oversubscribe).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.joint import joint_overrides, unified_plugin

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EXPECTED = {"ddp": ("DistributedType.MULTI_CPU", None), "zero2": ("DistributedType.DEEPSPEED", 2),
            "zero3": ("DistributedType.DEEPSPEED", 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_joint(engine: str, plugin: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)
    if engine == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # gloo DDP on CPU; DeepSpeed must not see this variable
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "launch" / "train_joint.py"), "--plugin", str(plugin),
           "--tasks", "vqa,caption,qa", "--eval-limit", "0", *joint_overrides(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{engine} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def plugin(tiny_lm_dir, tmp_path_factory):
    return unified_plugin(tiny_lm_dir, tmp_path_factory.mktemp("unified"))


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_joint_training_really_runs_on_two_ranks(engine, plugin, tmp_path):
    r = accelerate_joint(engine, plugin, tmp_path / engine)
    kind, stage = EXPECTED[engine]
    assert r["world_size"] == 2 and r["distributed_type"] == kind and r["zero_stage"] == stage
    assert len(r["rank_digests"]) == 2 and r["rank_digests"][0] == r["rank_digests"][1], "ranks diverged"
    # 3 tasks x 16 examples over 2 ranks x batch 8 -> 3 optimizer steps; every task validated on its own
    assert r["global_step"] == 3
    last = r["history"][-1]
    assert {"val_ppl/vqa", "val_ppl/caption", "val_ppl/qa"} <= set(last)
    assert last["val_ppl"] < r["history"][0]["val_ppl"]
    assert (tmp_path / engine / "plugin" / "adaptor.safetensors").is_file()


def test_deepspeed_checkpoint_resumes_exactly(plugin, tmp_path):
    full = accelerate_joint("zero2", plugin, tmp_path / "full", "train.epochs=2")
    half = tmp_path / "half"
    first = accelerate_joint("zero2", plugin, half, "train.epochs=2", "train.max_steps=4")
    assert first["global_step"] == 4 and first["rank_digests"] != full["rank_digests"]
    assert (half / "checkpoint" / "trainer_state.json").is_file()
    resumed = accelerate_joint("zero2", plugin, half, "train.epochs=2", "train.resume=true")
    assert resumed["global_step"] == full["global_step"] == 6
    assert resumed["rank_digests"] == full["rank_digests"]
