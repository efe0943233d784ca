"""Run a launch script on 2 CPU processes under ``accelerate launch`` with one of configs/accelerate/*.yaml.

The CPU routes (see those files): DDP needs ACCELERATE_USE_CPU=1; DeepSpeed must run WITHOUT it (the trainer passes
the gloo backend itself). Each process gets one thread (two processes on two cores with default threading
oversubscribe); DeepSpeed's compiled communication op is cached in TORCH_EXTENSIONS_DIR."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(engine: str, script: str | Path, args: list[str], timeout: int = 900) -> str:
    """Run ``script`` (a path, or a name in launch/) with ``args`` under configs/accelerate/<engine>.yaml on 2
    processes; returns its stdout, raises AssertionError with the output's tail when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)
    if engine == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # gloo DDP on CPU; DeepSpeed must not see this variable
    path = Path(script) if Path(script).is_absolute() else ROOT / "launch" / script
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{engine} {path.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc.stdout
