"""One adapted layer, side by side: forward+backward time and peak memory of Context-LoRA vs its baselines.

Run from the repository root::

    python bench/adaptors.py              # full run (~15 min on 1 core), rewrites bench/RESULTS.md
    python bench/adaptors.py --quick      # smoke test: 2 configs, 1/2/16 contexts, 3 rounds, writes nothing
    python bench/adaptors.py --json       # also print machine-readable results on stdout
    python bench/adaptors.py --check      # self-checks only (memory tracker, variants compute the same)
    options: --threads N (default 1), --rounds K, --out PATH, --malloc {tuned,default}

Variants (all wrap the same frozen nn.Linear; x requires grad; LoRA B is random so gradients are real;
upstream gradient is a dense random tensor): the frozen base alone; PEFT's own single LoRA layer
(``peft.get_peft_model``); mtcpeft Context-LoRA with 1, 2, 4, 8, 16 contexts, tokens assigned at random or
in contiguous spans; and the fused-mask scheme of the official Context-PEFT code (every token through every
context's A, one-hot mask, then B), re-implemented HERE ONLY as a baseline.

Timing: all variants interleaved in rounds in one process (warm-up rounds first, order rotated each round);
reported per variant: median ms and the median over rounds of the per-round ratio to PEFT's layer.
Memory: peak bytes handed out by the CPU allocator during one forward+backward, above what was live before
it (inputs, weights, upstream gradient), cumulated from ``torch.profiler`` [memory] events in time order;
validated on known allocations by the self-check that runs first.

The script re-executes itself once with OMP_NUM_THREADS/MKL_NUM_THREADS = --threads and, with
``--malloc tuned`` (default), glibc told never to return freed memory to the OS nor to mmap large blocks
(MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_=0): otherwise every step re-faults its big
activations (see /work/shared/PERF_NOTES.md) and the timings measure page faults as much as matmuls.
"""
from __future__ import annotations

import argparse
import os
import sys

_MALLOC_TUNED = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(64 << 20), "MALLOC_MMAP_MAX_": "0"}


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (fewer configs, contexts, rounds)")
    p.add_argument("--check", action="store_true", help="only run the self-checks (tracker, equivalence)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, --quick 3)")
    p.add_argument("--out", default=None, help="markdown report (default bench/RESULTS.md; --quick: none)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned", help="glibc malloc settings")
    return p.parse_args()


def _reexec_with_env(args: argparse.Namespace) -> None:
    """Thread counts and glibc malloc settings are read at process start: set them and exec once more."""
    want = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.malloc == "tuned":
        want.update(_MALLOC_TUNED)
    if os.environ.get("_ADAPTORS_BENCH_EXEC") != "1":
        env = {**os.environ, **want, "_ADAPTORS_BENCH_EXEC": "1"}
        if args.malloc == "default":
            for k in _MALLOC_TUNED:
                env.pop(k, None)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


ARGS = _parse_args()
_reexec_with_env(ARGS)

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import _harness  # noqa: E402  (bench/ is the script's directory: the shared memory tracker)
from _harness import peak_bytes  # noqa: E402
from mtcpeft.core.adaptors import ContextLoRALayer, LoRAConfig  # noqa: E402
from mtcpeft.core.contexts import Router  # noqa: E402

MB = 1 << 20
N_TOKENS, SEQ_LEN = 12_288, 128  # 96 sequences of 128 tokens
NOTES_BEGIN, NOTES_END = "<!-- notes:begin", "<!-- notes:end -->"


# ----------------------------------------------------------------------------------------------- measurement
def self_check_tracker() -> None:
    """The tracker must give the known answer on known allocations, else its numbers mean nothing."""
    _harness.self_check_tracker()
    # y = x W^T on a frozen W, then y.backward(g): y (N, D) is alive while dx (N, d) is made -> N*(D+d)*4 bytes
    w = torch.randn(48, 32)
    x = torch.randn(4096, 32, requires_grad=True)
    g = torch.randn(4096, 48)

    def matmul() -> None:
        torch.nn.functional.linear(x, w).backward(g)

    got, want = peak_bytes(matmul), 4096 * (48 + 32) * 4
    assert abs(got - want) < 4096, f"tracker: expected {want} B peak for a matmul step, got {got}"
    x.grad = None


