"""Several tasks' adaptor trainings at the same time on disjoint devices (Context-PEFT, Figure 7: caption and QA
adaptors are trained separately and in parallel, then merged).

Each run is ``launch/train_task.py --task TASK`` in its own process tree, started through ``accelerate launch``
(or plain ``python``), writing ``<out>/<run>/`` and logging to ``<out>/<run>.log``:

- GPUs: the visible ids (``CUDA_VISIBLE_DEVICES`` respected) are cut into disjoint groups of N, one per run; the
  child sees only its group. N > 1: ``accelerate launch --multi_gpu --num_processes N --main_process_port P``
  with a distinct free port P per run (two DDP groups on one port would join each other's rendezvous).
- CPU: the cores are cut into disjoint shares; each child is pinned to its share (``sched_setaffinity``, like
  ``taskset``) and told its thread count (OMP/MKL_NUM_THREADS, MTCPEFT_THREADS read by
  :func:`mtcpeft.training.trainer.configure_cpu_threads`): two processes with default threading on two cores each start
  one thread per core and run several times slower. N > 1 on CPU is ``ACCELERATE_USE_CPU=1 accelerate launch
  --multi_gpu --num_processes N`` (``--cpu --num_processes N`` starts ONE process).

Plan building (:func:`parse_runs`, :func:`plan_runs` and the helpers they call) is pure: it decides commands,
environments and devices without starting anything. :func:`run_parallel` starts the plans, shows one status line
per run, stops every child cleanly on Ctrl-C, and writes ``<out>/summary.json``.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from mtcpeft.data.task import offline_config
from mtcpeft.errors import MtcpeftError
from mtcpeft.io import write_json

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "launch" / "train_task.py"
LAUNCHERS = ("accelerate", "python")
RUN_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a directory and log-file name, and the prefix of --set RUN.key=value


class ParallelPlanError(MtcpeftError, ValueError):
    """The requested runs cannot be planned (names, devices, overrides); the message says what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: a registered task, under a run name (its directory and log name)."""

    name: str
    task: str


@dataclass(frozen=True)
class Devices:
    """What the runs share: GPU ids as CUDA_VISIBLE_DEVICES spells them, or CPU core numbers."""

    kind: str  # "gpu" | "cpu"
    ids: tuple[str, ...]


@dataclass
class RunPlan:
    """Everything one child needs; ``env`` holds only what is set on top of the parent's environment."""

    name: str
    task: str
    command: list[str]
    env: dict[str, str]
    output_dir: Path
    log: Path
    config: Path
    overrides: list[str]
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


# ------------------------------------------------------------------------------------------------ planning
def parse_runs(text: str, known: Sequence[str]) -> list[RunSpec]:
    """``"caption,qa"`` or ``"caption:capA,caption:capB"`` (TASK:RUN-NAME; the name defaults to the task)."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        task, _, name = item.partition(":")
        task, name = task.strip(), (name.strip() or task.strip())
        if task not in known:
            raise ParallelPlanError(f"unknown task {task!r}; known: {', '.join(sorted(known))}")
        if not RUN_NAME.fullmatch(name):
            raise ParallelPlanError(f"run name {name!r} must be letters, digits, '_' or '-' (it names a directory)")
        if any(s.name == name for s in specs):
            raise ParallelPlanError(f"run name {name!r} is used twice; name the runs: --tasks {task}:{name}A,"
                                    f"{task}:{name}B")
        specs.append(RunSpec(name, task))
    if not specs:
        raise ParallelPlanError("no tasks given; pass --tasks caption,qa (or TASK:RUN-NAME pairs)")
    return specs


def visible_gpus(count: int, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The ids of the ``count`` GPUs torch sees, as the parent's CUDA_VISIBLE_DEVICES names them (a child's
    CUDA_VISIBLE_DEVICES is read relative to the machine, not to the parent's own mask)."""
    env = os.environ if env is None else env
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return tuple(str(i) for i in range(count))
    return tuple(s.strip() for s in mask.split(",") if s.strip())[:count]


