"""What a sweep records of each run (``sweep_run.json``) and its tables: ``results.csv`` (raw values, one row per
run) and ``results.md`` (readable). The rows also feed the plots (:mod:`.plots`)."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from mtcpeft.io import atomic_path, read_json
from .runner import RunPlan, read_results
from .sweep_spec import FULL

STATUS_FILE = "sweep_run.json"  # per run: status, wall time, error, arguments (written by the sweep)
COLUMNS = ("run", "adaptor", "rank", "targets", "agnostic", "trainable_params", "best_val_ppl", "best_epoch",
           "wall_time_s", "status", "error")


def read_status(output_dir: Path) -> dict:
    """What the sweep recorded of a run's last attempt ({} before any)."""
    return read_json(Path(output_dir) / STATUS_FILE)


def run_row(plan: RunPlan) -> dict:
    """One table row: the run's adaptor settings (from its config), its results and its sweep status."""
    spec = plan.config.adaptor
    res, st = read_results(plan.output_dir), read_status(plan.output_dir)
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
