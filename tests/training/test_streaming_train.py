"""Training from a stream (``data.streaming=true``): each task trains a few steps from local files read as a stream
(across epoch ends); a stream without ``train.max_steps`` is refused; a run stopped at a checkpoint and resumed ends
with the uninterrupted run's parameters, bitwise; two DDP processes read disjoint shards and end identical."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from mtcpeft.config import ConfigError
from mtcpeft.data.task import get_task
from mtcpeft.training.build import build_task_model
from mtcpeft.data.dataset import EmptySplitError
from mtcpeft.training.streams import build_run_data, build_train_stream
from mtcpeft.training.trainer import STREAM_STATE, Trainer
from support.runs import tiny_run_config, trainable
from support.streams import caption_parquets, qa_parquets, vqa_imagefolder

ROOT = Path(__file__).resolve().parents[2]
STREAM = ["data.source=hf", "data.train_limit=null", "data.hf_val_split=train", "data.val_limit=4",
          "data.seq_len=96", "data.streaming=true", "train.mixed_precision=no", "train.batch_size=4"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def _trainer(lm_dir, out, task_name, folder, *overrides):
    cfg = tiny_run_config(lm_dir, out, f"task={task_name}", *STREAM, f"data.hf_path={folder}", *overrides)
    task = get_task(task_name)
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_task_model(cfg, task)
    train, val, reports = build_run_data(cfg, task, model, tok, layout, progress=False)
    return Trainer(cfg, model, train, val), reports


@pytest.mark.parametrize("task_name, make, steps", [("caption", caption_parquets, 6), ("qa", qa_parquets, 8),
                                                    ("vqa", vqa_imagefolder, 3)])
def test_each_task_trains_from_a_stream(tiny_lm_dir, tmp_path, task_name, make, steps):
    trainer, reports = _trainer(tiny_lm_dir, tmp_path / "run", task_name, make(tmp_path), f"train.max_steps={steps}")
    state = trainer.fit()
    assert state.global_step == steps
    assert state.epoch >= 1  # every split here is shorter than the steps: the stream started a new epoch
    assert reports["train"].kept > 0 and reports["val"].kept == 4
    first, last = state.history[0], state.history[-1]
    assert last["step"] == steps and torch.isfinite(torch.tensor(last["val_loss"]))
    assert last["val_ppl"] < first["val_ppl"]


def test_a_stream_without_max_steps_is_refused(tiny_lm_dir, tmp_path):
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "run", "task=qa", *STREAM, f"data.hf_path={qa_parquets(tmp_path)}",
                          "train.max_steps=2")
    task = get_task("qa")
    model, tok, layout = build_task_model(cfg, task)
    train, val, _ = build_run_data(cfg, task, model, tok, layout, progress=False)
    cfg.train.max_steps = None  # past the config's own check (library use)
    with pytest.raises(ConfigError, match="stream.*needs train.max_steps"):
        Trainer(cfg, model, train, val)


def test_a_stream_without_usable_examples_stops_saying_why(tiny_lm_dir, tmp_path):
    folder = caption_parquets(tmp_path, n=4, n_files=2, bad_rows=(0, 1, 2, 3))
    cfg = tiny_run_config(tiny_lm_dir, tmp_path / "run", "task=caption", *STREAM, f"data.hf_path={folder}",
                          "train.max_steps=2", "data.hf_val_split=train")
    task = get_task("caption")
    model, tok, layout = build_task_model(cfg, task)
    train = build_train_stream(cfg, task, model, tok, layout)
    with pytest.raises(EmptySplitError, match=r"gave process 0 no usable example: 6 examples read; 4 unreadable "
                                              r"images skipped .*data.hf_path="):
        Trainer(cfg, model, train, None).fit()


def test_an_interrupted_stream_run_resumes_exactly(tiny_lm_dir, tmp_path):
    """24 rows, batch 4: 6 steps an epoch; stopped at step 4 (mid-epoch), resumed to step 9 (into epoch 2)."""
    folder = qa_parquets(tmp_path, n=24, n_files=3)
    full, _ = _trainer(tiny_lm_dir, tmp_path / "full", "qa", folder, "train.max_steps=9", "data.shuffle_buffer=0")
    full.fit()
    first, _ = _trainer(tiny_lm_dir, tmp_path / "half", "qa", folder, "train.max_steps=4", "data.shuffle_buffer=0")
    first.fit()
    assert (tmp_path / "half" / "checkpoint" / STREAM_STATE.format(rank=0)).is_file()
    resumed, _ = _trainer(tiny_lm_dir, tmp_path / "half", "qa", folder, "train.max_steps=9", "data.shuffle_buffer=0",
                          "train.resume=true")
    state = resumed.fit()
    assert state.global_step == 9 and state.epoch == full.state.epoch == 1
    want, got = trainable(full.model), trainable(resumed.model)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert [r["val_ppl"] for r in state.history if r["step"] != 4] == [r["val_ppl"] for r in full.state.history]


def test_train_task_script_streams(tiny_lm_dir, tmp_path, capsys):
    from conftest import tiny_overrides
    from support.cli import run_script

    out = tmp_path / "run"
    code, results, err = run_script("train_task.py", ["--task", "qa", *tiny_overrides(tiny_lm_dir, out), *STREAM,
                                                     f"data.hf_path={qa_parquets(tmp_path)}", "train.max_steps=3"],
                                    capsys)
    assert code == 0, err
    assert results == json.loads((out / "results.json").read_text())
    assert results["global_step"] == 3 and results["data"]["train"]["kept"] >= 12 and results["data"]["val"]["kept"] == 4
    assert (out / "plugin" / "adaptor.safetensors").is_file()


@pytest.mark.slow
def test_two_ddp_processes_read_disjoint_shards_and_end_identical(tiny_lm_dir, tmp_path):
    folder = qa_parquets(tmp_path, n=32, n_files=4)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    from test_distributed import free_port  # noqa: E402  (tests/training is on sys.path under pytest)

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(ROOT / "tests" / "support" / "stream_ddp.py"), tiny_lm_dir, str(folder), str(out),
           "train.max_steps=5", "train.batch_size=2", "data.shuffle_buffer=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert all(r["own_shards"] and r["n_shards"] == 4 and r["steps"] == 5 for r in ranks)
    seen = [{tuple(ids) for ids in r["seen"]} for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) >= 10  # 5 steps of 2 (the split's 16 per process: 2 epochs)
    assert not seen[0] & seen[1], "the processes trained on common examples"
    assert ranks[0]["digest"] == ranks[1]["digest"], "the processes' trainable tensors differ"
