"""Ablation sweeps: train every combination of adaptor x placement x context-agnostic/specific (Context-PEFT,
arXiv 2312.08900, Table 1 / Figure 3) or over LoRA ranks (Figure 4), one run after another, resumably.

A sweep file (YAML) names a base run config, overrides shared by every run, and either a ``grid`` of axes (every
combination is a run) or an explicit ``runs`` list::

    base: ../caption_offline.yaml        # a run config; a relative path is read from the sweep file's folder
    task: caption                        # default: the base config's task
    out: runs/sweeps/table1              # default: runs/sweeps/<sweep file name>
    overrides: [data.train_limit=200, train.epochs=1]
    grid: {adaptor: [ia3, bitfit, lora-8], targets: [A, F, AF], agnostic: [true, false]}
    plot: bars                           # bars (Figure 3) | rank (Figure 4) | a list of both

Axes (and the keys of a ``runs`` entry): ``adaptor`` (a kind, ``lora-R`` = LoRA of rank R, ``none`` = the
frozen LM, ``full`` = full fine-tuning: ``train.mode=full``), ``rank``, ``targets``
(A | F | AF | module patterns), ``agnostic`` (true | false), or any dotted config key (``train.lr``). A run is
named after its values (``lora-8_AF_specific``) and trains into ``<out>/<name>/`` with
``launch/train_task.py``. Overrides apply in this order: the sweep's ``overrides``, the command line's, the
run's axis values (an axis always wins).

Resume: a run whose ``results.json`` exists is not trained again; one with a checkpoint but no results (it
crashed or was interrupted) restarts with ``train.resume=true``; a failing run is recorded as failed and the
sweep goes on. A run directory whose ``config.yaml`` differs from the planned config stops the sweep before any
training (stale results would otherwise be mixed in). Tables and plots: :func:`collect_rows`, :mod:`.plots`.
"""
from __future__ import annotations

import csv
import difflib
import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from mtcpeft.config import ConfigError, config_to_dict, load_config
from mtcpeft.io import atomic_path, previous_run, write_json

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "launch" / "train_task.py"
AXES = ("adaptor", "rank", "targets", "agnostic")
FULL = "full"  # adaptor axis value of full fine-tuning (train.mode=full, no adaptor); "none" is the frozen LM
SWEEP_KEYS = ("base", "task", "out", "overrides", "grid", "runs", "plot")
PLOTS = ("bars", "rank")
STATUS_FILE = "sweep_run.json"  # per run: status, wall time, error, command (written by the sweep)
COLUMNS = ("run", "adaptor", "rank", "targets", "agnostic", "trainable_params", "best_val_ppl", "best_epoch",
           "wall_time_s", "status", "error")

TrainFn = Callable[[list[str], Path], None]  # (train_task.py arguments, log file) -> None; raises on failure


class SweepError(ConfigError):
    """A sweep file or its runs cannot be planned; the message names the key or run and the fix (a ConfigError:
    the launch scripts print it as one ``error:`` line)."""


class RunFailed(RuntimeError):
    """One training run ended with an error; the sweep records it and goes on."""


@dataclass
class Sweep:
    """A parsed sweep file: the base config, shared overrides and one mapping of axis values per run."""

    base: Path
    task: str
    out: Path
    overrides: list[str]
    runs: list[dict[str, Any]]  # per run: axis -> value, in axis order (optionally "name")
    plots: list[str] = field(default_factory=lambda: ["bars"])


@dataclass
class RunPlan:
    """One planned run: its name, directory, extra overrides and what to do (train | resume | done)."""

    name: str
    dir: Path
    values: dict[str, Any]
    overrides: list[str]  # axis overrides (applied after the shared ones)
    config: Any  # the RunConfig this run trains with
    action: str = "train"


# -------------------------------------------------------------------------------------------- sweep files
def _suggest(name: str, choices: Sequence[str]) -> str:
    guess = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {guess[0]!r}? " if guess else ""


