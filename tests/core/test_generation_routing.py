"""Generation routing owned by mtcpeft, and routing plans that live exactly as long as their forward.

Oracles are independent of the code under test: the logits ``generate`` reports at each step must equal those of
ONE full-sequence forward over the finished sequences (prompt contexts + the generated context), whatever the
decoding strategy; a left-padded batch must generate what each row generates alone; beam search with the KV cache
must equal beam search without it. Gradient checkpointing: two forwards of the same shape and one backward of the
summed losses must equal the two backwards done separately.
"""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_lm
from mtcpeft import ContextIdsError, ContextModel, adaptor_config
from mtcpeft.models.paper_llm import build_paper_llm
from support.reference import randomize_adaptors

KINDS = ["lora", "ia3", "bitfit"]
FAMILIES = ["llama", "gpt2", "opt", "paper"]
GEN = 2  # "answer": the context of generated tokens


def build(family: str, kind: str, seed: int = 0) -> ContextModel:
    if family == "paper":
        torch.manual_seed(seed)
        lm = build_paper_llm(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0,
                             eos_token_id=0).eval()
    else:
        lm = tiny_lm(family, seed)
    cfg = adaptor_config(kind, **({"rank": 4} if kind == "lora" else {}))
    m = ContextModel(lm, "image,question,answer", cfg, "AF", generated_context="answer")
    m.model.generation_config.eos_token_id = None  # fixed-length generations, compared position by position
    randomize_adaptors(m, scale=0.5, seed=seed)
    return m