def detect_devices() -> Devices:
    """GPUs if torch sees any, else the CPU cores this process may run on."""
    import torch  # late: planning from given Devices needs no torch

    n = torch.cuda.device_count()
    if n:
        return Devices("gpu", visible_gpus(n))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return Devices("cpu", tuple(str(c) for c in cores))


def split_evenly(items: Sequence, parts: int) -> list[tuple]:
    """Contiguous chunks whose sizes differ by at most one, larger first: 8 items in 3 -> 3, 3, 2."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(tuple(items[start:end]))
        start = end
    return out


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free now (all held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_overrides(specs: Sequence[RunSpec], common: Sequence[str], sets: Sequence[str]) -> dict[str, list[str]]:
    """Per run: the overrides for every run, then its ``--set RUN.key=value`` ones (RUN may also be a task name,
    for all its runs). ``output_dir`` is refused: each run writes ``<out>/<run>``."""
    per = {s.name: list(common) for s in specs}
    for text in sets:
        prefix, dot, override = text.partition(".")
        if not dot or "=" not in override:
            raise ParallelPlanError(f"--set {text!r} must look like RUN.key=value (e.g. --set qa.train.lr=1e-4)")
        targets = [s.name for s in specs if s.name == prefix] or [s.name for s in specs if s.task == prefix]
        if not targets:
            raise ParallelPlanError(f"--set {text!r}: no run or task named {prefix!r}; runs: "
                                    f"{', '.join(s.name for s in specs)}")
        for name in targets:
            per[name].append(override)
    for name, overrides in per.items():
        if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
            raise ParallelPlanError(f"run {name!r}: output_dir is set per run (<out>/{name}); choose it with --out")
    return per


def accelerate_command(script_args: list[str], processes: int, cpu: bool, port: int | None,
                       threads: int | None, python: str = sys.executable) -> list[str]:
    """``accelerate launch`` of train_task.py; the defaults it would warn about are passed explicitly."""
    cmd = [python, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:  # on CPU together with ACCELERATE_USE_CPU=1 in the environment (see the module docstring)
        cmd += ["--multi_gpu", "--main_process_port", str(port)]
    elif cpu:
        cmd += ["--cpu"]
    if threads is not None:  # accelerate sets OMP_NUM_THREADS from this
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    return cmd + [str(TRAIN_SCRIPT), *script_args]


def plan_runs(specs: Sequence[RunSpec], devices: Devices, out: str | os.PathLike, *, per_task: int = 1,
              launcher: str = "accelerate", config_dir: str | os.PathLike = ROOT / "configs",
              common: Sequence[str] = (), sets: Sequence[str] = (), ports: Sequence[int] | None = None,
              python: str = sys.executable, overwrite: bool = False) -> list[RunPlan]:
    """The command, environment, devices and files of every run; nothing is started. ``overwrite``: each run
    replaces a previous run in its directory (``train_task.py --overwrite``)."""
    if per_task < 1:
        raise ParallelPlanError(f"--devices-per-task must be 1 or more, got {per_task}")
    if launcher not in LAUNCHERS:
        raise ParallelPlanError(f"unknown launcher {launcher!r}; choose {' or '.join(LAUNCHERS)}")
    if launcher == "python" and per_task > 1:
        raise ParallelPlanError(f"--launcher python starts one process per run; use --launcher accelerate for "
                                f"--devices-per-task {per_task}")
    k = len(specs)
    if devices.kind == "gpu":
        if k * per_task > len(devices.ids):
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ParallelPlanError(
                f"{k} run(s) x {per_task} GPU(s) each need {k * per_task} GPUs, {len(devices.ids)} visible"
                f"{f' (CUDA_VISIBLE_DEVICES={mask})' if mask is not None else ''}; "
                "lower --devices-per-task or run fewer tasks at once")
        shares: list[tuple] = [devices.ids[i * per_task:(i + 1) * per_task] for i in range(k)]
    else:
        cores = [int(c) for c in devices.ids]
        shares = split_evenly(cores, k) if len(cores) >= k else [()] * k
    if per_task == 1:
        ports = [None] * k  # one process per run: no process group, no port
    elif ports is None:
        ports = free_ports(k)
    elif len(set(ports)) != k or len(ports) != k:
        raise ParallelPlanError(f"{k} runs need {k} distinct ports, got {list(ports)}")
    out = Path(out).resolve()
    overrides = run_overrides(specs, common, sets)
    plans = []
    for spec, share, port in zip(specs, shares, ports):
        config = offline_config(spec.task, config_dir)
        if not config.is_file():
            raise ParallelPlanError(f"no config for task {spec.task!r}: {config} does not exist; add it or pass "
                                    "--config-dir DIR holding <task>_offline.yaml")
        run_dir = out / spec.name
        args = ["--task", spec.task, "--config", str(config), *(["--overwrite"] if overwrite else []),
                *overrides[spec.name], f"output_dir={run_dir}"]
        env = {"PYTHONUNBUFFERED": "1"}  # the log follows the run as it goes
        plan = RunPlan(spec.name, spec.task, [], env, run_dir, out / f"{spec.name}.log", config,
                       overrides[spec.name], processes=per_task, port=port)
        if devices.kind == "gpu":
            plan.gpus = tuple(share)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
        else:
            if share:
                plan.cpus = tuple(share)
            else:
                plan.notes.append(f"{k} runs share {len(devices.ids)} core(s): expect each to run slower")
            plan.threads = max(1, len(share) // per_task)
            if per_task > len(share):
                plan.notes.append(f"{per_task} processes on {max(len(share), 1)} core(s): one thread each, "
                                  "oversubscribed")
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MTCPEFT_THREADS"):
                env[var] = str(plan.threads)
            if per_task > 1:
                env["ACCELERATE_USE_CPU"] = "1"
        if launcher == "python":
            plan.command = [python, str(TRAIN_SCRIPT), *args]
        else:
            plan.command = accelerate_command(args, per_task, devices.kind == "cpu", port, plan.threads, python)
        plans.append(plan)
    return plans


def check_configs(plans: Sequence[RunPlan]) -> None:
    """Load every run's config with its overrides and check its output directory (as train_task.py will), so a
    typo or a previous run in the way stops everything before anything starts."""
    from mtcpeft.config import ConfigError, load_config
    from mtcpeft.io import UnsafeWriteError, prepare_run_dir

    for p in plans:
        try:
            cfg = load_config(p.config, [*p.overrides, f"output_dir={p.output_dir}"])
            prepare_run_dir(p.output_dir, resume=cfg.train.resume, overwrite="--overwrite" in p.command,
                            check_only=True)
        except UnsafeWriteError as e:
            raise ParallelPlanError(f"run {p.name!r}: {e} (train_parallel.py: --overwrite, or -- train.resume=true)") \
                from None
        except ConfigError as e:
            raise ParallelPlanError(f"run {p.name!r}: {e}") from None


def _ranges(cores: Sequence[int] | None) -> str:
    """0,1,2,5 -> '0-2,5' (taskset's spelling)."""
    parts, cores = [], sorted(cores or ())
    for c in cores:
        if parts and c == parts[-1][1] + 1:
            parts[-1][1] = c
        else:
            parts.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


# -------------------------------------------------------------------------------------------------- running
def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log; progress bars' carriage-return updates count as lines, blank ones dropped."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [s.rstrip() for s in re.split(r"[\r\n]", text) if s.strip()][-lines:]


_BAR = re.compile(r"^(\w[\w ]*?):\s+(\d+)%\|.*?\|\s*(\d+/\d+)")


def progress_text(path: Path) -> str:
    """A short 'what is it doing' from the log: 'train 42% 5/12' for a progress bar, else the last line."""
    tail = [ln.strip() for ln in log_tail(path, 1) if not ln.startswith("$ ")]  # not the command header
    if not tail:
        return "starting"
    m = _BAR.match(tail[-1])
    return f"{m[1]} {m[2]}% {m[3]}" if m else tail[-1][:70]


def read_results(run_dir: Path) -> dict:
    """best_val_ppl, best_epoch and plugin of a finished run (None where the run left nothing)."""
    import json

    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        results = {}
    plugin = run_dir / "plugin"
    return {"best_val_ppl": results.get("best_val_ppl"), "best_epoch": results.get("best_epoch"),
            "plugin": str(plugin) if (plugin / "plugin.json").is_file() else None,
            "results": str(run_dir / "results.json") if results else None}


class _Child:
    """A started run: its process (leader of its own process group) and times."""

    def __init__(self, plan: RunPlan):
        self.plan, self.proc, self.error = plan, None, None
        self.start = self.end = None
        self.status = "pending"

    def launch(self) -> None:
        p = self.plan
        p.output_dir.parent.mkdir(parents=True, exist_ok=True)
        pin = (lambda: os.sched_setaffinity(0, p.cpus)) if p.cpus and hasattr(os, "sched_setaffinity") else None
        self.start = time.time()
        with open(p.log, "wb") as log:  # the child holds its own copy of the descriptor
            log.write(f"$ {p.shell()}\n".encode())
            log.flush()
            try:
                # a session of its own: a terminal's Ctrl-C reaches the parent only, which stops children in order
                self.proc = subprocess.Popen(p.command, env={**os.environ, **p.env}, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=pin)
                self.status = "running"
            except OSError as e:
                self.error, self.end, self.status = f"could not start: {e}", time.time(), "failed"
                log.write(f"{self.error}\n".encode())

    def poll(self) -> bool:
        """True once finished (status done / failed)."""
        if self.proc is None or self.end is not None:
            return True
        if self.proc.poll() is None:
            return False
        self.end = time.time()
        self.status = "done" if self.proc.returncode == 0 else "failed"
        return True

    def elapsed(self) -> float:
        return ((self.end or time.time()) - self.start) if self.start else 0.0


def _descendants(pid: int) -> list:
    try:
        import psutil  # an accelerate dependency

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        return []


def stop_children(children: Sequence[_Child], grace: float = 10.0) -> None:
    """SIGINT to each running child's process group (Python exits on it; torchrun stops its workers), then,
    after ``grace`` seconds, SIGKILL to whatever of those process trees is left."""
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    trees = {c.plan.name: _descendants(c.proc.pid) for c in running}  # torchrun's workers have sessions of their own
    for c in running:
        try:
            os.killpg(c.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for c in running:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait()
        tree = trees[c.plan.name]
        if tree:  # a launcher may exit before its workers: give them the rest of the grace time
            import psutil

            _, alive = psutil.wait_procs(tree, timeout=max(0.0, deadline - time.time()))
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        c.end, c.status = c.end or time.time(), "interrupted"
        with open(c.plan.log, "a") as log:
            log.write(f"\n[train_parallel] interrupted: stopped after {c.elapsed():.1f} s\n")


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class _StatusBoard:
    """One line per run: redrawn in place on a terminal (tqdm), else printed on changes and every ``every`` s."""

    def __init__(self, children: Sequence[_Child], stream: TextIO, every: float):
        self.children, self.stream, self.every = children, stream, every
        self.width = max(len(c.plan.name) for c in children)
        self.last = {c.plan.name: None for c in children}
        self.printed = time.time()
        self.bars = None
        if stream.isatty():
            import shutil

            from tqdm import tqdm

            size = shutil.get_terminal_size()  # 80 x 24 where the terminal reports 0 x 0 (tqdm would hide the bars)
            rows = max(size.lines, len(children) + 1)
            self.bars = [tqdm(total=None, position=i, bar_format="{desc}", file=stream, leave=True,
                              ncols=size.columns, nrows=rows) for i in range(len(children))]

    def line(self, c: _Child) -> str:
        detail = progress_text(c.plan.log) if c.status == "running" else (
            f"exit {c.proc.returncode}" if c.proc is not None and c.proc.returncode is not None else c.error or "")
        return f"{c.plan.name:<{self.width}}  {c.status:<11} {_fmt_time(c.elapsed()):>7}  {detail}"

    def update(self, final: bool = False) -> None:
        if self.bars is not None:
            for bar, c in zip(self.bars, self.children):
                bar.set_description_str(self.line(c))
            if final:
                for bar in self.bars:
                    bar.close()
            return
        periodic = time.time() - self.printed >= self.every
        for c in self.children:
            if c.status != self.last[c.plan.name] or periodic:
                print(self.line(c), file=self.stream, flush=True)
                self.last[c.plan.name] = c.status
        if periodic:
            self.printed = time.time()


def _row(c: _Child) -> dict:
    p = c.plan
    row = {"run": p.name, "task": p.task, "status": c.status,
           "exit_code": c.proc.returncode if c.proc is not None else None,
           "wall_s": round(c.elapsed(), 2), "started": c.start, "ended": c.end, "pid": c.proc.pid if c.proc else None,
           **read_results(p.output_dir), "output_dir": str(p.output_dir), "log": str(p.log),
           "devices": p.devices(), "processes": p.processes, "threads": p.threads, "command": p.shell()}
    if c.status == "done" and row["results"] is None:  # exit 0 yet nothing written: not a usable run
        row["status"] = "failed"
    return row


def run_parallel(plans: Sequence[RunPlan], out: str | os.PathLike, *, stream: TextIO | None = None,
                 status_every: float = 30.0, poll: float = 0.5, tail_lines: int = 20) -> dict:
    """Start every plan at once, wait for all, report failures with their log tails; write ``summary.json``.

    A failed run leaves the others running. Ctrl-C (or SIGTERM to the parent) stops every child and marks the
    runs still going as ``interrupted``; the summary is written in every case.
    """
    stream = stream or sys.stderr
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    children = [_Child(p) for p in plans]
    t0 = time.time()
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    board = None
    try:
        for c in children:
            c.launch()
        board = _StatusBoard(children, stream, status_every)
        while not all([c.poll() for c in children]):
            board.update()
            time.sleep(poll)
        board.update(final=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every run ...", file=stream, flush=True)
        stop_children(children)
        if board is not None:
            board.update(final=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    rows = [_row(c) for c in children]
    for row in rows:
        if row["status"] == "failed":
            print(f"\n{row['run']} failed (exit code {row['exit_code']}); last lines of {row['log']}:", file=stream)
            for ln in log_tail(Path(row["log"]), tail_lines):
                print(f"    {ln}", file=stream)
    summary = {"out": str(out), "wall_s": round(time.time() - t0, 2), "interrupted": interrupted,
               "ok": not interrupted and all(r["status"] == "done" for r in rows), "runs": rows}
    write_json(summary, out / "summary.json")
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def summary_table(summary: dict) -> str:
    """The per-run table printed at the end: run, task, status, exit code, wall time, best val ppl, plugin."""
    head = ("run", "task", "status", "exit", "wall", "best val ppl", "plugin")
    rows = [(r["run"], r["task"], r["status"], "-" if r["exit_code"] is None else str(r["exit_code"]),
             _fmt_time(r["wall_s"]), "-" if r["best_val_ppl"] is None else f"{r['best_val_ppl']:.3f}",
             r["plugin"] or "-") for r in summary["runs"]]
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"wall time {_fmt_time(summary['wall_s'])}; summary: {Path(summary['out']) / 'summary.json'}")
    return "\n".join(lines)