# ----------------------------------------------------------------------------------------------- variants
class FusedMaskLoRA(nn.Module):
    """BASELINE ONLY, not part of mtcpeft: the official Context-PEFT scheme re-implemented for comparison.

    Every token goes through every context's A (one (N, d) x (d, C*r) matmul), the (N, C, r) hidden is
    multiplied by the one-hot of each token's context, then by all the B stacked as (C*r, D): cost and
    memory grow linearly with C.
    """

    def __init__(self, base: nn.Linear, context_ids: torch.Tensor, num_contexts: int, rank: int, scale: float):
        super().__init__()
        self.base = base
        # (N, C, 1) one-hot of each token's context, scale folded in (the routing, fixed for the benchmark)
        self.register_buffer("mask", nn.functional.one_hot(context_ids.reshape(-1), num_contexts).float()[..., None] * scale)
        d, D = base.in_features, base.out_features
        self.A = nn.Parameter(torch.randn(num_contexts, d, rank) / d**0.5)  # (C, d, r)
        self.B = nn.Parameter(torch.randn(num_contexts, rank, D) * 0.02)  # (C, r, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, D)."""
        h = torch.einsum("nd,cdr->ncr", x, self.A)  # (N, C, r): every context's A
        h = h * self.mask  # keep only each token's own context
        return self.base(x) + torch.einsum("ncr,crD->nD", h, self.B)


@dataclass
class Variant:
    name: str
    kind: str  # base | peft | ctx | fused
    contexts: int
    assign: str  # "-", random, contiguous
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    peak: int = 0


