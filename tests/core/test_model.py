"""ContextModel on several tiny model families x every adaptor kind."""
import copy

import pytest
import torch

from conftest import FAMILIES, VOCAB, tiny_lm
from mtcpeft import ContextIdsError, ContextModel, TargetError, adaptor_config
from mtcpeft.core.adaptors import ADAPTORS, ContextLayer
from support.reference import manual_greedy, naive_adapt, randomize_adaptors

KINDS = [k for k in ADAPTORS.names() if ADAPTORS.get(k).layer_cls is not None]
CONTEXTS = "image,question,answer"


def build(family, kind, targets="AF", contexts=CONTEXTS, seed=0, **opts):
    cfg = adaptor_config(kind, **({"rank": 4, **opts} if kind == "lora" else opts))
    gen = "answer" if "answer" in contexts.split(",") else None
    m = ContextModel(tiny_lm(family, seed), contexts, cfg, targets, generated_context=gen)
    m.model.generation_config.eos_token_id = None  # compare fixed-length generations token for token
    randomize_adaptors(m, scale=0.3)
    return m


def batch(b=2, s=11, contexts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    ctx = torch.randint(-1, contexts, (b, s), generator=g)
    return ids, ctx


def trainable(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_matches_naive_per_token_layers(family, kind, monkeypatch):
    """Same loss and gradients as the model whose every adapted layer is the naive per-token loop."""
    m = build(family, kind).train()
    ids, ctx = batch()
    out = m(ids, context_ids=ctx, labels=ids)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in trainable(m).items()}
    assert len(fast) == len(m.adaptor_state_dict()) > 0
    m.zero_grad()
    flat_ctx = ctx.reshape(-1)
    monkeypatch.setattr(ContextLayer, "forward", lambda self, x: naive_adapt(self, x, flat_ctx))
    ref = m(ids, context_ids=ctx, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    for n, p in trainable(m).items():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_fresh_injection_equals_base_model(family, kind):
    base = tiny_lm(family)
    ids, ctx = batch()
    ref = base(ids).logits
    m = ContextModel(copy.deepcopy(base), CONTEXTS, kind, "AF")
    assert torch.equal(m(ids, context_ids=ctx).logits, ref)
    assert all(not p.requires_grad for n, p in m.named_parameters() if "base_layer" in n or "embed" in n)
    if kind == "none":
        assert m.num_adaptor_parameters() == 0 and not trainable(m)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_same_loss_and_grads(family, kind):
    m = build(family, kind).train()
    ids, ctx = batch(s=13)
    loss = m(ids, context_ids=ctx, labels=ids).loss
    loss.backward()
    ref = {n: p.grad.clone() for n, p in trainable(m).items()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert any(getattr(mod, "gradient_checkpointing", False) for mod in m.model.modules())
    loss2 = m(ids, context_ids=ctx, labels=ids, use_cache=False).loss
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for n, p in trainable(m).items():
        torch.testing.assert_close(ref[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_and_without_cache_equals_manual_loop(family, kind):
    m = build(family, kind, seed=1)
    ids, ctx = batch(s=7, seed=3)
    ctx[:, -1] = 1  # question, then the answer is generated
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with_cache = m.generate(ids, context_ids=ctx, use_cache=True, **common)
    no_cache = m.generate(ids, context_ids=ctx, use_cache=False, **common)
    assert m.router.plan is None  # generation leaves no routing behind
    with torch.no_grad():
        manual = manual_greedy(m, ids, ctx, 6, m.vocab.id("answer"))
    assert torch.equal(with_cache, no_cache)
    assert torch.equal(with_cache, manual)


def test_generated_context_matters_and_beam_search_runs():
    m = build("llama", "lora", seed=2)
    ids, ctx = batch(b=1, s=6, seed=5)
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    outs = {c: m.generate(ids, context_ids=ctx, generated_context=c, **common) for c in ("image", "answer")}
    with torch.no_grad():
        assert torch.equal(outs["answer"], manual_greedy(m, ids, ctx, 8, 2))
        assert torch.equal(outs["image"], manual_greedy(m, ids, ctx, 8, 0))
    beams = m.generate(ids, context_ids=ctx, num_beams=3, num_return_sequences=2, **common)
    assert beams.shape == (2, 14) and torch.equal(beams[:, :6], ids.expand(2, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_adaptor_state_round_trip_restores_outputs(kind, tmp_path):
    m = build("llama", kind)
    ids, ctx = batch()
    want = m(ids, context_ids=ctx).logits
    path = tmp_path / "adaptor.safetensors"
    m.save_adaptor(str(path))
    fresh = ContextModel(tiny_lm("llama"), CONTEXTS, m.adaptor, "AF")
    assert not torch.equal(fresh(ids, context_ids=ctx).logits, want)
    fresh.load_adaptor(str(path))
    assert torch.equal(fresh(ids, context_ids=ctx).logits, want)
    other = ContextModel(tiny_lm("llama"), "image,text", m.adaptor, "AF")
    with pytest.raises(ValueError, match="contexts"):
        other.load_adaptor(str(path))


def test_routing_is_never_stale_across_calls():
    m = build("llama", "lora")
    ids, ctx = batch()
    first = m(ids, context_ids=ctx).logits
    ctx2 = torch.roll(ctx, 1, dims=1)
    second = m(ids, context_ids=ctx2).logits
    fresh = copy.deepcopy(m)
    assert torch.equal(second, fresh(ids, context_ids=ctx2).logits)
    assert not torch.allclose(first, second)
    assert m.router.plan is None  # a plan belongs to its forward: nothing is left behind
    for direct in (ids, ids[:, :5]):  # the wrapped LM called outside a routed forward, same shape or not
        with pytest.raises(ContextIdsError, match="no routing plan"):
            m.model(direct)
    with m.routing(ctx2):  # the explicit block routes direct calls, and only inside it
        torch.testing.assert_close(m.model(ids).logits, second)
    with pytest.raises(ContextIdsError, match="no routing plan"):
        m.model(ids)
    with pytest.raises(ContextIdsError, match="context_ids is required"):
        m(ids)


def test_one_context_needs_no_context_ids():
    m = build("llama", "lora", contexts="all")
    ids, _ = batch()
    torch.testing.assert_close(m(ids).logits, m(ids, context_ids=torch.zeros_like(ids)).logits)


@pytest.mark.parametrize(
    "ctx, match",
    [
        (torch.zeros(2, 10, dtype=torch.long), r"shape \(2, 10\).*\(2, 11\)"),
        (torch.zeros(2, 11), "integer ids"),
        (torch.full((2, 11), 3), r"3 contexts"),
    ],
)
def test_bad_context_ids_fail_before_the_model_runs(ctx, match):
    m = build("llama", "lora")
    ids, _ = batch()
    with pytest.raises(ContextIdsError, match=match):
        m(ids, context_ids=ctx)


def test_target_errors_name_candidates():
    with pytest.raises(TargetError, match=r"matches no projection module.*self_attn\.q_proj"):
        ContextModel(tiny_lm("llama"), "a", "lora", ["qq_proj"])
    lm = tiny_lm("llama")
    lm.config.model_type = "mystery"
    with pytest.raises(TargetError, match=r"no target preset for model type 'mystery'.*q_proj"):
        ContextModel(lm, "a", "lora", "AF")
    m = ContextModel(tiny_lm("llama"), "a", "lora", ["re:.*layers\\.0\\.self_attn\\.(q|v)_proj"])
    assert m.target_names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(TargetError, match="already holds"):
        ContextModel(m.model, "a", "lora", "AF")


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_wrap_the_expected_layers(family):
    expected = {
        "llama": (7, 3), "qwen2": (7, 3), "opt": (6, 3), "gpt2": (4, 2),
    }[family]  # (LoRA/BitFit targets per block, IA3 targets per block) for "AF"
    m = ContextModel(tiny_lm(family), "a", "lora", "AF")
    assert len(m.target_names) == 2 * expected[0]
    m = ContextModel(tiny_lm(family), "a", "ia3", "AF")
    assert len(m.target_names) == 2 * expected[1]
    roles = {n.rsplit(".", 1)[-1]: layer.role for n, layer in m.context_layers()}
    assert set(roles.values()) == {"out", "in"}


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_matches_fp32_loosely(kind):
    """Mixed precision (accelerate's bf16 on CPU) runs the grouped path in bf16 and stays near fp32."""
    m = build("llama", kind).train()
    ids, ctx = batch()
    ref = m(ids, context_ids=ctx, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in trainable(m).items()}
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, context_ids=ctx, labels=ids)
    out.loss.backward()
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.loss.float(), ref.loss, atol=0.05, rtol=0.02)
    for n, p in trainable(m).items():
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten().float(), ref_grads[n].flatten(), dim=0)
        assert p.grad.dtype == torch.float32 and cos > 0.98, n
