"""Train an ablation sweep (Context-PEFT Table 1 / Figures 3 and 4): every run of a sweep file, one after another.

    python launch/sweep.py --config configs/sweeps/table1.yaml                 # 30 points x 3 seeds, ~1 min a run
    python launch/sweep.py --config configs/sweeps/rank.yaml --out runs/sweeps/rank_lr3e-4 train.lr=3e-4
    python launch/sweep.py --config configs/sweeps/table1.yaml --dry-run       # the plan, nothing trained
    python launch/sweep.py --config configs/sweeps/table1.yaml --seeds 0       # one seed of each point

Positional ``key=value`` arguments override the config of every run (the sweep's axes still win). Each run trains
into ``<out>/<run name>/`` (its log: ``sweep.log``); rerunning the command skips finished runs, resumes interrupted
ones from their checkpoint and retries failed ones. Writes ``<out>/results.csv``, ``results.md`` and the plots
(``ppl_bars.png``: Figure 3; ``ppl_rank.png``: Figure 4). A sweep with ``seeds`` (or ``--seeds``) trains every grid
point once per seed and also writes ``points.csv`` (mean +- std over seeds) and ``pairs.csv`` (specific - agnostic
paired by seed, 95% t-intervals); its plots show the intervals. Sweep file format: mtcpeft/experiments/sweep_spec.py.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
import sys

from pathlib import Path

from mtcpeft.cli import run_cli
from mtcpeft.experiments.plots import PLOT_FILES
from mtcpeft.experiments.sweep import run_sweep
from mtcpeft.experiments.sweep_spec import load_sweep, parse_seeds


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="sweep file, e.g. configs/sweeps/table1.yaml")
    ap.add_argument("--out", help="sweep folder (default: the file's out, or runs/sweeps/<file name>)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and their commands; train nothing")
    ap.add_argument("--plot", choices=sorted(PLOT_FILES), help="which plot to draw (default: the file's plot)")
    ap.add_argument("--seeds", help="comma-separated seeds every grid point runs with, e.g. 0,1,2 (default: the "
                                    "file's seeds: list, or the base config's seed once)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.max_steps=5")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    sweep = load_sweep(args.config, out=args.out, plot=args.plot, seeds=seeds)
    # each run is this folder's train_task.py in a process of its own: exactly the run one would launch alone
    train_task = [sys.executable, str(Path(__file__).resolve().with_name("train_task.py"))]
    return run_sweep(sweep, args.overrides, command=train_task, dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
