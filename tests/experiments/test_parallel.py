"""Parallel per-task training: the plan (devices, environments, accelerate command lines) checked without running
anything, then launch/train_parallel.py end to end on two tiny caption runs at once."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from conftest import tiny_overrides
from mtcpeft.experiments import devices
from mtcpeft.experiments.devices import Devices, split_evenly, visible_gpus
from mtcpeft.experiments.parallel import RunSpec, parse_runs, plan_runs
from mtcpeft.experiments.runner import PlanError, Run, RunPlan, log_tail
from mtcpeft.experiments.status import progress_text
from mtcpeft.training.progress import write_progress
from tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
CAPTION_CONFIG = ROOT / "configs" / "caption_offline.yaml"
TRAIN_TASK = ROOT / "launch" / "train_task.py"


def planned(specs, devs, out, **kw):
    """plan_runs with what launch/train_parallel.py passes: its train_task.py and the repository's configs."""
    return plan_runs(specs, devs, out, script=TRAIN_TASK, **{"config_dir": ROOT / "configs", **kw})


def accelerate_args(command: list[str]):
    """The command as accelerate itself parses it (an independent reading of what we built)."""
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(command[3:])


def two_captions(names=("capA", "capB")):
    return [RunSpec(n, "caption") for n in names]


# ------------------------------------------------------------------------------------------------ run names
def test_parse_runs_names_and_errors():
    known = TASKS.names()
    assert parse_runs("caption, qa", known) == [RunSpec("caption", "caption"), RunSpec("qa", "qa")]
    assert parse_runs("caption:capA,caption:capB", known) == two_captions()
    with pytest.raises(PlanError, match=f"unknown task 'nope'; known: {', '.join(known)}$"):
        parse_runs("caption,nope", known)
    with pytest.raises(PlanError, match="'caption' is used twice"):
        parse_runs("caption,caption", known)
    with pytest.raises(PlanError, match="letters, digits"):
        parse_runs("caption:a/b", known)
    with pytest.raises(PlanError, match="no tasks"):
        parse_runs(" , ", known)


def test_split_evenly_by_hand():
    assert split_evenly(list(range(8)), 3) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert split_evenly([0, 1], 2) == [(0,), (1,)]
    assert split_evenly([4, 5, 6, 7, 8], 1) == [(4, 5, 6, 7, 8)]


