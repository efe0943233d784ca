"""Where each run goes: disjoint shares of the GPUs or CPU cores, and the command that starts it there.

- GPUs: the visible ids (``CUDA_VISIBLE_DEVICES`` respected) are cut into disjoint groups of N, one per run; the
  child sees only its group. N > 1: ``accelerate launch --multi_gpu --num_processes N --main_process_port P``
  with a distinct free port P per run (two DDP groups on one port would join each other's rendezvous).
- CPU: the cores are cut into disjoint shares; each child is pinned to its share (``sched_setaffinity``, like
  ``taskset``) and told its thread count (OMP/MKL_NUM_THREADS, MTCPEFT_THREADS read by
  :func:`mtcpeft.training.trainer.configure_cpu_threads`): two processes with default threading on two cores each
  start one thread per core and run several times slower. N > 1 on CPU is ``ACCELERATE_USE_CPU=1 accelerate launch
  --multi_gpu --num_processes N`` (``--cpu --num_processes N`` starts ONE process).

Pure planning: nothing here starts a process (:mod:`.runner` does).
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Sequence

from .runner import PlanError, RunPlan

LAUNCHERS = ("accelerate", "python")


@dataclass(frozen=True)
class Devices:
    """What the runs share: GPU ids as CUDA_VISIBLE_DEVICES spells them, or CPU core numbers."""

    kind: str  # "gpu" | "cpu"
    ids: tuple[str, ...]


def visible_gpus(count: int, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The ids of the ``count`` GPUs torch sees, as the parent's CUDA_VISIBLE_DEVICES names them (a child's
    CUDA_VISIBLE_DEVICES is read relative to the machine, not to the parent's own mask)."""
    env = os.environ if env is None else env
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return tuple(str(i) for i in range(count))
    return tuple(s.strip() for s in mask.split(",") if s.strip())[:count]


def detect_devices() -> Devices:
    """GPUs if torch sees any, else the CPU cores this process may run on."""
    import torch  # late: planning from given Devices needs no torch

    n = torch.cuda.device_count()
    if n:
        return Devices("gpu", visible_gpus(n))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return Devices("cpu", tuple(str(c) for c in cores))


def split_evenly(items: Sequence, parts: int) -> list[tuple]:
    """Contiguous chunks whose sizes differ by at most one, larger first: 8 items in 3 -> 3, 3, 2."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(tuple(items[start:end]))
        start = end
    return out


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free now (all held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def assign_devices(plans: Sequence[RunPlan], devices: Devices, per_run: int = 1,
                   ports: Sequence[int] | None = None) -> None:
    """Give each plan a disjoint share of ``devices`` for ``per_run`` processes: GPUs, or pinned cores with their
    thread count, a rendezvous port when ``per_run`` > 1, and the environment that says so."""
    k = len(plans)
    if devices.kind == "gpu":
        if k * per_run > len(devices.ids):
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise PlanError(f"{k} run(s) x {per_run} GPU(s) each need {k * per_run} GPUs, {len(devices.ids)} visible"
                            f"{f' (CUDA_VISIBLE_DEVICES={mask})' if mask is not None else ''}; "
                            "lower --devices-per-task or run fewer tasks at once")
        shares: list[tuple] = [devices.ids[i * per_run:(i + 1) * per_run] for i in range(k)]
    else:
        cores = [int(c) for c in devices.ids]
        shares = split_evenly(cores, k) if len(cores) >= k else [()] * k
    if per_run == 1:
        ports = [None] * k  # one process per run: no process group, no port
    elif ports is None:
        ports = free_ports(k)
    elif len(set(ports)) != k or len(ports) != k:
        raise PlanError(f"{k} runs need {k} distinct ports, got {list(ports)}")
    for plan, share, port in zip(plans, shares, ports):
        plan.processes, plan.port = per_run, port
        plan.env["PYTHONUNBUFFERED"] = "1"  # the log follows the run as it goes
        if devices.kind == "gpu":
            plan.gpus = tuple(share)
            plan.env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
            continue
        if share:
            plan.cpus = tuple(share)
        else:
            plan.notes.append(f"{k} runs share {len(devices.ids)} core(s): expect each to run slower")
        plan.threads = max(1, len(share) // per_run)
        if per_run > len(share):
            plan.notes.append(f"{per_run} processes on {max(len(share), 1)} core(s): one thread each, oversubscribed")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MTCPEFT_THREADS"):
            plan.env[var] = str(plan.threads)
        if per_run > 1:
            plan.env["ACCELERATE_USE_CPU"] = "1"


def launch_command(plan: RunPlan, script: str | os.PathLike, args: Sequence[str], launcher: str = "accelerate",
                   python: str = sys.executable) -> list[str]:
    """``python SCRIPT ARGS`` or its ``accelerate launch`` for the plan's devices; the defaults accelerate would
    warn about are passed explicitly."""
    if launcher not in LAUNCHERS:
        raise PlanError(f"unknown launcher {launcher!r}; choose {' or '.join(LAUNCHERS)}")
    if launcher == "python":
        return [python, str(script), *args]
    cmd = [python, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(plan.processes)]
    if plan.processes > 1:  # on CPU together with ACCELERATE_USE_CPU=1 in the environment (module docstring)
        cmd += ["--multi_gpu", "--main_process_port", str(plan.port)]
    elif not plan.gpus:
        cmd += ["--cpu"]
    if plan.threads is not None:  # accelerate sets OMP_NUM_THREADS from this
        cmd += ["--num_cpu_threads_per_process", str(plan.threads)]
    return cmd + [str(script), *args]
