"""A stand-in for launch/train_task.py that sweeps can run in milliseconds, and sweep files of tests
(tests/experiments/test_sweep*.py)."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "caption_offline.yaml"


def sweep_file(tmp_path: Path, body: dict) -> Path:
    """A sweep file in ``tmp_path`` on the offline caption config, sweeping into ``tmp_path/out``."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(BASE), "out": str(tmp_path / "out"), **body}, sort_keys=False))
    return path


FAKE_TRAIN = """import json, os, signal, sys
from pathlib import Path

spec, args = json.loads(sys.argv[1]), sys.argv[2:]
with open(spec["calls"], "a") as f:
    f.write(json.dumps(args) + "\\n")
out = Path(next(a for a in args if a.startswith("output_dir=")).partition("=")[2])
name = out.name
if name in spec["fail"]:  # a user error, as run_cli reports it
    print(f"error: {name} diverged", file=sys.stderr)
    sys.exit(2)
if name in spec["oom"]:
    raise MemoryError("out of memory")
if name in spec["crash"]:  # killed after its first epoch's checkpoint
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    (out / "checkpoint" / "trainer_state.json").write_text("{}")
    os.kill(os.getpid(), signal.SIGKILL)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({
    "best_val_ppl": spec["ppl"][name], "best_epoch": 1, "trainable_parameters": spec["params"].get(name)}))
"""
_fakes = itertools.count()


class FakeTrainer:
    """Stands in for launch/train_task.py (a script at <tmp>/launch/train_task.py, run as the sweep runs the real
    one): records each call; writes results.json (perplexity ``ppl[run name]``) unless told to fail."""

    def __init__(self, tmp_path: Path, ppl: dict[str, float], params: dict[str, int] | None = None, fail=(), crash=(),
                 oom=()):
        script = tmp_path / "launch" / "train_task.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(FAKE_TRAIN)
        self.record = tmp_path / f"calls{next(_fakes)}.jsonl"
        spec = {"calls": str(self.record), "fail": sorted(fail), "crash": sorted(crash), "oom": sorted(oom),
                "ppl": ppl, "params": params or {}}
        self.command = [sys.executable, str(script), json.dumps(spec)]

    @property
    def calls(self) -> list[list[str]]:
        lines = self.record.read_text().splitlines() if self.record.is_file() else []
        return [json.loads(ln) for ln in lines]


def called(trainer: FakeTrainer) -> dict[str, list[str]]:
    """The arguments of each run the fake trained, by run name."""
    return {Path(next(a for a in c if a.startswith("output_dir="))[11:]).name: c for c in trainer.calls}
