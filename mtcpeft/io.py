"""Safe writes: a crash mid-write never leaves a half-written checkpoint, plugin or result file, and no write
loses files that are already there or saves tensors that are not finite.

Output folders follow one rule (:func:`prepare_run_dir` for training runs, :func:`check_output_dir` for a
plugin or adapter folder): check before anything is built, refuse to replace a previous result unless asked
(``--overwrite``), and never delete a file the program did not write.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file
from mtcpeft.errors import MtcpeftError

# what a training run writes into its output_dir: the results of a finished (or interrupted) run ...
RUN_RESULTS = ("plugin", "results.json", "checkpoint", "checkpoint.tmp", "checkpoint.old", "eval_*.json")
# ... and everything else mtcpeft puts there (config, progress, logs, feature caches, a sweep's log and status,
# temporaries)
RUN_FILES = RUN_RESULTS + ("config.yaml", "progress.json", "tb", "features", "sweep.log", "sweep_run.json", ".*.tmp",
                           ".*.old", ".*.deleting")


class UnsafeWriteError(MtcpeftError, ValueError):
    """Writing would lose files that are already there, cannot happen at all, or would save non-finite
    tensors; the message says what to do instead."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it takes ``out_dir``'s place.

    An existing ``out_dir`` is replaced only when the new directory rewrites every entry it holds (a plugin over
    a plugin): a folder of other files is refused, never deleted. The finished directory is first renamed to
    ``.<name>.*.ready``, so that a kill between moving the old one aside and moving the new one in leaves two
    complete copies that :func:`recover_dir` puts back (the newer one).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UnsafeWriteError(f"{out} is an existing file, not a directory; choose a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    ready = tmp.with_name(tmp.name[: -len(".tmp")] + ".ready")
    try:
        yield tmp
        if out.exists():
            lost = sorted(set(os.listdir(out)) - set(os.listdir(tmp)))
            if lost:
                raise UnsafeWriteError(f"{out} holds {_some(lost)}, which replacing it would delete; choose a new "
                                       "or empty directory")
        os.replace(tmp, ready)
        swap_dir(ready, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(out_dir: str | os.PathLike) -> bool:
    """Put a directory written by :func:`atomic_dir` back in place after a kill between its two renames: the
    newest complete new copy (``.ready``), else the previous one (``.old``). True when something was restored."""
    out = Path(out_dir)
    if out.exists() or not out.parent.is_dir():
        return False
    for suffix in (".ready", ".old"):
        found = sorted(out.parent.glob(f".{glob.escape(out.name)}.*{suffix}"), key=lambda p: p.stat().st_mtime)
        if found:
            os.replace(found[-1], out)
            return True
    return False


def swap_dir(new: str | os.PathLike, dest: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Put the complete directory ``new`` in ``dest``'s place by renames alone: an existing ``dest`` is renamed to
    ``aside`` (default: a fresh ``.<name>.*.old`` beside it, never an existing folder of the user's), ``new`` to
    ``dest``, and only then is ``aside`` deleted. A kill at any moment leaves a complete copy under one of the
    names, which :func:`recover_dir` (or the trainer's checkpoint recovery, with its fixed ``aside``) puts back."""
    dest = Path(dest)
    moved = None
    if dest.exists():
        moved = Path(aside) if aside is not None else Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, moved)
    os.replace(new, dest)
    if moved is not None:
        remove_tree(moved)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a file or directory; a directory is first renamed aside in one step, so a kill mid-delete never
    leaves a half-deleted directory under its own name (a checkpoint that looks complete but is not)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".deleting", dir=path.parent))
    os.replace(path, trash)
    shutil.rmtree(trash)


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first (sorted) floating-point tensor holding NaN or inf, or None."""
    return next((name for name, t in sorted(tensors.items())
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """safetensors, atomically; tensors are made contiguous CPU copies first; non-finite ones are refused."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = first_nonfinite(flat)
    if bad is not None:
        raise UnsafeWriteError(f"tensor {bad!r} holds non-finite values (nan or inf); refusing to write {path}")
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object some run wrote (results, status, progress), or {} when the file is missing or unreadable:
    for watchers and tables, which show a run that has not written yet as empty, never fail on it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------- output folders
def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def previous_run(path: str | os.PathLike) -> list[str]:
    """The entries of ``path`` that a previous (finished or interrupted) training run left, sorted."""
    p = Path(path)
    return sorted(e for e in os.listdir(p) if _matches(e, RUN_RESULTS)) if p.is_dir() else []


def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove that a file can be written in it, before hours of work depend on it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UnsafeWriteError(f"{what} {p} is an existing file, not a directory; choose a directory path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UnsafeWriteError(f"cannot write to {what} {p}: {e.strerror or e}; choose a writable directory") from None
    return p


def prepare_run_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool, check_only: bool = False) -> Path:
    """Check a training run's ``output_dir`` before anything is built; return it, created and writable.

    A resumed run continues in its own directory. A new run refuses a directory that holds a previous run's
    results (plugin/, checkpoint/, results.json, ...) or files mtcpeft did not write, unless ``overwrite``: then
    the previous results are removed and other files are kept untouched. ``check_only``: create and remove
    nothing (a plan that starts later, or a process other than the main one).
    """
    p = Path(path)
    if resume and overwrite:
        raise UnsafeWriteError("train.resume=true continues the run in output_dir, --overwrite replaces it: pass "
                               "one of them")
    if p.exists() and not p.is_dir():
        raise UnsafeWriteError(f"output_dir {p} is an existing file, not a directory; choose a directory path")
    if p.is_dir() and not resume:
        entries = sorted(os.listdir(p))
        previous = previous_run(p)
        foreign = [e for e in entries if not _matches(e, RUN_FILES)]
        if previous and not overwrite:
            raise UnsafeWriteError(f"output_dir {p} holds a previous run ({_some(previous)}); continue it with "
                                   "train.resume=true, replace it with --overwrite, or choose another output_dir")
        if foreign and not overwrite:
            raise UnsafeWriteError(f"output_dir {p} holds files mtcpeft did not write ({_some(foreign)}); choose "
                                   "another output_dir, or pass --overwrite to write beside them (they are kept)")
        if not check_only:  # the old tensorboard events too: they would mix with the new run's curves
            for e in previous + [e for e in entries if e == "tb"]:
                remove_tree(p / e)
    if check_only:
        existing = next(d for d in (p, *p.parents) if d.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UnsafeWriteError(f"cannot write to output_dir {p}: {existing} is not a writable directory; "
                                   "choose a writable directory")
        return p
    return check_writable_dir(p)


def check_output_dir(path: str | os.PathLike, produces: Iterable[str], *, overwrite: bool, what: str,
                     flag: str = "--out") -> Path:
    """Check a folder that will be written whole (a plugin, a PEFT adapter) before any work is done.

    ``produces``: the entries the writer puts there. An empty or new folder is fine; one that holds a previous
    result of the same writer needs ``overwrite``; one that holds anything else is refused (replacing the
    folder would delete it). The parent folder must be writable.
    """
    p, produces = Path(path), set(produces)
    if p.exists():
        if not p.is_dir():
            raise UnsafeWriteError(f"{flag} {p} is an existing file, not a directory; choose a directory path")
        entries = sorted(os.listdir(p))
        foreign = [e for e in entries if e not in produces]
        if foreign:
            raise UnsafeWriteError(f"{flag} {p} holds {_some(foreign)}, which writing the {what} there would delete; "
                                   f"choose a new or empty directory")
        if entries and not overwrite:
            raise UnsafeWriteError(f"{flag} {p} already holds a {what}; pass --overwrite to replace it, or choose "
                                   "another directory")
    check_writable_dir(p.parent, what=f"the parent of {flag}")
    return p
