"""Where a run is, as a small state file in its output directory (``progress.json``): what a watcher outside the
process (the status board of :mod:`mtcpeft.experiments.runner`) reads instead of scraping the run's log.

The trainer's main process rewrites it atomically when training starts, on every logging step, after each
validation and when training ends; so a reader never sees half a file. Fields: ``status`` (running | done |
failed), ``step`` / ``total_steps`` (optimizer steps), ``epoch`` (epochs done, fractional mid-epoch) / ``epochs``,
``loss`` (latest logged train loss), ``val_ppl`` (latest validation perplexity), ``error`` (why it failed) and
``time`` (when it was written, seconds since the epoch).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import write_json

PROGRESS_FILE = "progress.json"
STATUSES = ("running", "done", "failed")


def write_progress(out: str | os.PathLike, *, status: str, step: int, total_steps: int | None, epoch: float,
                   epochs: int, loss: float | None = None, val_ppl: float | None = None, error: str = "") -> None:
    """Replace ``<out>/progress.json`` in one rename (call it from the main process only)."""
    assert status in STATUSES, status
    write_json({"status": status, "step": step, "total_steps": total_steps, "epoch": epoch, "epochs": epochs,
                "loss": loss, "val_ppl": val_ppl, "error": error, "time": time.time()}, Path(out) / PROGRESS_FILE)


def read_progress(out: str | os.PathLike, since: float | None = None) -> dict:
    """The run's last progress, or ``{}`` when it has written none yet; ``since`` (a time.time()): a file written
    before then is a previous run's and reads as none."""
    path = Path(out) / PROGRESS_FILE
    try:
        if since is not None and path.stat().st_mtime < since:
            return {}
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet (a rename makes a half-written file impossible)
        return {}


def error_text(e: BaseException) -> str:
    """How a failure reads in the progress file: a user error's own message, else ``Type: message``."""
    text = " ".join(str(e).split())
    return text if isinstance(e, MtcpeftError) else f"{type(e).__name__}: {text}".rstrip(": ")
