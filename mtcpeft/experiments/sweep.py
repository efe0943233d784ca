"""Ablation sweeps: train every run of a sweep file (:mod:`.sweep_spec`) one after another on the runner
(:mod:`.runner`), resumably, then write the tables (:mod:`.sweep_results`) and plots (:mod:`.plots`).

Each run is the caller's training command (``python launch/train_task.py``) with ``--task --config <base>``, the
overrides in this order: the sweep's ``overrides``, the command line's, the run's axis values (an axis always
wins), its ``seed=S`` (a seeded sweep) and ``output_dir=<out>/<name>``; its log is ``<out>/<name>/sweep.log``. A
seeded sweep trains seed by seed (every point with the first seed, then with the second, ...), so a sweep stopped
halfway already has whole tables of its first seeds.

Resume: a run whose ``results.json`` exists is not trained again; one with a checkpoint but no results (it
crashed or was interrupted) restarts with ``train.resume=true``; a failing run is recorded as failed and the
sweep goes on. A run directory whose ``config.yaml`` differs from the planned config stops the sweep before any
training (stale results would otherwise be mixed in). Each (point, seed) is a run folder of its own: adding a seed
to the list trains only the new runs; a seed taken off the list leaves its folders but not the tables.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from mtcpeft.config import ConfigError, config_to_dict, flat_config, load_config
from mtcpeft.io import write_json
from .devices import assign_devices, detect_devices
from .runner import resume_action, run_plans
from .sweep_results import (STATUS_FILE, SweepPlan, collect_rows, count_line, pair_rows, read_status, run_row,
                            write_tables)
from .sweep_spec import Sweep, SweepError, axis_overrides, pair_name, run_name, seeded_name


def config_diff(old: dict, new: dict, ignore: Sequence[str] = ("output_dir", "train.resume")) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``ignore`` left out)."""
    a, b = flat_config(old), flat_config(new)
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def plan_runs(sweep: Sweep, cli_overrides: Sequence[str] = (), command: Sequence[str] = ()) -> list[SweepPlan]:
    """Every run's config (checked now), directory, action (done, resume or train: :func:`.runner.resume_action`)
    and command: ``command`` (the training command, e.g. ``[python, "launch/train_task.py"]``) and its arguments.
    One run per grid point and seed, point by point (a point's seeds together)."""
    for o in [*sweep.overrides, *cli_overrides]:
        key = o.partition("=")[0].strip()
        if key in ("output_dir", "train.resume", "task"):
            raise SweepError(f"override {o!r}: the sweep sets {key} itself (each run trains into <out>/<name>; "
                             "choose the folder with --out)")
        if key == "seed" and sweep.seeds is not None:
            raise SweepError(f"override {o!r}: this sweep runs every point with seeds {sweep.seeds}; change the "
                             "seeds (seeds: in the sweep file, or --seeds) instead")
    plans = []
    for values, seed in ((v, s) for v in sweep.runs for s in (sweep.seeds or [None])):
        point = run_name(values)
        name = seeded_name(point, seed)
        run_dir = sweep.out / name
        axis = [o for a, v in values.items() if a != "name" for o in axis_overrides(a, v)]
        overrides = [*sweep.overrides, *cli_overrides, *axis, *([f"seed={seed}"] if seed is not None else []),
                     f"output_dir={run_dir}"]
        try:
            cfg = load_config(sweep.base, overrides)
        except ConfigError as e:
            raise SweepError(f"run {name}: {e}") from None
        cfg.task = sweep.task
        saved = run_dir / "config.yaml"
        if saved.is_file():
            diff = config_diff(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, config_to_dict(cfg))
            if diff:
                raise SweepError(f"run {name}: {run_dir} was trained with another config ({', '.join(diff[:5])} "
                                 "differ); delete that folder to retrain it, or sweep into another --out")
        # resume: an interrupted run of this very config (checked above); the trainer recovers its newest complete
        # checkpoint (checkpoint, .tmp or .old) or starts from scratch; a new run would be refused there
        action = resume_action(run_dir)
        args = ["--task", sweep.task, "--config", str(sweep.base), *overrides,
                *(["train.resume=true"] if action == "resume" else [])]
        plans.append(SweepPlan(name, run_dir, run_dir / "sweep.log", [*command, *args], task=sweep.task, config=cfg,
                               action=action, point=point, seed=seed, pair=pair_name(values)))
    return plans


