"""One runner for many training runs: parallel per-task training (:mod:`.parallel`) and sweeps (:mod:`.sweep`).

A :class:`RunPlan` is a command, its environment and its files (:mod:`.devices` places plans on GPUs or cores);
the runner never guesses what to run: the launch scripts hand it their ``train_task.py``. :func:`run_plans`
starts the plans together as subprocesses (a finished run not again; a sweep hands it one plan at a time), shows
one status line per run read from the run's own ``progress.json`` (:mod:`.status`), collects exit codes and
errors, and stops every child cleanly on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import previous_run, read_json
from mtcpeft.training.progress import read_progress

RESULTS_FILE = "results.json"  # what a finished training run leaves (launch/train_task.py)


class PlanError(MtcpeftError, ValueError):
    """The requested runs cannot be planned (names, devices, overrides); the message says what to change."""


@dataclass
class RunPlan:
    """One run: what to start, in which environment (``env`` is set on top of the parent's), writing where."""

    name: str
    output_dir: Path
    log: Path  # the child's stdout and stderr
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    task: str = ""
    config: Any = None  # the RunConfig the run trains with
    action: str = "train"  # train | resume | done (finished: not started again)
    processes: int = 1
    gpus: tuple[str, ...] = ()
    cpus: tuple[int, ...] | None = None  # CPU affinity of the child (None: not pinned)
    threads: int | None = None  # CPU threads per process
    port: int | None = None
    notes: list[str] = field(default_factory=list)  # warnings worth showing before the start

    def devices(self) -> str:
        if self.gpus:
            return "GPU " + ",".join(self.gpus)
        cores = "cores " + _ranges(self.cpus) if self.cpus else "all cores"
        return f"{cores}, {self.threads} thread{'s' if self.threads != 1 else ''}/process"

    def shell(self) -> str:
        """The command as a shell line (environment and pinning included), to rerun one run by hand."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items() if k != "PYTHONUNBUFFERED")
        pin = f"taskset -c {_ranges(self.cpus)} " if self.cpus else ""
        return f"{env + ' ' if env else ''}{pin}{shlex.join(self.command)}"


def read_results(output_dir: Path) -> dict:
    """What a finished run wrote to its ``results.json`` ({} when it wrote nothing)."""
    return read_json(Path(output_dir) / RESULTS_FILE)


def resume_action(output_dir: Path) -> str:
    """done (results written), resume (an interrupted run left a checkpoint or plugin) or train."""
    if (output_dir / RESULTS_FILE).is_file():
        return "done"
    return "resume" if previous_run(output_dir) else "train"


# -------------------------------------------------------------------------------------------------- running
class Run:
    """A plan being run: its process (leader of a session of its own), times, status and, once ended, why."""

    def __init__(self, plan: RunPlan):
        self.plan, self.proc = plan, None
        self.start = self.end = None
        self.status = "pending"  # pending | running | done | failed | interrupted
        self.error = ""  # why it failed, in one line

    @property
    def exit_code(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def elapsed(self) -> float:
        return ((self.end or time.time()) - self.start) if self.start else 0.0

    def progress(self) -> dict:
        """What the run's trainer last wrote to its ``progress.json`` ({} before it wrote any)."""
        return read_progress(self.plan.output_dir, since=self.start) if self.start else {}

    def launch(self) -> None:
        p = self.plan
        p.output_dir.parent.mkdir(parents=True, exist_ok=True)
        p.log.parent.mkdir(parents=True, exist_ok=True)
        pin = (lambda: os.sched_setaffinity(0, p.cpus)) if p.cpus and hasattr(os, "sched_setaffinity") else None
        self.start, self.status = time.time(), "running"
        with open(p.log, "wb") as log:  # the child holds its own copy of the descriptor
            log.write(f"$ {p.shell()}\n".encode())
            log.flush()
            try:
                # a session of its own: a terminal's Ctrl-C reaches the parent only, which stops children in order
                self.proc = subprocess.Popen(p.command, env={**os.environ, **p.env}, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=pin)
            except OSError as e:
                self.end, self.status, self.error = time.time(), "failed", f"could not start: {e}"
                log.write(f"{self.error}\n".encode())

    def poll(self) -> bool:
        """True when the run has just ended (its status then says how)."""
        if self.status != "running" or self.proc.poll() is None:
            return False
        self.end, rc = time.time(), self.proc.returncode
        self.status = "done" if rc == 0 and (self.plan.output_dir / RESULTS_FILE).is_file() else "failed"
        if rc < 0:  # killed: the log ends wherever the run was, not with an error
            self.error = f"killed by {signal.Signals(-rc).name}"
        elif rc:
            line = last_error_line(self.plan.log)
            self.error = line.removeprefix("error: ") if line else f"exit status {rc}"
        elif self.status == "failed":
            self.error = f"ended without writing {RESULTS_FILE}"
        return True


def run_plans(plans: Sequence[RunPlan], *, stream: TextIO | None = None, status_every: float = 30.0,
              poll: float = 0.5) -> tuple[list[Run], bool]:
    """Start every plan whose action is not ``done``, wait for all, showing a status board on ``stream``.
    Returns the runs and whether they were interrupted: Ctrl-C (or SIGTERM to this process) stops every child
    and marks the runs still going as ``interrupted``; a failed run leaves the others running."""
    from .status import StatusBoard

    stream = stream or sys.stderr
    runs = [Run(p) for p in plans if p.action != "done"]
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    board, interrupted = None, False
    try:
        for run in runs:
            run.launch()
        board = StatusBoard(runs, stream, status_every)
        while any(r.status == "running" for r in runs):
            board.update()
            try:  # back as soon as the first running run ends (or after ``poll`` seconds)
                next(r for r in runs if r.status == "running").proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                pass
            for run in runs:
                run.poll()
        board.update(final=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every run ...", file=stream, flush=True)
        stop_runs(runs)
        if board is not None:
            board.update(final=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return runs, interrupted


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _descendants(pid: int) -> list:
    try:
        import psutil  # an accelerate dependency

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        return []


def stop_runs(runs: Sequence[Run], grace: float = 10.0) -> None:
    """SIGINT to each running child's process group (Python exits on it; torchrun stops its workers), then,
    after ``grace`` seconds, SIGKILL to whatever of those process trees is left."""
    running = [r for r in runs if r.proc is not None and r.proc.poll() is None]
    trees = {id(r): _descendants(r.proc.pid) for r in running}  # torchrun's workers have sessions of their own
    for r in running:
        try:
            os.killpg(r.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            r.proc.wait()
        if trees[id(r)]:  # a launcher may exit before its workers: give them the rest of the grace time
            import psutil

            _, alive = psutil.wait_procs(trees[id(r)], timeout=max(0.0, deadline - time.time()))
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        r.end, r.status, r.error = r.end or time.time(), "interrupted", "interrupted"
        with open(r.plan.log, "a") as log:
            log.write(f"\n[{Path(sys.argv[0]).stem}] interrupted: stopped after {r.elapsed():.1f} s\n")


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log; progress bars' carriage-return updates count as lines, blank ones dropped."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [s.rstrip() for s in re.split(r"[\r\n]", text) if s.strip()][-lines:]


def last_error_line(log: Path) -> str:
    """The line that says what went wrong: ``error: ...`` from run_cli, else a traceback's last line."""
    lines = [ln.strip() for ln in log_tail(log, 200) if not ln.startswith("$ ")]  # not the command header
    for ln in reversed(lines):
        if ln.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else ""


def _ranges(cores: Sequence[int] | None) -> str:
    """0,1,2,5 -> '0-2,5' (taskset's spelling)."""
    parts, cores = [], sorted(cores or ())
    for c in cores:
        if parts and c == parts[-1][1] + 1:
            parts[-1][1] = c
        else:
            parts.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)
