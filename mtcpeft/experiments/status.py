"""What the runner shows: while runs train, one line per run read from the run's own ``progress.json`` (on a
terminal redrawn in place, one tqdm line each; elsewhere, such as a log file or CI, a run's line is printed when its
status changes and every ``every`` seconds while it runs); at the end, a table of a parallel run's summary.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence, TextIO


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_text(progress: dict) -> str:
    """'step 5/12 (42%)  epoch 0.4/2  loss 2.310  val ppl 9.100' from a progress.json; 'starting' before one."""
    if not progress:
        return "starting"
    step, total = progress.get("step", 0), progress.get("total_steps")
    parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
    if progress.get("epochs"):
        parts.append(f"epoch {progress.get('epoch', 0):g}/{progress['epochs']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.3f}")
    if progress.get("val_ppl") is not None:
        parts.append(f"val ppl {progress['val_ppl']:.3f}")
    return "  ".join(parts)


class StatusBoard:
    """One line per run (:class:`mtcpeft.experiments.runner.Run`): name, status, wall time, progress or end."""

    def __init__(self, runs: Sequence, stream: TextIO, every: float):
        self.runs, self.stream, self.every = runs, stream, every
        self.width = max((len(r.plan.name) for r in runs), default=0)
        self.shown = {id(r): "pending" for r in runs}  # a pending run's line waits for its start
        self.printed = time.time()
        self.bars = None
        if stream.isatty() and runs:
            from tqdm import tqdm

            size = shutil.get_terminal_size()  # 80 x 24 where the terminal reports 0 x 0 (tqdm would hide the bars)
            rows = max(size.lines, len(runs) + 1)
            self.bars = [tqdm(total=None, position=i, bar_format="{desc}", file=stream, leave=True,
                              ncols=size.columns, nrows=rows) for i in range(len(runs))]

    def line(self, run) -> str:
        if run.status == "running":
            detail = progress_text(run.progress())
        else:
            detail = " ".join(x for x in (f"exit {run.exit_code}" if run.exit_code is not None else "", run.error) if x)
        return f"{run.plan.name:<{self.width}}  {run.status:<11} {fmt_time(run.elapsed()):>7}  {detail}".rstrip()

    def update(self, final: bool = False) -> None:
        if self.bars is not None:
            for bar, run in zip(self.bars, self.runs):
                bar.set_description_str(self.line(run))
            if final:
                for bar in self.bars:
                    bar.close()
            return
        periodic = time.time() - self.printed >= self.every
        for run in self.runs:
            if run.status != self.shown[id(run)] or (periodic and run.status == "running"):
                print(self.line(run), file=self.stream, flush=True)
                self.shown[id(run)] = run.status
        if periodic:
            self.printed = time.time()


def summary_table(summary: dict) -> str:
    """The per-run table printed at the end: run, task, status, exit code, wall time, best val ppl, plugin."""
    head = ("run", "task", "status", "exit", "wall", "best val ppl", "plugin")
    rows = [(r["run"], r["task"], r["status"], "-" if r["exit_code"] is None else str(r["exit_code"]),
             fmt_time(r["wall_s"]), "-" if r["best_val_ppl"] is None else f"{r['best_val_ppl']:.3f}",
             r["plugin"] or "-") for r in summary["runs"]]
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"wall time {fmt_time(summary['wall_s'])}; summary: {Path(summary['out']) / 'summary.json'}")
    return "\n".join(lines)