def context_ids(num_contexts: int, assign: str, gen: torch.Generator) -> torch.Tensor:
    """(B, S) ids: uniform at random per token, or each sequence cut into ``num_contexts`` contiguous spans."""
    if assign == "random":
        return torch.randint(0, num_contexts, (N_TOKENS // SEQ_LEN, SEQ_LEN), generator=gen)
    span = torch.arange(SEQ_LEN) * num_contexts // SEQ_LEN
    return span.expand(N_TOKENS // SEQ_LEN, SEQ_LEN).clone()


def build_variants(base: nn.Linear, rank: int, contexts: list[int], gen: torch.Generator) -> list[Variant]:
    alpha = 2.0 * rank  # scale 2 for every adapted variant
    out: list[Variant] = [Variant("base (frozen Linear)", "base", 0, "-", base, [])]

    holder = nn.Module()
    holder.proj = base
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    player = pm.base_model.model.proj
    holder.proj = base  # keep `base` usable alone; the PEFT layer still wraps it
    nn.init.normal_(player.lora_B["default"].weight, std=0.02, generator=gen)
    out.append(Variant("PEFT LoRA", "peft", 1, "-", player, [p for p in player.parameters() if p.requires_grad]))

    for c in contexts:
        for assign in ("random", "contiguous") if c > 1 else ("-",):
            router = Router(num_contexts=c)
            layer = ContextLoRALayer(base, router, LoRAConfig(rank=rank, alpha=alpha))
            nn.init.normal_(layer.lora_B, std=0.02, generator=gen)
            ids = context_ids(c, assign if c > 1 else "random", gen)
            router.route(ids)  # once per model forward, shared by every layer: not timed here
            out.append(Variant(f"Context-LoRA {c} ctx {assign}".replace(" -", ""), "ctx", c, assign, layer,
                               [layer.lora_A, layer.lora_B]))
    for c in contexts:
        if c > 1:
            fused = FusedMaskLoRA(base, context_ids(c, "random", gen), c, rank, alpha / rank)
            out.append(Variant(f"fused-mask baseline {c} ctx", "fused", c, "random", fused, [fused.A, fused.B]))
    return out


def make_step(v: Variant, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        v.forward(x).backward(g)
        x.grad = None
        for p in v.params:
            p.grad = None

    return step


def check_equivalence(rank: int) -> None:
    """The variants compute the same function: Context-LoRA with every context holding PEFT's weights equals
    PEFT; the fused-mask baseline with Context-LoRA's (distinct) weights and routing equals Context-LoRA."""
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(64, 96).requires_grad_(False)
    vs = {v.name: v.forward for v in build_variants(base, rank, [3], gen)}
    peft_l, ctx_l, fused = vs["PEFT LoRA"], vs["Context-LoRA 3 ctx random"], vs["fused-mask baseline 3 ctx"]
    x = torch.randn(N_TOKENS, 64, requires_grad=True)
    g = torch.randn(N_TOKENS, 96)

    def run(layer: nn.Module) -> list[torch.Tensor]:
        y = layer(x)
        y.backward(g)
        out, x.grad = [y.detach(), x.grad], None
        return out + [p.grad for p in layer.parameters() if p.requires_grad]

    def same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
        for u, v in zip(a, b):
            assert torch.allclose(u, v, atol=1e-4, rtol=1e-4), f"self-check: {what}"

    with torch.no_grad():  # fused-mask <- Context-LoRA's weights (A transposed) and routing
        fused.A.copy_(ctx_l.lora_A.transpose(1, 2))
        fused.B.copy_(ctx_l.lora_B)
        fused.mask.copy_(nn.functional.one_hot(ctx_l._router.plan.ids, 3)[..., None] * ctx_l.scale)
    got, want = run(fused), run(ctx_l)
    same(got[:2] + [got[2].transpose(1, 2), got[3]], want, "fused-mask baseline differs from Context-LoRA")
    A, B = peft_l.lora_A["default"].weight, peft_l.lora_B["default"].weight  # (r, d), (D, r)
    with torch.no_grad():
        ctx_l.lora_A.copy_(A.expand_as(ctx_l.lora_A))
        ctx_l.lora_B.copy_(B.t().expand_as(ctx_l.lora_B))
    same(run(ctx_l)[:2], run(peft_l)[:2], "Context-LoRA with PEFT's weights differs from PEFT's LoRA")


# ----------------------------------------------------------------------------------------------- running
def run_config(d: int, D: int, rank: int, contexts: list[int], rounds: int, warmup: int) -> list[Variant]:
    gen = torch.Generator().manual_seed(d * 7 + D + rank)
    base = nn.Linear(d, D).requires_grad_(False)
    variants = build_variants(base, rank, contexts, gen)
    x = torch.randn(N_TOKENS, d, generator=gen).requires_grad_(True)
    g = torch.randn(N_TOKENS, D, generator=gen)
    steps = [make_step(v, x, g) for v in variants]
    for v, step in zip(variants, steps):  # memory first, on a fresh step of each (after one warm-up step)
        step()
        v.peak = peak_bytes(step)
    for r in range(warmup + rounds):
        k = r % len(variants)  # rotate the order: no variant always runs right after the same one
        for v, step in list(zip(variants, steps))[k:] + list(zip(variants, steps))[:k]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if r >= warmup:
                v.times.append(t1 - t0)
                v.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"  {d}->{D} r={rank}: round {r + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    return variants


def summarise(variants: list[Variant]) -> list[dict]:
    ref = next(v for v in variants if v.kind == "peft")
    rows = []
    for v in variants:
        ratios = [t / p for t, p in zip(v.times, ref.times)]
        rows.append({
            "variant": v.name, "kind": v.kind, "contexts": v.contexts, "assign": v.assign,
            "ms": 1e3 * statistics.median(v.times), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "peak_mb": v.peak / MB, "mem_ratio": v.peak / ref.peak,
            "faults_per_step": statistics.median(v.faults),
        })
    return rows


def plan_ms(contexts: int) -> float:
    """Time to build the routing plan (once per model forward, shared by all layers) for random ids."""
    ids = context_ids(contexts, "random", torch.Generator().manual_seed(0))
    router = Router(contexts)
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        router.route(ids)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def targets(results: list[dict]) -> list[str]:
    lines = []
    for cfg in results:
        for row in cfg["rows"]:
            if row["kind"] == "ctx" and row["contexts"] == 16:
                ok_t, ok_m = row["ratio"] <= 1.10, row["mem_ratio"] <= 1.25
                lines.append(f"| {cfg['d']}->{cfg['D']} | {cfg['rank']} | {row['assign']} | {row['ratio']:.2f} "
                             f"{'met' if ok_t else 'MISSED'} | {row['mem_ratio']:.2f} {'met' if ok_m else 'MISSED'} |")
    return lines


def markdown(meta: dict, results: list[dict], notes: str) -> str:
    out = [
        "# One adapted layer: Context-LoRA vs PEFT LoRA vs fused-mask (forward + backward)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cores']} cores ({meta['cpu']}), {meta['threads']} torch thread(s), torch {meta['torch']}, "
        f"peft {meta['peft']}, python {meta['python']}; glibc malloc: {meta['malloc']}.  ",
        f"N = {N_TOKENS:,} tokens (96 x 128), fp32, x requires grad, base frozen, dense random upstream gradient, "
        f"alpha = 2r. {meta['rounds']} timed rounds after {meta['warmup']} warm-up round(s), variants interleaved; "
        "`x PEFT` = median over rounds of the per-round time ratio to PEFT's LoRA layer (min-max in brackets). "
        "Peak = allocator bytes above the live inputs/weights during one forward+backward (torch.profiler "
        "[memory] events; validated on known allocations). Routing plan build (once per model forward, not "
        f"per layer, not timed above): {meta['plan_ms']:.2f} ms at 16 random contexts.",
        "",
        "## Target: Context-LoRA at 16 contexts <= 1.10x PEFT time and <= 1.25x PEFT peak memory",
        "",
        "| d->D | r | assignment | time x PEFT | memory x PEFT |",
        "|---|---|---|---|---|",
        *targets(results),
        "",
    ]
    for cfg in results:
        out += [f"## {cfg['d']} -> {cfg['D']}, r = {cfg['rank']}", "",
                "| variant | ms | x PEFT | peak MB | mem x PEFT |", "|---|---:|---:|---:|---:|"]
        for r in cfg["rows"]:
            out.append(f"| {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
                       f" | {r['peak_mb']:.1f} | {r['mem_ratio']:.2f} |")
        out.append("")
    out += [f"{NOTES_BEGIN} (hand-written; kept when the script rewrites this file) -->", notes.strip(), NOTES_END, ""]
    return "\n".join(out)


def kept_notes(path: Path) -> str:
    """The hand-written section of an existing report, so that re-running the script keeps it."""
    text = path.read_text() if path.exists() else ""
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split("-->", 1)[1].split(NOTES_END, 1)[0]
    return "## What limits it\n\n(write from the measurements above)"


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    self_check_tracker()
    for r in (4, 8):
        check_equivalence(r)
    print("self-check passed: memory tracker exact on known allocations, variants equivalent", file=sys.stderr)
    if ARGS.check:
        return
    quick = ARGS.quick
    configs = [(768, 768, 8), (768, 768, 64)] if quick else [(768, 768, 8), (768, 768, 64), (768, 3072, 8), (768, 3072, 64)]
    contexts = [1, 2, 16] if quick else [1, 2, 4, 8, 16]
    rounds, warmup = ARGS.rounds or (3 if quick else 7), 1
    results = []
    for d, D, rank in configs:
        rows = summarise(run_config(d, D, rank, contexts, rounds, warmup))
        results.append({"d": d, "D": D, "rank": rank, "rows": rows})
    meta = {
        "command": "python bench/adaptors.py " + " ".join(sys.argv[1:]), "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version(),
        "malloc": ", ".join(f"{k}={os.environ[k]}" for k in _MALLOC_TUNED if k in os.environ) or "defaults",
        "rounds": rounds, "warmup": warmup, "plan_ms": plan_ms(16),
    }
    out = ARGS.out or (None if quick else str(Path(__file__).with_name("RESULTS.md")))
    if out:
        path = Path(out)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(markdown(meta, results, kept_notes(path)))
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)
    if ARGS.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
    else:
        print("\n".join(markdown(meta, results, "").split("\n")[:-4]))


if __name__ == "__main__":
    main()
