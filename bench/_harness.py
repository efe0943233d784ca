"""What the end-to-end benchmarks share: process setup, the allocator peak tracker, machine facts, report writing.

Importing this module imports no torch: a script parses its arguments and calls :func:`reexec` first, so thread
counts and glibc malloc settings are in the environment before torch (and its OpenMP runtime) is loaded. The
measuring discipline is bench/adaptors.py's: one process, variants interleaved in rounds after warm-up rounds,
order rotated each round, median of per-round ratios; 1 thread by default; glibc told never to return freed
memory to the OS nor to mmap big blocks (otherwise each step re-faults its activations, see
/work/shared/PERF_NOTES.md); peak memory from the profiler's allocator events, validated on known allocations.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

MALLOC_TUNED = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(64 << 20), "MALLOC_MMAP_MAX_": "0"}
MB = 1 << 20
NOTES_BEGIN, NOTES_END = "<!-- notes:begin", "<!-- notes:end -->"


def add_common_args(p) -> None:
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny random LMs built from configs, 1 warm-up + 2 rounds, seconds")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (not timed)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned", help="glibc malloc settings")


def reexec(threads: int, malloc: str, marker: str) -> None:
    """Thread counts and glibc malloc settings are read at process start: set them and exec once more."""
    if os.environ.get(marker) == "1":
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), marker: "1"}
    for k, v in MALLOC_TUNED.items():
        if malloc == "tuned":
            env[k] = v
        else:
            env.pop(k, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ------------------------------------------------------------------------------------------------ memory
def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by the CPU allocator while ``fn`` runs, from profiler events.

    Tensors alive before the call (weights, optimizer state, inputs) are the zero line."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    sys.stderr.flush()
    saved = os.dup(2)  # the profiler's C++ side logs start/stop lines to fd 2: silence them
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def self_check_tracker() -> None:
    """The tracker must give the known answer on known allocations, else its numbers mean nothing."""
    import torch

    def known() -> None:
        a = torch.empty(8 * MB, dtype=torch.uint8)
        b = torch.empty(16 * MB, dtype=torch.uint8)
        del a
        c = torch.empty(4 * MB, dtype=torch.uint8)
        del b, c

    got = peak_bytes(known)
    assert abs(got - 24 * MB) < 4096, f"tracker: expected 24 MB peak, got {got / MB:.3f} MB"


# ------------------------------------------------------------------------------------------------ rounds
def interleaved(steps: list[Callable[[], None]], rounds: int, warmup: int,
                label: str = "") -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Run every step once per round, the order rotated each round. Returns (wall, cpu) seconds per step of the
    timed rounds and the 1-minute load average after each timed round: wall from perf_counter, cpu the process
    CPU time (one thread: the step's own compute, without the time other processes held the core, which on a
    shared machine is most of the wall-time noise)."""
    import time

    wall: list[list[float]] = [[] for _ in steps]
    cpu: list[list[float]] = [[] for _ in steps]
    loads: list[float] = []
    order = list(range(len(steps)))
    for r in range(warmup + rounds):
        k = r % len(steps)
        for i in order[k:] + order[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[i]()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[i].append(t1 - t0)
                cpu[i].append(c1 - c0)
        if r >= warmup:
            loads.append(os.getloadavg()[0])
        print(f"  {label}round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}, load "
              f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return wall, cpu, loads


def ratio_stats(times: list[float], ref: list[float]) -> dict:
    """Median, min and max over rounds of the per-round ratio ``times[i] / ref[i]``."""
    ratios = [t / p for t, p in zip(times, ref)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ------------------------------------------------------------------------------------------------ models
MODELS = ("smollm2", "paper-llm")


def tiny_llama():
    """SmolLM2's architecture (llama, tied embeddings, grouped KV heads) at toy size, random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def load_model(name: str, quick: bool):
    """(causal LM in fp32, label for the report): the real model, or with ``quick`` a toy one of its family."""
    import torch

    torch.manual_seed(0)
    if name == "smollm2":
        if quick:
            return tiny_llama(), "tiny llama (SmolLM2 architecture, 2 layers x 64, random)"
        from mtcpeft.models.lm import load_lm

        return load_lm("smollm2"), "SmolLM2-135M-Instruct (packaged GGUF, converted once, fp32)"
    if name == "paper-llm":
        from mtcpeft.models.paper_llm import build_paper_llm

        if quick:
            return (build_paper_llm(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4), "tiny paper LLM (2 layers x 64, random)")
        return build_paper_llm(), "paper LLM (12 x 768, fused SwiGLU, untied head; random init from its config)"
    raise SystemExit(f"error: unknown model {name!r}; choose from {', '.join(MODELS)}")


def clone_sharing_weights(lm):
    """A new module tree over the SAME parameter and buffer tensors: wrapping it leaves ``lm`` untouched, and
    N variants cost one copy of the frozen weights."""
    import copy
    import itertools

    memo = {id(t): t for t in itertools.chain(lm.parameters(), lm.buffers())}
    return copy.deepcopy(lm, memo)


# ------------------------------------------------------------------------------------------------ facts
def machine(threads: int) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu": cpu, "threads": threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
        "malloc": ", ".join(f"{k}={os.environ[k]}" for k in MALLOC_TUNED if k in os.environ) or "defaults",
    }


def load() -> str:
    """``uptime`` as the shell prints it (load averages of the shared machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ratio_text(r: dict, key: str) -> str:
    """A row's median ratio with its min-max over rounds: ``1.040 [0.98-1.10]``."""
    return f"{r[key]:.3f} [{r[key + '_min']:.2f}-{r[key + '_max']:.2f}]"


def report_header(title: str, meta: dict, results: list[dict]) -> list[str]:
    """The lines every end-to-end report opens with: title, command, machine and versions, load during the run."""
    loads = [x for res in results for x in res["load_per_round"]]
    return [
        f"# {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cores']} cores ({meta['cpu']}), {meta['threads']} torch thread(s); torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}, python {meta['python']}; glibc malloc: "
        f"{meta['malloc']}.  ",
        f"Load (`uptime`) at start: `{meta['load_start']}`; at end: `{meta['load_end']}`; 1-minute load average "
        f"after the timed rounds: {min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f}) on 2 "
        "cores shared with other engineers' test runs.  ",
    ]


def kept_notes(path: Path, default: str) -> str:
    """The hand-written section of an existing report, so that re-running the script keeps it."""
    text = path.read_text() if path.exists() else ""
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split("-->", 1)[1].split(NOTES_END, 1)[0]
    return default


def notes_block(notes: str) -> list[str]:
    return [f"{NOTES_BEGIN} (hand-written; kept when the script rewrites this file) -->", notes.strip(), NOTES_END, ""]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