def _shown(command: Sequence[str]) -> str:
    """A command as a user would type it: ``python`` for this interpreter, paths below the folder relative."""
    here = Path.cwd()
    parts = ["python" if c == sys.executable else os.path.relpath(c) if Path(c).is_absolute() and
             Path(c).is_relative_to(here) else c for c in command]
    return shlex.join(parts)


def run_sweep(sweep: Sweep, cli_overrides: Sequence[str] = (), *, command: Sequence[str], dry_run: bool = False,
              echo: Callable[[str], None] = print, status_every: float = 30.0) -> list[dict]:
    """Train every run not done yet, one after another, each with ``command`` (the training command its arguments
    follow); write results.csv / results.md after each run and the plots at the end. Returns the table rows.
    ``dry_run`` only plans and prints."""
    plans = plan_runs(sweep, cli_overrides, command)
    seeds = sweep.seeds or [None]
    order = sorted(plans, key=lambda p: seeds.index(p.seed))  # seed by seed: whole tables of the first seeds early
    todo = [p for p in order if p.action != "done"]
    points = f" ({len(sweep.runs)} grid points x {len(seeds)} seeds)" if sweep.seeds else ""
    echo(f"sweep: {len(plans)} runs{points} in {sweep.out} ({len(plans) - len(todo)} done, {len(todo)} to train)")
    heads = {p.name: f"[{i}/{len(plans)}] {p.name}" for i, p in enumerate(order, 1)}
    for p in order:
        if p.action == "done":
            echo(f"{heads[p.name]}: results.json exists, skipped")
        elif dry_run:
            echo(f"{heads[p.name]}: would {p.action}: {_shown(p.command)}")
    if dry_run:
        return collect_rows(plans)
    devices, interrupted = detect_devices(), False
    for plan in todo:  # one after another: each on every core (or the first GPU)
        assign_devices([plan], devices)
        echo(f"{heads[plan.name]}: {'resuming from its checkpoint' if plan.action == 'resume' else 'training'} ...")
        before = read_status(plan.output_dir)
        spent = float(before.get("wall_time_s") or 0.0) if before.get("status") == "failed" else 0.0
        (run,), interrupted = run_plans([plan], status_every=status_every)
        status, wall = ("ok" if run.status == "done" else "failed"), spent + run.elapsed()
        # an interrupted run is recorded as failed: the next sweep resumes or retrains it
        write_json({"status": status, "wall_time_s": round(wall, 1), "error": run.error,
                    "args": plan.command[len(command):]}, plan.output_dir / STATUS_FILE)
        row = run_row(plan)
        echo(f"{heads[plan.name]}: {status}" + (f", val perplexity {row['best_val_ppl']:.3f}" if status == "ok" else
                                                 f" (exit status {run.exit_code}): {run.error}") + f" ({wall:.0f} s)")
        write_tables(collect_rows(plans), sweep.out)
        if interrupted:
            break
    rows = collect_rows(plans)
    write_tables(rows, sweep.out)
    if interrupted:
        echo(f"interrupted; results so far: {sweep.out / 'results.md'} (rerun the same command to continue)")
        raise KeyboardInterrupt
    from .plots import make_plots

    for kind in sweep.plots:
        try:
            for path in make_plots(rows, sweep.out, [kind]):
                echo(f"plot: {path}")
        except ValueError as e:  # e.g. a rank plot of a sweep without LoRA runs: the rest is written anyway
            echo(f"no plot: {e}")
    pairs = pair_rows(rows) if sweep.seeds else []
    if pairs:
        echo(count_line(pairs))
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    echo(f"results: {sweep.out / 'results.md'}" + (f"; failed: {', '.join(failed)} (rerun the same command to "
                                                     "retry them)" if failed else ""))
    return rows