def axis_overrides(axis: str, value: Any) -> list[str]:
    """Config overrides of one axis value: ``("adaptor", "lora-8")`` -> adaptor.kind=lora, adaptor.rank=8."""
    if axis == "adaptor":
        kind, dash, rank = str(value).partition("-")
        if kind == FULL and not dash:  # Table 1's full fine-tuning row: a training mode, not an adaptor kind
            return ["adaptor.kind=none", "train.mode=full"]
        if not dash:
            return [f"adaptor.kind={kind}"]
        if kind != "lora" or not rank.isdigit() or int(rank) < 1:
            raise SweepError(f"adaptor value {value!r}: only LoRA takes a rank, written lora-R with R >= 1 (lora-8)")
        return ["adaptor.kind=lora", f"adaptor.rank={int(rank)}"]
    if axis == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"rank value {value!r} must be an integer >= 1")
        return [f"adaptor.rank={value}"]
    if axis == "targets":
        return [f"adaptor.targets={value}"]
    if axis == "agnostic":
        if not isinstance(value, bool):
            raise SweepError(f"agnostic value {value!r} must be true or false")
        return [f"adaptor.context_agnostic={str(value).lower()}"]
    if "." in axis:  # any config key; load_config checks it when the runs are planned
        return [f"{axis}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    raise SweepError(f"unknown sweep axis {axis!r}; {_suggest(axis, AXES)}axes are {', '.join(AXES)} "
                     "or a dotted config key such as train.lr")


def _name_part(axis: str, value: Any) -> str:
    if axis == "agnostic":
        return "agnostic" if value else "specific"
    if axis == "rank":
        return f"r{value}"
    text = str(value) if "." not in axis else f"{axis.rsplit('.', 1)[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "+", text).strip("+")


def run_name(values: dict[str, Any]) -> str:
    """Directory name of a run: its axis values joined by "_" (``lora-8_AF_specific``); ``name`` wins."""
    if values.get("name"):
        return str(values["name"])
    return "_".join(_name_part(a, v) for a, v in values.items()) or "run"


