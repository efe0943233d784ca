"""The launch scripts as a user runs them: subprocesses, exit codes, files left behind, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def launch(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_train_task_then_generate(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    launch("train_task.py", "--task", "caption", *tiny_overrides(tiny_lm_dir, out))
    results = json.loads((out / "results.json").read_text())
    assert results["best_epoch"] in (1, 2) and results["world_size"] == 1
    assert results["history"][0]["epoch"] == 0 and results["history"][-1]["val_ppl"] < results["history"][0]["val_ppl"]
    assert results["data"]["train"]["kept"] == 48
    manifest = json.loads((out / "plugin" / "plugin.json").read_text())
    assert manifest["task"] == "caption" and manifest["contexts"] == ["image", "text"]
    assert (out / "plugin" / "adaptor.safetensors").is_file() and (out / "config.yaml").is_file()

    from mtcpeft.data.easyvqa import easyvqa_captions

    image = easyvqa_captions("val")[0]["image"]
    proc = launch("generate.py", "--plugin", str(out / "plugin"), "--image", image, "--max-new-tokens", "6")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(image)]
    assert len(lines) == 1 and lines[0].split("\t")[1].strip()
    proc = launch("generate.py", "--plugin", str(out / "plugin"), "--image", image, "--beams", "3",
                  "--max-new-tokens", "6")
    assert any(ln.startswith(image) for ln in proc.stdout.splitlines())


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_trains_then_evaluates(tiny_lm_dir, tmp_path, name):
    """train_task.py then evaluate.py for each registered task: perplexity falls, the plugin's perplexity on the
    validation split equals the trainer's, and the task's generation metric is computed over every prediction."""
    out = tmp_path / name
    data = ["data.seq_len=160", "data.max_target_tokens=8"] if name != "caption" else []
    # fp32 (the offline configs train with bf16 autocast; evaluate.py runs in fp32) so perplexities can be compared
    launch("train_task.py", "--task", name, *tiny_overrides(tiny_lm_dir, out), *data, "train.mixed_precision=no")
    results = json.loads((out / "results.json").read_text())
    hist = results["history"]
    assert min(row["val_ppl"] for row in hist[1:]) < hist[0]["val_ppl"]
    manifest = json.loads((out / "plugin" / "plugin.json").read_text())
    task = get_task(name)
    assert manifest["task"] == name and manifest["contexts"] == list(task.contexts)
    assert (manifest["projector"] is not None) == task.uses_images

    launch("evaluate.py", "--task", name, "--plugin", str(out / "plugin"), "--limit", "16", "--batch-size", "8",
           *[o for o in tiny_overrides(tiny_lm_dir, out) if o.startswith("data.") and "limit" not in o])
    ev = json.loads((out / "eval_val.json").read_text())
    assert ev["perplexity"]["ppl"] == pytest.approx(results["best_val_ppl"], rel=1e-4)
    assert 1 <= ev["predictions"] <= 16 and ev["data"]["kept"] == 16
    assert task.metric in ev["metrics"] and ev["metrics"][task.metric] >= 0
    assert ev["samples"] and all("generated" in s for s in ev["samples"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task 'nope'; known: caption, qa, vqa"),
        (["--task", "caption", "train.lrr=1"], "did you mean 'train.lr'"),
        (["--task", "caption", "adaptor.kind=loha"], "adaptor.kind"),
    ],
)
def test_bad_command_lines_fail_with_one_clear_line(args, message, tmp_path):
    proc = launch("train_task.py", *args, f"output_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
