"""One training step end to end, side by side: HF + PEFT LoRA vs mtcpeft context-agnostic and context-specific.

Run from the repository root::

    python bench/train_step.py             # SmolLM2-135M + the paper LLM, seq 128 x batch 8; rewrites
                                           # bench/RESULTS_train_step.md (~1 h on 1 core of a shared machine)
    python bench/train_step.py --quick     # CI smoke run: tiny random LMs from configs, seconds, writes nothing
    python bench/train_step.py --json      # also print the results as JSON on stdout
    options: --models smollm2,paper-llm --rank 8 --batch 8 --seq 128 --threads 1 --rounds 5 --warmup 1
             --out PATH ('' = none) --malloc {tuned,default} --profile (top ops of one step per variant, stderr)

The same frozen LM (one copy of its weights, shared by every variant's module tree) and the same batch; per
model and with / without activation checkpointing:

* ``PEFT LoRA``: ``peft.get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM"))`` on exactly the modules mtcpeft's
  "AF" preset adapts, same rank and alpha, no dropout; checkpointing by the HF model's own
  ``activation_checkpointing_enable(use_reentrant=False)`` (transformers 5's name of gradient checkpointing);
* ``mtcpeft agnostic``: ``ContextModel`` with one context (context_ids omitted: every token takes it);
* ``mtcpeft specific``: 2 and 16 contexts, ids in contiguous spans like real layouts (2: image | text halves;
  16: each row a three-segment image | question | answer task on its own three contexts, spans of varying
  length, all 16 contexts used across the batch) and uniformly at random per token;
  checkpointing by ``ContextModel.gradient_checkpointing_enable()``.

A step is forward (HF loss on every position) + backward + ``torch.optim.AdamW`` step + ``zero_grad``, fp32.
Before timing every variant's LoRA factors hold the same random values (each context the same), and the
self-check asserts they all compute the same loss and that PEFT and mtcpeft-agnostic train as many parameters.

Timing: variants interleaved in rounds after warm-up rounds, order rotated each round; reported per variant:
median ms and the median over rounds of the per-round ratio to PEFT (same checkpointing setting) and to
mtcpeft-agnostic (same setting), both in process CPU time (one thread: the step's own compute, what the targets
read) and in wall time (which on a shared machine also counts the time other processes held the core). Memory: peak bytes handed out by the CPU allocator during one step above what
was live before it (weights, adaptor parameters, optimizer state, batch), from torch.profiler [memory] events
(the tracker is checked on known allocations first). ``state MB`` is what the adaptor keeps between steps
(parameters + AdamW's two moments) and gradients allocated in the step: context-specific LoRA has C times the
parameters of one context, which no routing scheme can avoid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402  (stdlib only: nothing heavy loaded before the re-exec)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    H.add_common_args(p)
    p.add_argument("--models", default="smollm2,paper-llm", help="comma-separated: smollm2, paper-llm")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --quick 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; --quick 32)")
    p.add_argument("--contexts", default="2,16", help="context counts of the context-specific variants")
    p.add_argument("--checkpointing", default="off,on", help="off, on or both (default)")
    p.add_argument("--out", default=None, help="markdown report (default bench/RESULTS_train_step.md; --quick: none)")
    p.add_argument("--profile", action="store_true",
                   help="diagnosis: print the top ops of one step of each variant (stderr); no timing, no report")
    return p.parse_args()


ARGS = _parse_args()
H.reexec(ARGS.threads, ARGS.malloc, "_TRAIN_STEP_BENCH_EXEC")

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mtcpeft import ContextModel, LoRAConfig  # noqa: E402
from _harness import clone_sharing_weights, load_model  # noqa: E402

MB = H.MB
TIME_TARGET, MEM_TARGET = 1.05, 1.10


# ------------------------------------------------------------------------------------------------ batch
def span_ids(num_contexts: int, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq) context ids in contiguous spans, as real multimodal / multi-task layouts put them.

    2 contexts: an image-like first half (context 0) then text (context 1), every row. More contexts: row b is a
    three-segment task (image half | question | answer) on contexts 3b, 3b+1, 3b+2 (mod C), the question 1/8 to
    1/4 of the row (random), the answer the rest: every context of 16 appears across 8 rows."""
    ids = torch.empty(batch, seq, dtype=torch.long)
    image = seq // 2
    for b in range(batch):
        if num_contexts == 2:
            ids[b, :image], ids[b, image:] = 0, 1
            continue
        q = int(torch.randint(max(1, seq // 8), max(2, seq // 4 + 1), (1,), generator=gen))
        c0, c1, c2 = ((3 * b + k) % num_contexts for k in range(3))
        ids[b, :image], ids[b, image:image + q], ids[b, image + q:] = c0, c1, c2
    return ids


def random_ids(num_contexts: int, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_contexts, (batch, seq), generator=gen)


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    name: str
    kind: str  # peft | agnostic | specific
    contexts: int
    assign: str  # "-", spans, random
    checkpointing: bool
    model: nn.Module
    call: Callable[[], object]  # the forward returning an output with .loss
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer | None = None
    wall: list[float] = field(default_factory=list)  # seconds per timed step
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per timed step
    peak: int = 0

    def step(self) -> None:
        self.call().loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def lora_init(lm: nn.Module, targets: list[str], rank: int, gen: torch.Generator) -> dict[str, tuple]:
    """Per target module: A (r, d_in) as an nn.Linear init, B (r, d_out) small normal (real gradients)."""
    out = {}
    for name in targets:
        base = lm.get_submodule(name)
        d_in, d_out = base.in_features, base.out_features
        bound = 1.0 / math.sqrt(d_in)
        A = torch.empty(rank, d_in).uniform_(-bound, bound, generator=gen)
        B = torch.empty(rank, d_out).normal_(0.0, 0.02, generator=gen)
        out[name] = (A, B)
    return out


def build_variants(lm: nn.Module, ids: torch.Tensor, rank: int, contexts: list[int], ckpt_modes: list[bool],
                   gen: torch.Generator) -> list[Variant]:
    alpha = 2.0 * rank
    batch, seq = ids.shape
    assigns = {c: {"spans": span_ids(c, batch, seq, gen), "random": random_ids(c, batch, seq, gen)} for c in contexts}
    probe = ContextModel(clone_sharing_weights(lm), "text", LoRAConfig(rank=rank, alpha=alpha), "AF")
    targets = list(probe.target_names)
    del probe
    weights = lora_init(lm, targets, rank, gen)
    out: list[Variant] = []
    for ckpt in ckpt_modes:
        m = clone_sharing_weights(lm)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                                    task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, (A, B) in weights.items():
                layer = pm.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B.t())
        if ckpt:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out.append(Variant("PEFT LoRA", "peft", 1, "-", ckpt, pm, lambda pm=pm: pm(input_ids=ids, labels=ids),
                           [p for p in pm.parameters() if p.requires_grad]))

        def ours(names, kind, assign, ctx_ids):
            cm = ContextModel(clone_sharing_weights(lm), names, LoRAConfig(rank=rank, alpha=alpha), "AF")
            with torch.no_grad():
                for name, layer in cm.context_layers():
                    A, B = weights[name]
                    layer.lora_A.copy_(A.expand_as(layer.lora_A))
                    layer.lora_B.copy_(B.expand_as(layer.lora_B))
            if ckpt:
                cm.gradient_checkpointing_enable()
            label = "mtcpeft agnostic" if kind == "agnostic" else f"mtcpeft specific {len(names)} ctx {assign}"
            out.append(Variant(label, kind, len(names), assign, ckpt, cm,
                               lambda cm=cm: cm(input_ids=ids, context_ids=ctx_ids, labels=ids),
                               [p for p in cm.parameters() if p.requires_grad]))

        ours(["text"], "agnostic", "-", None)
        for c in contexts:
            for assign, ctx_ids in assigns[c].items():
                ours([f"ctx{i}" for i in range(c)], "specific", assign, ctx_ids)
    for v in out:
        v.model.train()
        v.opt = torch.optim.AdamW(v.params, lr=1e-4)
    return out


def self_check(variants: list[Variant]) -> None:
    """Every variant computes the same loss (same LoRA values everywhere) and PEFT trains as many parameters as
    mtcpeft-agnostic: otherwise the comparison is not of the same work."""
    with torch.no_grad():
        losses = {(v.name, v.checkpointing): float(v.call().loss) for v in variants}
    ref = losses[("PEFT LoRA", False)] if ("PEFT LoRA", False) in losses else next(iter(losses.values()))
    for key, loss in losses.items():
        assert math.isclose(loss, ref, rel_tol=1e-4, abs_tol=1e-5), f"self-check: {key} loss {loss} != PEFT {ref}"
    for ckpt in {v.checkpointing for v in variants}:
        p = next(v for v in variants if v.kind == "peft" and v.checkpointing == ckpt)
        a = next(v for v in variants if v.kind == "agnostic" and v.checkpointing == ckpt)
        assert p.trainable == a.trainable, f"self-check: PEFT trains {p.trainable} parameters, mtcpeft {a.trainable}"


def profile_step(v: Variant, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v.step()
    print(f"\n=== {v.name} (checkpointing {'on' if v.checkpointing else 'off'})", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40),
          file=sys.stderr)


# ------------------------------------------------------------------------------------------------ running
def run_model(name: str, quick: bool, batch: int, seq: int, rank: int, contexts: list[int], ckpt_modes: list[bool],
              rounds: int, warmup: int) -> dict:
    lm, label = load_model(name, quick)
    lm.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=gen)
    variants = build_variants(lm, ids, rank, contexts, ckpt_modes, gen)
    self_check(variants)
    print(f"{name}: self-check passed ({len(variants)} variants compute the same loss)", file=sys.stderr, flush=True)
    for v in variants:  # one step first (AdamW allocates its state), then the memory of a steady step
        v.step()
        if not ARGS.profile:
            v.peak = H.peak_bytes(v.step)
    if ARGS.profile:  # diagnosis only: no timing, no report
        for v in variants:
            profile_step(v)
        return {}
    wall, cpu, loads = H.interleaved([v.step for v in variants], rounds, warmup, f"{name}: ")
    for v, w, c in zip(variants, wall, cpu):
        v.wall, v.cpu = w, c
    return {"model": name, "label": label, "batch": batch, "seq": seq, "rank": rank, "alpha": 2.0 * rank,
            "adapted_modules": sum(1 for _ in next(v for v in variants if v.kind == "agnostic").model.context_layers()),
            "load_per_round": loads, "rows": summarise(variants)}


def summarise(variants: list[Variant]) -> list[dict]:
    """Per variant: medians and per-round ratios to PEFT and to mtcpeft-agnostic (same checkpointing setting), in
    CPU time (``ratio_*``, what the targets read) and in wall time (``wall_ratio_*``)."""
    rows = []
    for v in variants:
        peft_v = next(u for u in variants if u.kind == "peft" and u.checkpointing == v.checkpointing)
        agn = next(u for u in variants if u.kind == "agnostic" and u.checkpointing == v.checkpointing)
        row = {"variant": v.name, "kind": v.kind, "contexts": v.contexts, "assign": v.assign,
               "checkpointing": v.checkpointing, "trainable": v.trainable,
               "state_mb": v.trainable * 4 * 4 / MB,  # parameters + gradients + AdamW's two moments, fp32
               "ms": 1e3 * statistics.median(v.cpu), "wall_ms": 1e3 * statistics.median(v.wall),
               "cpu_ms_per_round": [1e3 * t for t in v.cpu], "wall_ms_per_round": [1e3 * t for t in v.wall],
               "peak_mb": v.peak / MB, "mem_ratio_peft": v.peak / peft_v.peak, "mem_ratio_agnostic": v.peak / agn.peak}
        for ref, key in ((peft_v, "peft"), (agn, "agnostic")):
            for clock, prefix in (("cpu", "ratio"), ("wall", "wall_ratio")):
                st = H.ratio_stats(getattr(v, clock), getattr(ref, clock))
                row[f"{prefix}_{key}"], row[f"{prefix}_{key}_min"], row[f"{prefix}_{key}_max"] = \
                    st["median"], st["min"], st["max"]
        rows.append(row)
    return rows


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets: agnostic <= 1.05x PEFT, specific <= 1.05x agnostic in time; memory <= 1.10x."""
    out = []
    for res in results:
        for r in res["rows"]:
            if r["kind"] == "peft":
                continue
            ref = "peft" if r["kind"] == "agnostic" else "agnostic"
            t, w, m = r[f"ratio_{ref}"], r[f"wall_ratio_{ref}"], r[f"mem_ratio_{ref}"]
            out.append({"model": res["model"], "checkpointing": r["checkpointing"],
                        "comparison": f"{r['variant']} vs {'PEFT' if ref == 'peft' else 'agnostic'}",
                        "time": t, "time_wall": w, "time_met": t <= TIME_TARGET, "memory": m,
                        "memory_met": m <= MEM_TARGET})
    return out


def markdown(meta: dict, results: list[dict], notes: str) -> str:
    def ok(flag: bool) -> str:
        return "met" if flag else "**MISSED**"

    out = H.report_header("Training step end to end: HF + PEFT LoRA vs mtcpeft (forward + backward + AdamW step)", meta, results) + [
        f"fp32, batch {meta['batch']} x sequence {meta['seq']}, LoRA rank {meta['rank']} alpha {meta['alpha']:g} on "
        "the \"AF\" preset modules (attention q, k, v, o + feed-forward), no dropout, AdamW lr 1e-4, HF loss on every "
        f"position. Per variant one untimed step (AdamW state), one untimed step under the memory tracker, then "
        f"{meta['warmup']} warm-up round(s) and {meta['rounds']} timed rounds, variants interleaved, order rotated. "
        "`x PEFT` / `x agnostic` = median over rounds of the per-round ratio to the variant with the same "
        "checkpointing setting (min-max in brackets), in process CPU time (1 thread: the step's own compute; the "
        "targets read these) and in wall time (inflated by whatever else held the core during the step). "
        "Peak = allocator bytes above what was live before one step (torch.profiler [memory] events). "
        "State = adaptor parameters + gradients + AdamW moments (C x one context's).",
        "",
        f"## Targets: agnostic <= {TIME_TARGET}x PEFT, specific <= {TIME_TARGET}x agnostic (time); "
        f"<= {MEM_TARGET}x (peak memory)",
        "",
        "| model | checkpointing | comparison | time ratio (CPU) | time ratio (wall) | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets(results):
        out.append(f"| {t['model']} | {'on' if t['checkpointing'] else 'off'} | {t['comparison']} | "
                   f"{t['time']:.3f} {ok(t['time_met'])} | {t['time_wall']:.3f} | "
                   f"{t['memory']:.3f} {ok(t['memory_met'])} |")
    out.append("")
    for res in results:
        out += [f"## {res['label']}", "",
                "| variant | ckpt | trainable M | state MB | CPU ms | wall ms | x PEFT (CPU) | x agnostic (CPU) "
                "| x PEFT (wall) | x agnostic (wall) | peak MB | mem x PEFT | mem x agnostic |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            out.append(
                f"| {r['variant']} | {'on' if r['checkpointing'] else 'off'} | {r['trainable'] / 1e6:.2f} | "
                f"{r['state_mb']:.0f} | {r['ms']:.0f} | {r['wall_ms']:.0f} | {H.ratio_text(r, 'ratio_peft')} | "
                f"{H.ratio_text(r, 'ratio_agnostic')} | {H.ratio_text(r, 'wall_ratio_peft')} | {H.ratio_text(r, 'wall_ratio_agnostic')} | "
                f"{r['peak_mb']:.0f} | {r['mem_ratio_peft']:.3f} | {r['mem_ratio_agnostic']:.3f} |")
        out.append("")
    out += H.notes_block(notes)
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    H.self_check_tracker()
    quick = ARGS.quick
    batch, seq = ARGS.batch or (4 if quick else 8), ARGS.seq or (32 if quick else 128)
    rounds, warmup = ARGS.rounds or (2 if quick else 5), ARGS.warmup if ARGS.warmup is not None else 1
    contexts = [int(c) for c in ARGS.contexts.split(",") if c.strip()]
    modes = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [False, True]}
    if ARGS.checkpointing not in modes:
        raise SystemExit("error: --checkpointing takes off, on or off,on")
    load_start = H.load()
    results = [run_model(m.strip(), quick, batch, seq, ARGS.rank, contexts, modes[ARGS.checkpointing], rounds, warmup)
               for m in ARGS.models.split(",") if m.strip()]
    if ARGS.profile:
        return
    meta = {"command": "python bench/train_step.py " + " ".join(sys.argv[1:]), **H.machine(torch.get_num_threads()),
            "load_start": load_start, "load_end": H.load(), "batch": batch, "seq": seq, "rank": ARGS.rank,
            "alpha": 2.0 * ARGS.rank, "rounds": rounds, "warmup": warmup, "quick": quick}
    default_out = "" if quick else str(Path(__file__).with_name("RESULTS_train_step.md"))
    out = ARGS.out if ARGS.out is not None else default_out
    if out:
        path = Path(out)
        H.write_atomic(path, markdown(meta, results, H.kept_notes(path, "## What limits it\n\n(to be written)")))
        print(f"wrote {path}", file=sys.stderr)
    if ARGS.json:
        print(json.dumps({"meta": meta, "results": results, "targets": targets(results)}, indent=1))
    else:
        print(markdown(meta, results, "").rsplit(H.NOTES_BEGIN, 1)[0])


if __name__ == "__main__":
    main()