def expand(grid: dict[str, list] | None = None, runs: list[dict] | None = None) -> list[dict[str, Any]]:
    """The runs of a ``grid`` (every combination, first axis outermost) or of an explicit ``runs`` list."""
    if (grid is None) == (runs is None):
        raise SweepError("a sweep needs exactly one of grid: {axis: [values]} and runs: [{axis: value}, ...]")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise SweepError(f"grid must map axes to lists of values, got {grid!r}")
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid axis {axis!r} needs a non-empty list of values, got {values!r}")
        out = [dict(zip(grid, combo)) for combo in product(*grid.values())]
    else:
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise SweepError(f"runs must be a non-empty list of mappings {{axis: value}}, got {runs!r}")
        out = [dict(r) for r in runs]
    for values in out:  # reject bad axes and values now, not after hours of training
        for axis, value in values.items():
            if axis != "name":
                axis_overrides(axis, value)
    names = [run_name(v) for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SweepError(f"runs {dup} would share a directory; make their values differ or give each a name")
    return out


def load_sweep(path: str | os.PathLike, out: str | os.PathLike | None = None, plot: str | None = None) -> Sweep:
    """Parse and check a sweep file; ``out`` / ``plot`` replace the file's values (command-line options)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist; see configs/sweeps/ for examples")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise SweepError(f"{path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in data:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{path}: unknown key {key!r}; {_suggest(str(key), SWEEP_KEYS)}"
                             f"keys are {', '.join(SWEEP_KEYS)}")
    if not data.get("base"):
        raise SweepError(f"{path}: base (the run config every run starts from) is required, "
                         "e.g. base: ../caption_offline.yaml")
    base = Path(data["base"])
    base = base if base.is_absolute() else (path.parent / base).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base config {base} does not exist (a relative base is read from the sweep's folder)")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: overrides must be a list of KEY=VALUE strings, got {overrides!r}")
    plots = plot or data.get("plot") or "bars"
    plots = [plots] if isinstance(plots, str) else list(plots)
    for p in plots:
        if p not in PLOTS:
            raise SweepError(f"plot {p!r} is not one of {', '.join(PLOTS)}")
    task = data.get("task") or load_config(base).task
    out_dir = Path(out or data.get("out") or Path("runs") / "sweeps" / path.stem)
    return Sweep(base, task, out_dir, overrides, expand(data.get("grid"), data.get("runs")), plots)


# ---------------------------------------------------------------------------------------------- planning
def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_diff(old: dict, new: dict, ignore: Sequence[str] = ("output_dir", "train.resume")) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``ignore`` left out)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def plan_runs(sweep: Sweep, cli_overrides: Sequence[str] = ()) -> list[RunPlan]:
    """Every run's config (checked now), directory and action: done (results.json), resume (checkpoint) or train."""
    for o in [*sweep.overrides, *cli_overrides]:
        key = o.partition("=")[0].strip()
        if key in ("output_dir", "train.resume", "task"):
            raise SweepError(f"override {o!r}: the sweep sets {key} itself (each run trains into <out>/<name>; "
                             "choose the folder with --out)")
    plans = []
    for values in sweep.runs:
        name = run_name(values)
        run_dir = sweep.out / name
        axis = [o for a, v in values.items() if a != "name" for o in axis_overrides(a, v)]
        try:
            cfg = load_config(sweep.base, [*sweep.overrides, *cli_overrides, *axis, f"output_dir={run_dir}"])
        except ConfigError as e:
            raise SweepError(f"run {name}: {e}") from None
        cfg.task = sweep.task
        plan = RunPlan(name, run_dir, {k: v for k, v in values.items() if k != "name"}, axis, cfg)
        saved = run_dir / "config.yaml"
        if saved.is_file():
            diff = config_diff(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, config_to_dict(cfg))
            if diff:
                raise SweepError(f"run {name}: {run_dir} was trained with another config ({', '.join(diff[:5])} "
                                 "differ); delete that folder to retrain it, or sweep into another --out")
        if (run_dir / "results.json").is_file():
            plan.action = "done"
        elif previous_run(run_dir):
            # an interrupted run of this very config (checked above): resume recovers its newest complete
            # checkpoint (checkpoint, .tmp or .old) or starts from scratch; a new run would be refused there
            plan.action = "resume"
        plans.append(plan)
    return plans


def train_args(sweep: Sweep, plan: RunPlan, cli_overrides: Sequence[str] = ()) -> list[str]:
    """``launch/train_task.py`` arguments of one run."""
    args = ["--task", sweep.task, "--config", str(sweep.base), *sweep.overrides, *cli_overrides, *plan.overrides,
            f"output_dir={plan.dir}"]
    return args + (["train.resume=true"] if plan.action == "resume" else [])


# ----------------------------------------------------------------------------------------------- runners
def train_subprocess(args: list[str], log: Path) -> None:
    """One run as its own ``python launch/train_task.py`` process, output to ``log``.

    The default: each run starts from a fresh interpreter, so it is exactly the run one would launch alone
    (accelerate's process-wide state fixes mixed precision at the first Accelerator; seeds, thread counts and
    memory do not leak between runs), and a hard crash of one run cannot end the sweep. Costs ~5 s of imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ python launch/train_task.py " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=os.getcwd(), check=False).returncode
    if rc < 0:  # killed: the log ends wherever the run was, not with an error
        raise RunFailed(f"killed by {signal.Signals(-rc).name} (log: {log})")
    if rc != 0:
        raise RunFailed(f"exit status {rc}: {last_error_line(log)} (log: {log})")


def last_error_line(log: Path) -> str:
    """The line that says what went wrong: ``error: ...`` from run_cli, else a traceback's last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else "(no output)"


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state so that the next Accelerator may use another mixed precision
    (accelerate's own tests do the same between runs in one process; single-process use only)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def train_in_process(args: list[str], log: Path) -> None:
    """One run as ``train_task.main(args)`` in this process (no import cost; output goes to the console)."""
    spec = importlib.util.spec_from_file_location("mtcpeft_train_task", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reset_accelerate_state()
    try:
        module.main(args)
    except SystemExit as e:  # argparse / run_cli exits
        raise RunFailed(f"train_task exited with status {e.code}") from None


# ---------------------------------------------------------------------------------------------- the sweep
def run_sweep(sweep: Sweep, cli_overrides: Sequence[str] = (), train: TrainFn = train_subprocess,
              dry_run: bool = False, echo: Callable[[str], None] = print) -> list[dict]:
    """Train every run not done yet, one after another; write results.csv / results.md after each run and the
    plots at the end. Returns the table rows. ``dry_run`` only plans and prints."""
    plans = plan_runs(sweep, cli_overrides)
    todo = [p for p in plans if p.action != "done"]
    echo(f"sweep: {len(plans)} runs in {sweep.out} ({len(plans) - len(todo)} done, {len(todo)} to train)")
    for i, plan in enumerate(plans, 1):
        args = train_args(sweep, plan, cli_overrides)
        head = f"[{i}/{len(plans)}] {plan.name}"
        if plan.action == "done":
            echo(f"{head}: results.json exists, skipped")
            continue
        if dry_run:
            echo(f"{head}: would {plan.action}: python launch/train_task.py {' '.join(args)}")
            continue
        echo(f"{head}: {'resuming from its checkpoint' if plan.action == 'resume' else 'training'} ...")
        before = _read_json(plan.dir / STATUS_FILE)
        spent = float(before.get("wall_time_s") or 0.0) if before.get("status") == "failed" else 0.0
        t0 = time.perf_counter()
        status, error = "ok", ""
        try:
            train(args, plan.dir / "sweep.log")
            if not (plan.dir / "results.json").is_file():
                raise RunFailed("training ended without writing results.json")
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
            text = " ".join(str(e).split())
            status, error = "failed", text if isinstance(e, RunFailed) else f"{type(e).__name__}: {text}".rstrip(": ")
        wall = spent + time.perf_counter() - t0
        write_json({"status": status, "wall_time_s": round(wall, 1), "error": error, "args": args},
                   plan.dir / STATUS_FILE)
        row = run_row(plan)
        echo(f"{head}: {status}" + (f", val perplexity {row['best_val_ppl']:.3f}" if status == "ok" else f": {error}")
             + f" ({wall:.0f} s)")
        write_tables(collect_rows(plans), sweep.out)
    if dry_run:
        return [run_row(p) for p in plans]
    rows = collect_rows(plans)
    write_tables(rows, sweep.out)
    from .plots import make_plots

    for kind in sweep.plots:
        try:
            for path in make_plots(rows, sweep.out, [kind]):
                echo(f"plot: {path}")
        except ValueError as e:  # e.g. a rank plot of a sweep without LoRA runs: the rest is written anyway
            echo(f"no plot: {e}")
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    echo(f"results: {sweep.out / 'results.md'}" + (f"; failed: {', '.join(failed)} (rerun the same command to "
                                                     "retry them)" if failed else ""))
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_row(plan: RunPlan) -> dict:
    """One table row: the run's adaptor settings (from its config), its results and its sweep status."""
    spec = plan.config.adaptor
    res, st = _read_json(plan.dir / "results.json"), _read_json(plan.dir / STATUS_FILE)
    ok = res.get("best_val_ppl") is not None
    status = "ok" if ok else st.get("status") if st.get("status") == "failed" else "pending"
    adaptor = FULL if plan.config.train.mode == "full" else spec.kind
    return {"run": plan.name, "adaptor": adaptor, "rank": spec.rank if spec.kind == "lora" else None,
            "targets": spec.targets, "agnostic": spec.context_agnostic,
            "trainable_params": res.get("trainable_parameters"), "best_val_ppl": res.get("best_val_ppl"),
            "best_epoch": res.get("best_epoch"), "wall_time_s": st.get("wall_time_s"), "status": status,
            "error": "" if ok else st.get("error", "")}


def collect_rows(plans: Sequence[RunPlan]) -> list[dict]:
    return [run_row(p) for p in plans]


# ------------------------------------------------------------------------------------------------ tables
def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "best_val_ppl":
        return f"{value:.3f}"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "agnostic":
        return "agnostic" if value else "specific"
    if key == "wall_time_s":
        return f"{int(value) // 60}m {int(value) % 60:02d}s"
    return str(value)


def write_tables(rows: Sequence[dict], out: str | os.PathLike) -> None:
    """``results.csv`` (raw values, one row per run) and ``results.md`` (a readable table), atomically."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS} for r in rows)
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    titles = ("run", "adaptor", "rank", "targets", "context", "trainable params", "best val ppl", "best epoch",
              "wall time", "status")
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        cells = [_cell(k, r.get(k)) for k in COLUMNS[:-2]] + [status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
