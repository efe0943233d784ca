"""The runner under parallel training and sweeps (mtcpeft/experiments/runner.py, status.py): slots, exit codes and
error lines, and the status board reading the progress.json a real (tiny) training run writes."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from mtcpeft.experiments.runner import RunPlan, last_error_line, run_plans

ROOT = Path(__file__).resolve().parents[2]
TRAIN_TASK = ROOT / "launch" / "train_task.py"
ENV = {"OMP_NUM_THREADS": "1", "MTCPEFT_THREADS": "1"}
# a run that takes a moment and leaves results.json, as a finished training run does
FINISH = "import sys, time; time.sleep(0.5); open(sys.argv[1], 'w').write('{}')"


def quick_plans(tmp_path: Path, n: int) -> list[RunPlan]:
    plans = []
    for i in range(n):
        out = tmp_path / f"r{i}"
        out.mkdir()
        plans.append(RunPlan(f"r{i}", out, tmp_path / f"r{i}.log", [sys.executable, "-c", FINISH,
                                                                   str(out / "results.json")], env=dict(ENV)))
    return plans


def test_runs_train_at_once_and_finished_runs_are_skipped(tmp_path):
    plans = quick_plans(tmp_path, 4)
    plans[3].action = "done"  # finished earlier: not started again
    runs, interrupted = run_plans(plans, stream=io.StringIO(), poll=0.05)
    assert not interrupted and [r.plan.name for r in runs] == ["r0", "r1", "r2"]
    assert all(r.status == "done" and r.exit_code == 0 and r.error == "" for r in runs)
    assert not (tmp_path / "r3.log").exists()
    assert max(r.start for r in runs) < min(r.end for r in runs)  # they overlapped in time


def test_a_failed_run_reports_its_exit_status_and_error_line(tmp_path):
    """A user error of the child (run_cli's ``error:`` line, exit status 2); a run that exits 0 without results."""
    bad = RunPlan("bad", tmp_path / "bad", tmp_path / "bad" / "sweep.log", [sys.executable, str(TRAIN_TASK),
                                                                          "--task", "nope"], env=dict(ENV))
    empty = RunPlan("empty", tmp_path / "empty", tmp_path / "empty.log", [sys.executable, "-c", "pass"], env=dict(ENV))
    (run, run2), _ = run_plans([bad, empty], stream=io.StringIO(), poll=0.05)
    assert (run.status, run.exit_code) == ("failed", 2)
    assert run.error.startswith("unknown task 'nope'; known: caption, qa, vqa; ")
    assert last_error_line(bad.log) == "error: " + run.error
    assert (run2.status, run2.exit_code, run2.error) == ("failed", 0, "ended without writing results.json")


@pytest.mark.slow
def test_status_board_reads_the_progress_file_of_a_real_run(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    plan = RunPlan("cap", out, tmp_path / "cap.log", [sys.executable, str(TRAIN_TASK), "--task", "caption",
                                                     *tiny_overrides(tiny_lm_dir, out), "train.mixed_precision=no"],
                   env=dict(ENV))
    board = io.StringIO()
    (run,), interrupted = run_plans([plan], stream=board, status_every=0.1, poll=0.05)
    assert not interrupted and run.status == "done", (tmp_path / "cap.log").read_text()[-3000:]
    progress = json.loads((out / "progress.json").read_text())
    total = progress["total_steps"]
    assert progress["status"] == "done" and progress["step"] == total > 0 and progress["epoch"] == 2
    history = json.loads((out / "results.json").read_text())["history"]
    assert progress["val_ppl"] == pytest.approx(history[-1]["val_ppl"])
    lines = board.getvalue().splitlines()
    # while it ran, the board showed the steps the trainer wrote (not scraped from its log)
    steps = [int(m[1]) for ln in lines if (m := re.match(rf"cap\s+running\s+\S+\s+step (\d+)/{total} ", ln))]
    assert steps and steps == sorted(steps) and any(0 < s for s in steps), lines
    assert re.match(r"cap\s+done\s+\S+\s+exit 0$", lines[-1]), lines
