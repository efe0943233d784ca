"""Train several tasks' adaptors at the same time on disjoint devices; each run leaves its own plugin.

    python launch/train_parallel.py --tasks caption,qa                       # one GPU (or a CPU share) per task
    python launch/train_parallel.py --tasks caption,qa --devices-per-task 2  # DDP over 2 GPUs per task
    python launch/train_parallel.py --tasks caption:capA,caption:capB --set capB.adaptor.kind=bitfit
    python launch/train_parallel.py --tasks caption,qa --set qa.train.lr=1e-4 -- train.epochs=1
    python launch/train_parallel.py --tasks caption,qa --dry-run             # print the plan, start nothing

--tasks takes registered task names, or TASK:RUN-NAME pairs to run a task more than once (the run name names
its directory and log). Each run is `launch/train_task.py --task TASK --config <config-dir>/TASK_offline.yaml`
started with `accelerate launch` (or `python`, one process): on GPUs each run gets its own CUDA_VISIBLE_DEVICES
group; on CPU its own cores (pinned) and thread count. key=value overrides (after `--`) apply to every run,
--set RUN.key=value (RUN: a run or task name; before `--`) to one. Every config is checked before anything starts.

Writes <out>/<run>/ (checkpoint, plugin/, results.json), <out>/<run>.log (the run's stdout and stderr) and
<out>/summary.json; prints one status line per run while they train, then a table. A failed run is reported
with the tail of its log and leaves the others running; the exit status is 1 if any run failed, 130 after
Ctrl-C (which stops every run). The same command with `-- train.resume=true` continues interrupted runs from
their checkpoints; a run directory that holds a previous run is refused before anything starts unless the runs
resume it or --overwrite replaces it.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
import sys

from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import run_cli
from mtcpeft.data.task import CONFIG_DIR, task_names
from mtcpeft.experiments.devices import LAUNCHERS, detect_devices
from mtcpeft.experiments.parallel import check_configs, parse_runs, plan_runs, run_parallel
from mtcpeft.experiments.status import summary_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", required=True, metavar="TASK[:RUN],...",
                    help=f"comma-separated registered tasks ({', '.join(task_names())}), optionally TASK:RUN-NAME")
    ap.add_argument("--devices-per-task", type=int, default=1, metavar="N",
                    help="GPUs (or CPU processes) per run; N > 1 trains each run with DDP (default 1)")
    ap.add_argument("--out", default="runs/parallel", help="directory of the runs, logs and summary.json")
    ap.add_argument("--config-dir", default=str(CONFIG_DIR), help="holds <task>_offline.yaml per task")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="accelerate",
                    help="accelerate launch (default) or plain python (one process per run)")
    ap.add_argument("--set", action="append", default=[], metavar="RUN.key=value", dest="sets",
                    help="an override for one run (or every run of a task); repeat")
    ap.add_argument("--status-every", type=float, default=30.0, metavar="S",
                    help="seconds between status lines when the output is not a terminal (default 30)")
    ap.add_argument("--dry-run", action="store_true", help="print each run's devices and command; start nothing")
    ap.add_argument("--overwrite", action="store_true", help="each run replaces the previous run in its directory")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --), e.g. train.epochs=1")
    args = ap.parse_intermixed_args(argv)  # key=value may also come before or between the options
    misplaced = [o for o in args.overrides if o.startswith("-")]
    if misplaced:
        ap.error(f"{misplaced[0]} comes after `--`, where only key=value overrides go; put options before `--`")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    specs = parse_runs(args.tasks, task_names())
    devices = detect_devices()
    plans = plan_runs(specs, devices, args.out, script=Path(__file__).resolve().with_name("train_task.py"),
                      config_dir=args.config_dir, per_task=args.devices_per_task, launcher=args.launcher,
                      common=args.overrides, sets=args.sets, overwrite=args.overwrite)
    check_configs(plans)
    for p in plans:
        print(f"{p.name} ({p.task}): {p.devices()}, {p.processes} process{'es' if p.processes > 1 else ''}"
              f" -> {p.log}", file=sys.stderr)
        for note in p.notes:
            print(f"  note: {note}", file=sys.stderr)
        if args.dry_run:
            print(f"  {p.shell()}")
    if args.dry_run:
        return {"plans": [p.shell() for p in plans]}
    summary = run_parallel(plans, args.out, status_every=args.status_every)
    print(summary_table(summary))
    if summary["interrupted"]:
        sys.exit(130)
    if not summary["ok"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    run_cli(main)