# --------------------------------------------------------------------------------------------------- GPUs
def test_visible_gpus_follow_an_existing_mask(monkeypatch):
    assert visible_gpus(3, {}) == ("0", "1", "2")
    assert visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "3, 5,7"}) == ("3", "5")  # torch sees the first 2
    assert visible_gpus(0, {"CUDA_VISIBLE_DEVICES": ""}) == ()

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,6,7")
    assert devices.detect_devices() == Devices("gpu", ("2", "3", "6", "7"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.detect_devices() == Devices("cpu", tuple(str(c) for c in sorted(os.sched_getaffinity(0))))


def test_gpu_groups_are_disjoint_with_distinct_ports(tmp_path):
    plans = planned(two_captions(), Devices("gpu", ("2", "3", "6", "7")), tmp_path, per_task=2)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2,3", "6,7"]
    assert [p.gpus for p in plans] == [("2", "3"), ("6", "7")]
    ports = [p.port for p in plans]
    assert len(set(ports)) == 2 and all(isinstance(x, int) and x > 0 for x in ports)
    for plan, port in zip(plans, ports):
        a = accelerate_args(plan.command)
        assert a.multi_gpu and not a.cpu and a.num_processes == 2 and a.main_process_port == port
        assert a.training_script == str(ROOT / "launch" / "train_task.py")
        assert a.training_script_args == ["--task", "caption", "--config", str(CAPTION_CONFIG),
                                          f"output_dir={tmp_path.resolve() / plan.name}"]
        assert plan.log == tmp_path.resolve() / f"{plan.name}.log"
        assert not {"OMP_NUM_THREADS", "MTCPEFT_THREADS", "ACCELERATE_USE_CPU"} & set(plan.env)
        assert plan.cpus is None and plan.threads is None


def test_one_gpu_per_task_is_a_single_process_without_port(tmp_path):
    specs = parse_runs("caption,qa,vqa", TASKS.names())
    plans = planned(specs, Devices("gpu", ("0", "1", "2")), tmp_path)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2"]
    for p in plans:
        a = accelerate_args(p.command)
        assert a.num_processes == 1 and not a.multi_gpu and not a.cpu and p.port is None
        assert a.training_script_args[:4] == ["--task", p.task, "--config", str(ROOT / "configs" /
                                                                                f"{p.task}_offline.yaml")]


def test_not_enough_gpus_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    specs = parse_runs("caption,qa,vqa", TASKS.names())
    with pytest.raises(PlanError, match=r"need 6 GPUs, 4 visible \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        planned(specs, Devices("gpu", ("0", "1", "2", "3")), tmp_path, per_task=2)
    with pytest.raises(PlanError, match="need 3 GPUs, 2 visible"):
        planned(specs, Devices("gpu", ("0", "1")), tmp_path)


# ---------------------------------------------------------------------------------------------------- CPU
def test_cpu_cores_split_into_disjoint_pinned_shares(tmp_path):
    specs = parse_runs("caption:a,caption:b,caption:c", TASKS.names())
    plans = planned(specs, Devices("cpu", tuple(str(c) for c in range(8))), tmp_path)
    assert [p.cpus for p in plans] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    for p, threads in zip(plans, (3, 3, 2)):
        assert p.threads == threads
        assert {p.env[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MTCPEFT_THREADS")} == {str(threads)}
        a = accelerate_args(p.command)
        assert a.cpu and not a.multi_gpu and a.num_processes == 1 and a.num_cpu_threads_per_process == threads
        assert "ACCELERATE_USE_CPU" not in p.env and "CUDA_VISIBLE_DEVICES" not in p.env
    assert plans[0].shell().startswith("OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 MTCPEFT_THREADS=3 taskset -c 0-2 ")
    assert "taskset -c 6-7 " in plans[2].shell()


def test_cpu_ddp_uses_accelerate_use_cpu_with_multi_gpu_and_distinct_ports(tmp_path):
    plans = planned(two_captions(), Devices("cpu", tuple(str(c) for c in range(8))), tmp_path, per_task=2)
    assert [p.cpus for p in plans] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    ports = [p.port for p in plans]
    assert len(set(ports)) == 2
    for p, port in zip(plans, ports):
        assert p.env["ACCELERATE_USE_CPU"] == "1" and p.env["MTCPEFT_THREADS"] == "2"  # 4 cores / 2 processes
        a = accelerate_args(p.command)
        # `--cpu --num_processes 2` would start ONE process: the CPU route is --multi_gpu + ACCELERATE_USE_CPU
        assert a.multi_gpu and not a.cpu and a.num_processes == 2 and a.main_process_port == port
        assert a.num_cpu_threads_per_process == 2
    for port in ports:  # free when planned
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_more_runs_than_cores_share_them_one_thread_each(tmp_path):
    specs = parse_runs("caption:a,caption:b,caption:c", TASKS.names())
    plans = planned(specs, Devices("cpu", ("0", "1")), tmp_path)
    assert all(p.cpus is None and p.threads == 1 and p.env["MTCPEFT_THREADS"] == "1" for p in plans)
    assert all("share 2 core(s)" in p.notes[0] for p in plans)


def test_python_launcher_runs_the_script_directly_and_refuses_ddp(tmp_path):
    (plan,) = planned([RunSpec("c", "caption")], Devices("cpu", ("0", "1")), tmp_path, launcher="python")
    assert plan.command == [sys.executable, str(ROOT / "launch" / "train_task.py"), "--task", "caption",
                            "--config", str(CAPTION_CONFIG), f"output_dir={tmp_path.resolve() / 'c'}"]
    assert plan.cpus == (0, 1) and plan.env["MTCPEFT_THREADS"] == "2"
    with pytest.raises(PlanError, match="--launcher accelerate for --devices-per-task 2"):
        planned([RunSpec("c", "caption")], Devices("cpu", ("0", "1")), tmp_path, launcher="python", per_task=2)


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_for_all_then_per_run_then_output_dir(tmp_path):
    specs = [RunSpec("capA", "caption"), RunSpec("capB", "caption"), RunSpec("q", "qa")]
    plans = planned(specs, Devices("cpu", ("0", "1", "2")), tmp_path, launcher="python",
                      common=["train.epochs=1", "seed=3"], sets=["capB.train.lr=1e-3", "caption.seed=4"])
    args = {p.name: p.command[p.command.index(str(CAPTION_CONFIG if p.task == "caption" else
                                                     ROOT / "configs" / "qa_offline.yaml")) + 1:] for p in plans}
    out = tmp_path.resolve()
    assert args["capA"] == ["train.epochs=1", "seed=3", "seed=4", f"output_dir={out / 'capA'}"]
    assert args["capB"] == ["train.epochs=1", "seed=3", "train.lr=1e-3", "seed=4", f"output_dir={out / 'capB'}"]
    assert args["q"] == ["train.epochs=1", "seed=3", f"output_dir={out / 'q'}"]
    with pytest.raises(PlanError, match="no run or task named 'capC'; runs: capA, capB, q"):
        planned(specs, Devices("cpu", ("0",)), tmp_path, sets=["capC.seed=1"])
    with pytest.raises(PlanError, match="must look like RUN.key=value"):
        planned(specs, Devices("cpu", ("0",)), tmp_path, sets=["seed=1"])
    with pytest.raises(PlanError, match="output_dir is set per run"):
        planned(specs, Devices("cpu", ("0",)), tmp_path, common=["output_dir=x"])
    with pytest.raises(PlanError, match=r"vqa_offline.yaml does not exist"):
        planned([RunSpec("v", "vqa")], Devices("cpu", ("0",)), tmp_path, config_dir=tmp_path)


def test_progress_text_reads_the_runs_progress_file(tmp_path):
    run = Run(RunPlan("r", tmp_path / "r", tmp_path / "r.log"))
    run.start = time.time()
    assert progress_text(run.progress()) == "starting"
    write_progress(run.plan.output_dir, status="running", step=5, total_steps=12, epoch=0.4, epochs=2, loss=2.31,
                   val_ppl=9.1)
    assert progress_text(run.progress()) == "step 5/12 (42%)  epoch 0.4/2  loss 2.310  val ppl 9.100"
    run.start = time.time() + 10  # a progress file older than the run is a previous run's
    assert run.progress() == {} and progress_text(run.progress()) == "starting"
    log = tmp_path / "r.log"  # a failed run's report shows its log's tail; progress bars' updates are lines
    log.write_text("$ python train_task.py\nbefore training: val perplexity 9.1\n"
                   "train:   0%|          | 0/12 [00:00<?, ?step/s]\rtrain:  42%|####      | 5/12 [00:01<00:01]")
    assert log_tail(log, 2) == ["train:   0%|          | 0/12 [00:00<?, ?step/s]",
                                "train:  42%|####      | 5/12 [00:01<00:01]"]


# ------------------------------------------------------------------------------------------------ end to end
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # CPU plan
SCRIPT = str(ROOT / "launch" / "train_parallel.py")


def tiny(lm_dir: str) -> list[str]:
    return [o for o in tiny_overrides(lm_dir, "unused") if not o.startswith("output_dir=")]


def parallel_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow
def test_two_runs_train_at_once_each_on_its_own_cores(tiny_lm_dir, tmp_path):
    out = tmp_path / "par"
    proc = parallel_cli("--tasks", "caption:capA,caption:capB", "--out", str(out), "--status-every", "5",
                        "--", *tiny(tiny_lm_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"capA", "capB"} and summary["ok"]
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // 2)
    for name, row in runs.items():
        assert row["status"] == "done" and row["exit_code"] == 0
        results = json.loads((out / name / "results.json").read_text())
        assert row["best_val_ppl"] == results["best_val_ppl"] and results["task"] == "caption"
        assert (out / name / "plugin" / "adaptor.safetensors").is_file()
        assert row["plugin"] == str((out / name / "plugin").resolve())
        log = (out / f"{name}.log").read_text()
        assert f"MTCPEFT_THREADS={share} " in log.splitlines()[0]  # the plan, as the child was started
        assert f"processes: 1 (DistributedType.NO), {share} threads each" in log  # what the trainer really used
        assert f"output_dir={(out / name).resolve()}" in log.splitlines()[0]
        progress = json.loads((out / name / "progress.json").read_text())  # what the status board read
        assert progress["status"] == "done" and progress["step"] == progress["total_steps"] > 0
        assert any(ln.split()[:2] == [name, "done"] for ln in proc.stderr.splitlines())  # the board's last word
    # they really overlapped in time
    assert max(r["started"] for r in runs.values()) < min(r["ended"] for r in runs.values())
    table = proc.stdout.splitlines()
    assert table[0].split() == ["run", "task", "status", "exit", "wall", "best", "val", "ppl", "plugin"]
    assert any(ln.split()[:4] == ["capA", "caption", "done", "0"] for ln in table)
    assert any(ln.split()[:4] == ["capB", "caption", "done", "0"] for ln in table)
    print(f"parallel wall time of two tiny runs: {summary['wall_s']:.1f} s")


@pytest.mark.slow
def test_a_failing_run_leaves_the_other_to_finish(tiny_lm_dir, tmp_path):
    out = tmp_path / "par"
    missing = tmp_path / "no_such_lm"
    proc = parallel_cli("--tasks", "caption:good,caption:bad", "--out", str(out), "--launcher", "python",
                        "--set", f"bad.model.lm={missing}", *tiny(tiny_lm_dir))
    assert proc.returncode == 1, proc.stderr[-3000:]
    runs = {r["run"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs["good"]["status"] == "done" and (out / "good" / "plugin" / "adaptor.safetensors").is_file()
    assert runs["bad"]["status"] == "failed" and runs["bad"]["exit_code"] == 2  # run_cli's user-error status
    assert runs["bad"]["plugin"] is None and runs["bad"]["best_val_ppl"] is None
    assert "bad failed (exit code 2); last lines of" in proc.stderr
    child_error = [ln for ln in (out / "bad.log").read_text().splitlines() if ln.startswith("error:")]
    assert len(child_error) == 1 and str(missing) in child_error[0]
    assert f"    {child_error[0]}" in proc.stderr.splitlines()  # the log's tail is shown


def test_bad_override_or_task_stops_before_anything_starts(tmp_path):
    out = tmp_path / "par"
    proc = parallel_cli("--tasks", "caption:capA,caption:capB", "--out", str(out), "--set", "capB.train.lrr=1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: run 'capB': unknown config key 'train.lrr'; did you mean 'train.lr'?")
    assert not out.exists()
    proc = parallel_cli("--tasks", "caption,nope", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: unknown task 'nope'; known: {', '.join(TASKS.names())}"


@pytest.mark.slow
def test_interrupt_stops_every_child(tiny_lm_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "par"
    long_run = [*tiny(tiny_lm_dir), "train.epochs=1000"]
    parent = subprocess.Popen([sys.executable, SCRIPT, "--tasks", "caption:a,caption:b", "--out", str(out), "--",
                               *long_run], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until both runs have their trainer process (accelerate launch's child)
            tree = psutil.Process(parent.pid).children(recursive=True)
            trainers = [p for p in tree if any(a.endswith("train_task.py") for a in _cmdline(p))
                        and "accelerate.commands.launch" not in _cmdline(p)]
            if len(trainers) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the runs did not start")
        time.sleep(1.0)
        t0 = time.time()
        parent.send_signal(signal.SIGINT)
        _, stderr = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 130, stderr[-2000:]
    assert time.time() - t0 < 30
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and [r["status"] for r in summary["runs"]] == ["interrupted", "interrupted"]
    assert (out / "a.log").read_text().rstrip().splitlines()[-1].startswith("[train_parallel] interrupted")


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:  # gone already
        return []
