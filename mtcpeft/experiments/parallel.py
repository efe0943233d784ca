"""Several tasks' adaptor trainings at the same time on disjoint devices (Context-PEFT, Figure 7: caption and QA
adaptors are trained separately and in parallel, then merged).

Each run is the caller's training script (``launch/train_task.py --task TASK``) in its own process tree, started
through ``accelerate launch`` (or plain ``python``) on its share of the devices (:mod:`.devices`), writing
``<out>/<run>/`` and logging to ``<out>/<run>.log``. Planning (:func:`parse_runs`, :func:`plan_runs`,
:func:`check_configs`) starts nothing; :func:`run_parallel` starts every plan at once on the runner
(:mod:`.runner`) and writes ``<out>/summary.json`` (:func:`.status.summary_table` prints it as a table).
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.task import offline_config
from mtcpeft.io import UnsafeWriteError, prepare_run_dir, write_json
from .devices import LAUNCHERS, Devices, assign_devices, launch_command
from .runner import RESULTS_FILE, PlanError, Run, RunPlan, log_tail, read_results, run_plans

RUN_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a directory and log-file name, and the prefix of --set RUN.key=value


@dataclass(frozen=True)
class RunSpec:
    """One training run: a registered task, under a run name (its directory and log name)."""

    name: str
    task: str


def parse_runs(text: str, known: Sequence[str]) -> list[RunSpec]:
    """``"caption,qa"`` or ``"caption:capA,caption:capB"`` (TASK:RUN-NAME; the name defaults to the task)."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        task, _, name = item.partition(":")
        task, name = task.strip(), (name.strip() or task.strip())
        if task not in known:
            raise PlanError(f"unknown task {task!r}; known: {', '.join(sorted(known))}")
        if not RUN_NAME.fullmatch(name):
            raise PlanError(f"run name {name!r} must be letters, digits, '_' or '-' (it names a directory)")
        if any(s.name == name for s in specs):
            raise PlanError(f"run name {name!r} is used twice; name the runs: --tasks {task}:{name}A,{task}:{name}B")
        specs.append(RunSpec(name, task))
    if not specs:
        raise PlanError("no tasks given; pass --tasks caption,qa (or TASK:RUN-NAME pairs)")
    return specs


def run_overrides(specs: Sequence[RunSpec], common: Sequence[str], sets: Sequence[str]) -> dict[str, list[str]]:
    """Per run: the overrides for every run, then its ``--set RUN.key=value`` ones (RUN may also be a task name,
    for all its runs). ``output_dir`` is refused: each run writes ``<out>/<run>``."""
    per = {s.name: list(common) for s in specs}
    for text in sets:
        prefix, dot, override = text.partition(".")
        if not dot or "=" not in override:
            raise PlanError(f"--set {text!r} must look like RUN.key=value (e.g. --set qa.train.lr=1e-4)")
        targets = [s.name for s in specs if s.name == prefix] or [s.name for s in specs if s.task == prefix]
        if not targets:
            raise PlanError(f"--set {text!r}: no run or task named {prefix!r}; runs: "
                            f"{', '.join(s.name for s in specs)}")
        for name in targets:
            per[name].append(override)
    for name, overrides in per.items():
        if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
            raise PlanError(f"run {name!r}: output_dir is set per run (<out>/{name}); choose it with --out")
    return per


