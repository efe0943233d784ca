"""Cached greedy generation, tokens/s: mtcpeft context-specific vs HF + PEFT LoRA holding the same weights.

Run from the repository root::

    python bench/generate.py            # SmolLM2-135M + the paper LLM, batch 1 and 8;
                                        # rewrites bench/RESULTS_generate.md
    python bench/generate.py --quick    # CI smoke run: tiny random LMs from configs, seconds, writes nothing
    python bench/generate.py --json     # also print the results as JSON on stdout
    options: --models smollm2,paper-llm --batches 1,8 --prompt 48 --new 32 --rank 8 --threads 1 --rounds 7
             --warmup 1 --out PATH ('' = none) --malloc {tuned,default}

Variants, per model and batch size, on one frozen LM (weights shared by every variant's module tree), fp32, KV
cache, greedy, exactly ``--new`` new tokens per row (``min_new_tokens`` = ``max_new_tokens``):

* ``HF base``: the LM without adaptor (for scale only);
* ``PEFT LoRA``: the mtcpeft-agnostic adaptor exported with ``mtcpeft.plugins.peft.export_peft`` and loaded by
  ``peft.PeftModel.from_pretrained`` — what a user of HF + PEFT runs;
* ``mtcpeft agnostic``: ``ContextModel`` with one context, LoRA factors random (B non-zero);
* ``mtcpeft specific``: contexts image, question, answer, each holding the agnostic factors; the prompt is an
  image-like span (context image) then a question span (context question), new tokens take ``answer``.

Self-check before timing, per batch size: the three adapted variants generate the same tokens with the same
scores (the adaptor changes them: they differ from the base LM's), and, by wrapping ``router.build``, every
forward of mtcpeft's generate is routed as it should: the prompt forward of the specific model groups its two
contexts, and every decode step (one token per row, one context) takes the no-sort path
(``RoutingPlan.uniform`` is not None, ``perm`` is None).

Timing: one ``generate`` call per variant per round, variants interleaved in rounds after warm-up rounds, order
rotated; tokens/s = batch x new tokens / wall time of the call (prompt forward included); ``x PEFT`` = median
over rounds of the per-round ratio of tokens/s to PEFT's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402  (stdlib only: nothing heavy loaded before the re-exec)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    H.add_common_args(p)
    p.add_argument("--models", default="smollm2,paper-llm", help="comma-separated: smollm2, paper-llm")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per row (default 48; --quick 12)")
    p.add_argument("--new", type=int, default=None, help="new tokens per row (default 32; --quick 6)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--out", default=None, help="markdown report (default bench/RESULTS_generate.md; --quick: none)")
    return p.parse_args()


ARGS = _parse_args()
H.reexec(ARGS.threads, ARGS.malloc, "_GENERATE_BENCH_EXEC")

import json  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from mtcpeft import ContextModel, LoRAConfig  # noqa: E402
from mtcpeft.plugins.peft import export_peft  # noqa: E402
from _harness import clone_sharing_weights, load_model  # noqa: E402

TARGET = 0.95  # mtcpeft specific tokens/s >= 0.95 x PEFT's
CONTEXTS = ("image", "question", "answer")


@dataclass
class Variant:
    name: str
    kind: str  # base | peft | agnostic | specific
    model: nn.Module
    context_ids: torch.Tensor | None = None  # (B, P) prompt contexts (mtcpeft only)
    wall: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per call
    cpu: dict[int, list[float]] = field(default_factory=dict)  # batch -> process CPU seconds per call

    def generate(self, ids: torch.Tensor, config: GenerationConfig, **kw):
        mask = torch.ones_like(ids)
        if self.kind in ("agnostic", "specific"):
            ctx = None if self.context_ids is None else self.context_ids[: ids.shape[0]]
            return self.model.generate(ids, context_ids=ctx, attention_mask=mask, generation_config=config, **kw)
        return self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kw)


def prompt_contexts(batch: int, prompt: int) -> torch.Tensor:
    """(batch, prompt): an image-like first half (context 0) then the question (context 1)."""
    ctx = torch.ones(batch, prompt, dtype=torch.long)
    ctx[:, : prompt // 2] = 0
    return ctx


def build_variants(lm: nn.Module, rank: int, max_batch: int, prompt: int, gen: torch.Generator,
                   tmp: Path) -> list[Variant]:
    cfg = LoRAConfig(rank=rank, alpha=2.0 * rank)
    agnostic = ContextModel(clone_sharing_weights(lm), "text", cfg, "AF", generated_context="text")
    with torch.no_grad():  # a trained-looking adaptor: B non-zero, so the update changes the tokens
        for _, layer in agnostic.context_layers():
            layer.lora_B.normal_(0.0, 0.05, generator=gen)
    specific = ContextModel(clone_sharing_weights(lm), ",".join(CONTEXTS), cfg, "AF", generated_context="answer")
    with torch.no_grad():
        for (_, a), (_, s) in zip(agnostic.context_layers(), specific.context_layers()):
            s.lora_A.copy_(a.lora_A.expand_as(s.lora_A))
            s.lora_B.copy_(a.lora_B.expand_as(s.lora_B))
    folder = export_peft(agnostic, "text", tmp / "peft_adapter")
    peft_model = peft.PeftModel.from_pretrained(clone_sharing_weights(lm), str(folder))
    out = [Variant("HF base (no adaptor)", "base", lm), Variant("PEFT LoRA", "peft", peft_model),
           Variant("mtcpeft agnostic", "agnostic", agnostic),
           Variant("mtcpeft specific (3 contexts)", "specific", specific, prompt_contexts(max_batch, prompt))]
    for v in out:
        v.model.eval()
    return out


def recorded_plans(model: ContextModel):
    """Wrap ``model.router.build`` to keep every plan it makes; returns (plans, undo)."""
    plans = []
    real = model.router.build

    def build(context_ids):
        plan = real(context_ids)
        plans.append(plan)
        return plan

    model.router.build = build
    return plans, lambda: delattr(model.router, "build")


def self_check(variants: list[Variant], ids: torch.Tensor, config: GenerationConfig) -> None:
    """Same tokens and scores from PEFT and both mtcpeft models (different from the base LM's), and the routing
    of mtcpeft's generate: a grouped prompt forward, then decode steps on the no-sort path."""
    batch, prompt = ids.shape
    new = config.max_new_tokens
    outs, plans = {}, {}
    for v in variants:
        if v.kind in ("agnostic", "specific"):
            plans[v.kind], undo = recorded_plans(v.model)
        try:
            with torch.no_grad():
                outs[v.kind] = v.generate(ids, config, output_scores=True, return_dict_in_generate=True)
        finally:
            if v.kind in plans:
                undo()
    ref = outs["peft"]
    assert ref.sequences.shape == (batch, prompt + new), f"self-check: PEFT generated {ref.sequences.shape}"
    for kind in ("agnostic", "specific"):
        assert torch.equal(outs[kind].sequences, ref.sequences), f"self-check: {kind} tokens differ from PEFT's"
        for a, b in zip(outs[kind].scores, ref.scores):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3, msg=lambda m: f"self-check: {kind} scores: {m}")
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(outs["base"].scores, ref.scores)), \
        "self-check: the adaptor does not change the scores; the comparison would not test it"
    for kind, ps in plans.items():
        assert len(ps) == new, f"self-check: {kind} built {len(ps)} routing plans for {new} forwards"
        first, steps = ps[0], ps[1:]
        assert first.num_tokens == batch * prompt
        if kind == "specific":
            assert first.uniform is None and first.perm is not None, "the two-context prompt must be grouped"
        want = variants[[v.kind for v in variants].index(kind)].model.generated_context
        for p in steps:
            assert p.num_tokens == batch, f"self-check: a decode step fed {p.num_tokens} tokens, not {batch} (cache?)"
            assert p.uniform == want and p.perm is None, "self-check: a decode step left the no-sort path"


