"""Run a launch script's ``main`` in-process, as ``run_cli`` runs it: (exit status, result, stderr).

Training scripts need ``train.mixed_precision=no`` (the tests' setting) here: accelerate fixes the precision of
the whole process at its first Accelerator, and the offline configs say auto (bf16 on a CPU that has it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from mtcpeft.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{Path(name).stem}", ROOT / "launch" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], capsys, module=None):
    """``module``: an already loaded (maybe monkeypatched) script module."""
    module = module or load_script(name)
    capsys.readouterr()
    try:
        result, code = run_cli(lambda: module.main([str(a) for a in argv])), 0
    except SystemExit as e:
        result, code = None, e.code
    return code, result, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of a script's stderr (progress bars also go there); asserts no traceback."""
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]