def plan_runs(specs: Sequence[RunSpec], devices: Devices, out: str | os.PathLike, *, script: str | os.PathLike,
              config_dir: str | os.PathLike, per_task: int = 1, launcher: str = "accelerate",
              common: Sequence[str] = (), sets: Sequence[str] = (), ports: Sequence[int] | None = None,
              python: str = sys.executable, overwrite: bool = False) -> list[RunPlan]:
    """The command (``script`` with ``--task --config <config_dir>/<task>_offline.yaml``), environment, devices
    and files of every run; nothing is started. ``overwrite``: each run replaces a previous run in its directory."""
    if per_task < 1:
        raise PlanError(f"--devices-per-task must be 1 or more, got {per_task}")
    if launcher not in LAUNCHERS:
        raise PlanError(f"unknown launcher {launcher!r}; choose {' or '.join(LAUNCHERS)}")
    if launcher == "python" and per_task > 1:
        raise PlanError(f"--launcher python starts one process per run; use --launcher accelerate for "
                        f"--devices-per-task {per_task}")
    out = Path(out).resolve()
    overrides = run_overrides(specs, common, sets)
    plans = [RunPlan(s.name, out / s.name, out / f"{s.name}.log", task=s.task) for s in specs]
    assign_devices(plans, devices, per_task, ports)
    for plan in plans:
        config = offline_config(plan.task, config_dir)
        if not config.is_file():
            raise PlanError(f"no config for task {plan.task!r}: {config} does not exist; add it or pass "
                            "--config-dir DIR holding <task>_offline.yaml")
        run_args = [*overrides[plan.name], f"output_dir={plan.output_dir}"]
        try:
            plan.config = load_config(config, run_args)
        except ConfigError as e:
            raise PlanError(f"run {plan.name!r}: {e}") from None
        args = ["--task", plan.task, "--config", str(config), *(["--overwrite"] if overwrite else []), *run_args]
        plan.command = launch_command(plan, script, args, launcher, python)
    return plans


def check_configs(plans: Sequence[RunPlan]) -> None:
    """Check every run's output directory (as train_task.py will), so a previous run in the way stops everything
    before anything starts."""
    for p in plans:
        try:
            prepare_run_dir(p.output_dir, resume=p.config.train.resume, overwrite="--overwrite" in p.command,
                            check_only=True)
        except UnsafeWriteError as e:
            raise PlanError(f"run {p.name!r}: {e} (train_parallel.py: --overwrite, or -- train.resume=true)") from None


def _row(r: Run) -> dict:
    p = r.plan
    return {"run": p.name, "task": p.task, "status": r.status, "exit_code": r.exit_code, "error": r.error,
            "wall_s": round(r.elapsed(), 2), "started": r.start, "ended": r.end, "pid": r.proc and r.proc.pid,
            **_results(p.output_dir), "output_dir": str(p.output_dir), "log": str(p.log),
            "devices": p.devices(), "processes": p.processes, "threads": p.threads, "command": p.shell()}


def _results(run_dir: Path) -> dict:
    """best_val_ppl, best_epoch and plugin of a finished run (None where the run left nothing)."""
    results, plugin = read_results(run_dir), run_dir / "plugin"
    return {"best_val_ppl": results.get("best_val_ppl"), "best_epoch": results.get("best_epoch"),
            "plugin": str(plugin) if (plugin / "plugin.json").is_file() else None,
            "results": str(run_dir / RESULTS_FILE) if results else None}


def run_parallel(plans: Sequence[RunPlan], out: str | os.PathLike, *, stream: TextIO | None = None,
                 status_every: float = 30.0, poll: float = 0.5, tail_lines: int = 20) -> dict:
    """Start every plan at once, wait for all, report failures with their log tails; write ``summary.json``
    (also after Ctrl-C, which stops every run)."""
    stream = stream or sys.stderr
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs, interrupted = run_plans(plans, stream=stream, status_every=status_every, poll=poll)
    rows = [_row(r) for r in runs]
    for row in (r for r in rows if r["status"] == "failed"):
        print(f"\n{row['run']} failed (exit code {row['exit_code']}); last lines of {row['log']}:", file=stream)
        for ln in log_tail(Path(row["log"]), tail_lines):
            print(f"    {ln}", file=stream)
    summary = {"out": str(out), "wall_s": round(time.time() - t0, 2), "interrupted": interrupted,
               "ok": not interrupted and all(r["status"] == "done" for r in rows), "runs": rows}
    write_json(summary, out / "summary.json")
    return summary