def run_model(name: str, quick: bool, batches: list[int], prompt: int, new: int, rank: int, rounds: int,
              warmup: int) -> dict:
    lm, label = load_model(name, quick)
    lm.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    ids_all = torch.randint(3, lm.config.vocab_size, (max(batches), prompt), generator=gen)
    eos = lm.generation_config.eos_token_id if lm.generation_config.eos_token_id is not None else 0
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                              num_beams=1, eos_token_id=eos, pad_token_id=eos)
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(lm, rank, max(batches), prompt, gen, Path(tmp))
    for b in batches:
        self_check(variants, ids_all[:b], config)
    print(f"{name}: self-check passed (same tokens, decode steps on the no-sort path)", file=sys.stderr, flush=True)

    def call(v: Variant, b: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                v.generate(ids_all[:b], config)
        return run

    loads = []
    for b in batches:
        wall, cpu, ld = H.interleaved([call(v, b) for v in variants], rounds, warmup, f"{name} batch {b}: ")
        loads += ld
        for v, w, c in zip(variants, wall, cpu):
            v.wall[b], v.cpu[b] = w, c
    rows = []
    for b in batches:
        peft_v = next(v for v in variants if v.kind == "peft")
        for v in variants:
            row = {"variant": v.name, "kind": v.kind, "batch": b,
                   "tokens_per_s": b * new / statistics.median(v.cpu[b]),
                   "wall_tokens_per_s": b * new / statistics.median(v.wall[b]),
                   "ms_per_call": 1e3 * statistics.median(v.cpu[b]),
                   "wall_ms_per_call": 1e3 * statistics.median(v.wall[b])}
            for clock, prefix in (("cpu", "ratio_peft"), ("wall", "wall_ratio_peft")):
                # tokens/s ratio = PEFT's time / this variant's time, per round
                st = H.ratio_stats(getattr(peft_v, clock)[b], getattr(v, clock)[b])
                row[prefix], row[prefix + "_min"], row[prefix + "_max"] = st["median"], st["min"], st["max"]
            rows.append(row)
    return {"model": name, "label": label, "prompt": prompt, "new": new, "rank": rank, "load_per_round": loads,
            "rows": rows}


def markdown(meta: dict, results: list[dict], notes: str) -> str:
    out = H.report_header("Cached greedy generation: mtcpeft context-specific vs HF + PEFT LoRA (same weights)", meta, results) + [
        f"fp32, KV cache, greedy, prompt {meta['prompt']} tokens (mtcpeft specific: {meta['prompt'] // 2} image + "
        f"{meta['prompt'] - meta['prompt'] // 2} question), exactly {meta['new']} new tokens per row (answer), LoRA "
        f"rank {meta['rank']} on the \"AF\" modules; PEFT loads the mtcpeft-agnostic adaptor exported with "
        "`mtcpeft.plugins.peft.export_peft`. Self-checked before timing: identical tokens and scores for PEFT and both "
        "mtcpeft models; mtcpeft's decode steps all on the no-sort path (`RoutingPlan.uniform` set). "
        f"{meta['warmup']} warm-up round(s) then {meta['rounds']} timed rounds, variants interleaved, order rotated; "
        "tokens/s counts the whole generate call (prompt forward included); `x PEFT` = median over rounds of the "
        "per-round tokens/s ratio (min-max in brackets), in process CPU time (1 thread: the call's own compute; the "
        "target reads it) and in wall time.",
        "",
        f"## Target: mtcpeft specific >= {TARGET}x PEFT tokens/s",
        "",
        "| model | batch | specific x PEFT (CPU) | specific x PEFT (wall) | agnostic x PEFT (CPU) |",
        "|---|---:|---|---|---|",
    ]
    for res in results:
        for b in sorted({r["batch"] for r in res["rows"]}):
            row = {r["kind"]: r for r in res["rows"] if r["batch"] == b}
            s, a = row["specific"], row["agnostic"]
            out.append(f"| {res['model']} | {b} | {s['ratio_peft']:.3f} "
                       f"{'met' if s['ratio_peft'] >= TARGET else '**MISSED**'} | {s['wall_ratio_peft']:.3f} | "
                       f"{a['ratio_peft']:.3f} |")
    out.append("")
    for res in results:
        out += [f"## {res['label']}", "",
                "| variant | batch | tokens/s (CPU) | tokens/s (wall) | x PEFT (CPU) | x PEFT (wall) |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            out.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['wall_tokens_per_s']:.1f} | "
                       f"{H.ratio_text(r, 'ratio_peft')} | {H.ratio_text(r, 'wall_ratio_peft')} |")
        out.append("")
    out += H.notes_block(notes)
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    quick = ARGS.quick
    prompt, new = ARGS.prompt or (12 if quick else 48), ARGS.new or (6 if quick else 32)
    rounds, warmup = ARGS.rounds or (2 if quick else 7), ARGS.warmup if ARGS.warmup is not None else 1
    batches = [int(b) for b in ARGS.batches.split(",") if b.strip()]
    load_start = H.load()
    results = [run_model(m.strip(), quick, batches, prompt, new, ARGS.rank, rounds, warmup)
               for m in ARGS.models.split(",") if m.strip()]
    meta = {"command": "python bench/generate.py " + " ".join(sys.argv[1:]), **H.machine(torch.get_num_threads()),
            "load_start": load_start, "load_end": H.load(), "prompt": prompt, "new": new, "rank": ARGS.rank,
            "batches": batches, "rounds": rounds, "warmup": warmup, "quick": quick}
    targets = [{"model": res["model"], "batch": r["batch"], "ratio": r["ratio_peft"], "met": r["ratio_peft"] >= TARGET}
               for res in results for r in res["rows"] if r["kind"] == "specific"]
    out = ARGS.out if ARGS.out is not None else ("" if quick else str(Path(__file__).with_name("RESULTS_generate.md")))
    if out:
        path = Path(out)
        H.write_atomic(path, markdown(meta, results, H.kept_notes(path, "## What limits it\n\n(to be written)")))
        print(f"wrote {path}", file=sys.stderr)
    if ARGS.json:
        print(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=1))
    else:
        print(markdown(meta, results, "").rsplit(H.NOTES_BEGIN, 1)[0])


if __name__ == "__main__":
    main()