def prompt(b: int = 2, s: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    ctx = torch.zeros(b, s, dtype=torch.long)
    ctx[:, s // 2:] = 1  # image tokens, then the question; the answer is generated
    return ids, ctx


def full_forward_logits(m: ContextModel, seqs, prompt_ctx, mask=None):
    """Logits of one uncached forward over whole sequences: prompt tokens keep their contexts, new ones GEN."""
    rep = seqs.shape[0] // prompt_ctx.shape[0]
    pctx = prompt_ctx.repeat_interleave(rep, 0)
    ctx = torch.cat([pctx, torch.full((seqs.shape[0], seqs.shape[1] - pctx.shape[1]), GEN)], 1)
    kwargs = {}
    if mask is not None:
        mask = mask.repeat_interleave(rep, 0)
        mask = torch.cat([mask, torch.ones(seqs.shape[0], seqs.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return m(seqs, context_ids=ctx, use_cache=False, **kwargs).logits


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.3),
    "sampling-2-sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_step_logits_equal_one_full_forward(family, strategy, use_cache):
    m = build(family, "lora", seed=1)
    ids, ctx = prompt(seed=2)
    torch.manual_seed(0)
    out = m.generate(ids, context_ids=ctx, max_new_tokens=6, pad_token_id=0, use_cache=use_cache,
                     attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_logits=True,
                     **STRATEGIES[strategy])
    assert m.router.plan is None  # generation leaves no routing behind
    full = full_forward_logits(m, out.sequences, ctx)
    P = ids.shape[1]
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, P - 1 + t], atol=2e-4, rtol=1e-4, msg=f"step {t}")


@pytest.mark.parametrize("family", ["llama", "opt", "paper"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_left_padded_batch_generates_what_each_row_generates_alone(family, kind, use_cache):
    m = build(family, kind, seed=3)
    ids, ctx = prompt(b=2, s=8, seed=4)
    pad = 3  # row 1 is 3 tokens shorter: left-padded with context -1 (no adaptor)
    ids[1, :pad], ctx[1, :pad] = 0, -1
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=use_cache)
    batched = m.generate(ids, context_ids=ctx, attention_mask=mask, **common)
    alone = [m.generate(ids[:1], context_ids=ctx[:1], attention_mask=mask[:1], **common),
             m.generate(ids[1:, pad:], context_ids=ctx[1:, pad:], attention_mask=mask[1:, pad:], **common)]
    assert torch.equal(batched[0, -6:], alone[0][0, -6:])
    assert torch.equal(batched[1, -6:], alone[1][0, -6:])


@pytest.mark.parametrize("family", ["llama", "gpt2", "paper"])
def test_beam_search_with_cache_equals_without(family):
    m = build(family, "lora", seed=5)
    ids, ctx = prompt(b=2, s=6, seed=6)
    common = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_scores=True)
    cached = m.generate(ids, context_ids=ctx, use_cache=True, **common)
    uncached = m.generate(ids, context_ids=ctx, use_cache=False, **common)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4)
    # the winning beams score what one full forward over them says (routing of every step, not only agreement)
    full = torch.log_softmax(full_forward_logits(m, cached.sequences, ctx).float(), -1)
    P, new = ids.shape[1], cached.sequences[:, ids.shape[1]:]
    total = full[:, P - 1:-1].gather(-1, new.unsqueeze(-1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(cached.sequences_scores * new.shape[1], total, atol=1e-3, rtol=1e-4)


def test_inconsistent_decoding_is_an_error_not_silent_misrouting():
    """If a transformers release fed steps in a way mtcpeft does not expect, the attention mask says so."""
    from mtcpeft.core.model import GenerationRouting

    r = GenerationRouting(torch.zeros(2, 5, dtype=torch.long), generated=1, cached=True)
    assert r.step(2, 5, torch.ones(2, 5)).tolist() == [[0] * 5] * 2
    assert r.step(2, 1, torch.ones(2, 6)).tolist() == [[1], [1]]
    with pytest.raises(ContextIdsError, match="attention mask covers 9 positions"):
        r.step(2, 1, torch.ones(2, 9))
    with pytest.raises(ContextIdsError, match="rows"):
        GenerationRouting(torch.zeros(2, 5, dtype=torch.long), 1, cached=False).step(3, 5)


def test_speculative_decoding_is_refused():
    m = build("llama", "lora")
    ids, ctx = prompt()
    with pytest.raises(ValueError, match="speculative"):
        m.generate(ids, context_ids=ctx, max_new_tokens=2, prompt_lookup_num_tokens=3)


def test_paper_llm_takes_the_cache_under_either_name():
    """Releases before 5.24 pass the cache as past_key_values, later ones as cache: both continue the sequence."""
    from transformers import DynamicCache

    m = build("paper", "lora")
    ids = torch.randint(1, VOCAB, (2, 9))
    ctx = torch.zeros_like(ids)
    with torch.no_grad():
        whole = m(ids, context_ids=ctx, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=m.model.config)
            m(ids[:, :-1], context_ids=ctx[:, :-1], use_cache=True, **{name: cache})
            assert cache.get_seq_length() == ids.shape[1] - 1, name
            last = m(ids[:, -1:], context_ids=ctx[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(last, whole, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ plan lifetime
def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_recomputation_uses_the_plan_of_its_own_forward(family, kind):
    m = build(family, kind, seed=7).train()
    m.gradient_checkpointing_enable()
    ids, ctx1 = prompt(b=2, s=9, seed=8)
    ctx2 = ctx1.flip(1)  # same shape, other contexts
    ctx2[0, :2] = -1
    for p in m.parameters():
        p.grad = None
    m(ids, context_ids=ctx1, labels=ids, use_cache=False).loss.backward()
    m(ids, context_ids=ctx2, labels=ids, use_cache=False).loss.backward()
    separate = _grads(m)
    for p in m.parameters():
        p.grad = None
    loss1 = m(ids, context_ids=ctx1, labels=ids, use_cache=False).loss
    loss2 = m(ids, context_ids=ctx2, labels=ids, use_cache=False).loss  # runs before loss1's recomputation
    (loss1 + loss2).backward()
    summed = _grads(m)
    assert separate.keys() == summed.keys() and separate
    for n in separate:
        torch.testing.assert_close(summed[n], separate[n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_plan_outlives_its_forward():
    m = build("llama", "lora")
    ids, ctx = prompt()
    m(ids, context_ids=ctx)
    assert m.router.plan is None
    with pytest.raises(ContextIdsError, match="no routing plan"):
        m.model(ids)
    with pytest.raises(ValueError, match="use_reentrant"):
        m.gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("beams", [1, 2])
def test_rows_generating_in_different_contexts_equal_each_row_alone(use_cache, beams):
    """A mixed-task batch: each row names the context of its own new tokens."""
    m = build("llama", "lora", seed=9)
    ids, ctx = prompt(b=3, s=6, seed=10)
    gens = ["answer", "image", "question"]
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=use_cache, num_beams=beams,
                  attention_mask=torch.ones(1, 6, dtype=torch.long))
    together = m.generate(ids, context_ids=ctx, generated_context=gens,
                          **{**common, "attention_mask": torch.ones_like(ids)})
    for i, g in enumerate(gens):
        alone = m.generate(ids[i:i + 1], context_ids=ctx[i:i + 1], generated_context=g, **common)
        assert torch.equal(together[i], alone[0]), g
    with pytest.raises(ContextIdsError, match="generated contexts for 3 prompts"):
        m.generate(ids, context_ids=ctx, generated_context=["answer", "image"], max_new_tokens=2)
