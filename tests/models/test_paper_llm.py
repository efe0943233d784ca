"""The Context-PEFT paper's LLM (mtcpeft/models/paper_llm.py): its shapes at full size (meta device), its
behaviour on a tiny configuration against an independent from-scratch forward, Hugging Face semantics (cache,
generate, attentions, checkpointing, save/load), context adaptors on its presets, and its parameter table
against counts worked out here by hand from 768 / 3072 / 6144 and 12 layers."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mtcpeft import PRESETS, ContextModel, adaptor_config
from mtcpeft.core.adaptors import ContextIA3Layer, ContextLayer, ContextLoRALayer
from mtcpeft.models.paper_llm import (
    MODEL_TYPE, PaperLLMConfig, PaperLLMForCausalLM, build_paper_llm, paper_llm_config,
)
from mtcpeft.experiments.params import AGNOSTIC, FULL_FT, count_for, param_table
from support.cli import load_script
from support.reference import manual_greedy, naive_adapt, randomize_adaptors

# ------------------------------------------------------------------------------------ the paper's numbers
L, D, HEADS, F_HALF, V = 12, 768, 12, 3072, 50272
F_FUSED = 2 * F_HALF  # 6144: gate and up in one Linear
PROJ = [(D, D)] * 4 + [(D, F_FUSED), (F_HALF, D)]  # (d_in, d_out): q, k, v, o, up, down
EMBED = V * D
PER_LAYER = 4 * D * D + D * F_FUSED + F_HALF * D + 2 * D  # projections + two RMS norm weights
TOTAL = EMBED + L * PER_LAYER + D + V * D  # embeddings, layers, final norm, untied head
# tiny: non-square widths so that a swapped gate/up half or d_in/d_out shows
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, initializer_range=0.1)


def tiny_llm(seed: int = 0, **overrides) -> PaperLLMForCausalLM:
    torch.manual_seed(seed)
    return build_paper_llm(**{**TINY, **overrides}).eval()


def ids_batch(b=2, s=9, seed=0):
    return torch.randint(0, TINY["vocab_size"], (b, s), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- architecture
def test_full_size_shapes_on_the_meta_device():
    lm = build_paper_llm(device="meta")
    cfg = lm.config
    assert isinstance(cfg, PaperLLMConfig) and cfg.model_type == MODEL_TYPE
    assert next(lm.parameters()).device.type == "meta"
    assert len(lm.model.layers) == L and cfg.num_attention_heads == HEADS and cfg.head_dim == D // HEADS
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            assert (proj.in_features, proj.out_features) == (D, D) and proj.bias is None
        assert (mlp.up_proj.in_features, mlp.up_proj.out_features) == (D, F_FUSED)
        assert (mlp.down_proj.in_features, mlp.down_proj.out_features) == (F_HALF, D)
        assert not hasattr(mlp, "gate_proj")  # gate and up are one fused Linear
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert isinstance(norm, LlamaRMSNorm) and norm.weight.shape == (D,)
    assert isinstance(lm.model.norm, LlamaRMSNorm)
    assert lm.model.embed_tokens.weight.shape == (V, D) and lm.lm_head.weight.shape == (V, D)
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight  # untied head
    assert not lm.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in lm.named_parameters() if "embed_tokens" not in n)
    assert sum(p.numel() for p in lm.parameters()) == TOTAL == 190_483_200


def test_auto_classes_build_it_and_tying_is_an_option():
    cfg = AutoConfig.for_model(MODEL_TYPE, **TINY)
    assert isinstance(cfg, PaperLLMConfig)
    with torch.device("meta"):
        assert isinstance(AutoModelForCausalLM.from_config(cfg), PaperLLMForCausalLM)
    tied = build_paper_llm(device="meta", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert sum(p.numel() for p in tied.parameters()) == TOTAL - V * D
    assert not tied.lm_head.weight.requires_grad  # tied to frozen embeddings: frozen too
    assert build_paper_llm(device="meta", freeze_embeddings=False).model.embed_tokens.weight.requires_grad


def test_rope_theta_is_a_config_knob():
    assert paper_llm_config().rope_theta == 10_000.0
    cfg = paper_llm_config(rope_theta=500_000.0)
    assert cfg.rope_parameters["rope_theta"] == cfg.rope_theta == 500_000.0
    assert PaperLLMConfig.from_dict(cfg.to_dict()).rope_theta == 500_000.0  # survives serialisation


# ------------------------------------------------------------------------- an independent forward pass
def reference_logits(lm: PaperLLMForCausalLM, ids: torch.Tensor, theta: float) -> torch.Tensor:
    """The architecture written out from its description, reading only the state dict: RMS pre-norm, causal
    multi-head attention with RoPE (pairs (j, j + hd/2) rotated by pos * theta^(-2j/hd)), SwiGLU whose fused
    up projection is [gate | up], final RMS norm, untied head."""
    cfg, w = lm.config, lm.state_dict()
    B, S = ids.shape
    H = cfg.num_attention_heads
    hd = cfg.hidden_size // H
    half = cfg.intermediate_size

    def rms(x, g):
        return g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    angle = torch.arange(S, dtype=torch.float64)[:, None] * theta ** (
        -torch.arange(0, hd, 2, dtype=torch.float64) / hd
    )  # (S, hd/2)
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):  # (B, H, S, hd)
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def heads(x):
        return x.view(B, S, H, hd).transpose(1, 2)

    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (heads(h @ w[p + f"self_attn.{n}_proj.weight"].T) for n in "qkv")
        scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(future, float("-inf")).softmax(-1) @ v  # (B, H, S, hd)
        x = x + att.transpose(1, 2).reshape(B, S, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        fused = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(fused[..., :half]) * fused[..., half:]) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("theta", [10_000.0, 37.0])
def test_forward_matches_the_reference_written_from_the_description(theta):
    lm = tiny_llm(rope_theta=theta)
    ids = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, reference_logits(lm, ids, theta), atol=2e-5, rtol=1e-4)


def test_rope_theta_changes_outputs():
    a, b = tiny_llm(rope_theta=10_000.0), tiny_llm(rope_theta=50.0)
    b.load_state_dict(a.state_dict())
    ids = ids_batch()
    with torch.no_grad():
        assert not torch.allclose(a(ids).logits, b(ids).logits, atol=1e-3)


def test_loss_is_the_shifted_cross_entropy_and_inputs_embeds_match():
    lm = tiny_llm()
    ids = ids_batch()
    labels = ids.clone()
    labels[0, :4] = -100
    out = lm(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, TINY["vocab_size"])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = -logits[keep].log_softmax(-1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.loss, manual)
    with torch.no_grad():
        torch.testing.assert_close(lm(inputs_embeds=lm.model.embed_tokens(ids)).logits, out.logits)
        last = lm(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last[:, 0], out.logits[:, -1])


def test_cache_steps_equal_the_full_forward():
    """Prefill then one token at a time through a DynamicCache, positions from the cache, from cache_position,
    or from explicit position_ids: the logits equal those of one full-sequence forward."""
    lm = tiny_llm()
    ids = ids_batch(s=10)
    with torch.no_grad():
        full = lm(ids).logits
        for how in ("cache", "cache_position", "position_ids"):
            cache = DynamicCache(config=lm.config)
            steps = [lm(ids[:, :6], past_key_values=cache, use_cache=True).logits]
            for t in range(6, 10):
                kw = {"cache_position": torch.tensor([t])} if how == "cache_position" else {}
                kw = {"position_ids": torch.tensor([[t, t]]).T} if how == "position_ids" else kw
                steps.append(lm(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kw).logits)
            assert cache.get_seq_length() == 10
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4, msg=how)


def test_generate_with_and_without_cache_greedy_and_beam():
    lm = tiny_llm(seed=3)
    lm.generation_config.eos_token_id = None  # fixed-length generations, compared token for token
    ids = ids_batch(s=5, seed=1)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(ids))
    greedy = lm.generate(ids, use_cache=True, **common)
    assert torch.equal(greedy, lm.generate(ids, use_cache=False, **common))
    with torch.no_grad():  # the oracle: argmax of full-sequence forwards
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq)
    beam = dict(common, num_beams=3, num_return_sequences=2)
    beams = lm.generate(ids, use_cache=True, **beam)
    assert beams.shape == (4, 11) and torch.equal(beams, lm.generate(ids, use_cache=False, **beam))


def test_left_padded_generation_equals_unpadded():
    lm = tiny_llm(seed=4)
    lm.generation_config.eos_token_id = None
    short, long = ids_batch(b=1, s=4, seed=2), ids_batch(b=1, s=7, seed=3)
    pad = torch.full((1, 3), 1)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1), torch.ones(1, 7)]).long()
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    out = lm.generate(batch, attention_mask=mask, **common)
    alone = lm.generate(short, attention_mask=torch.ones_like(short), **common)
    assert torch.equal(out[0, 3:], alone[0])


def test_output_attentions_are_causal_distributions_and_change_nothing():
    lm = tiny_llm()
    assert lm.config._attn_implementation != "eager"  # the weights come out even from an sdpa model
    ids = ids_batch(s=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        plain = lm(ids, attention_mask=mask).logits
        out = lm(ids, attention_mask=mask, output_attentions=True)
    # real tokens only: a padding query sees no key at all, and kernels differ on what such a row holds
    torch.testing.assert_close(out.logits[0], plain[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, 3:], plain[1, 3:], atol=1e-5, rtol=1e-4)
    assert len(out.attentions) == TINY["num_hidden_layers"]
    for a in out.attentions:
        assert a.shape == (2, TINY["num_attention_heads"], 8, 8)
        for rows in (a[0], a[1, :, 3:]):
            torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]))
        assert torch.all(a[0].triu(1) == 0) and torch.all(a[1, :, 3:, 3:].triu(1) == 0)  # no weight on the future
        assert torch.all(a[1, :, 3:, :3] == 0)  # nor on padding keys
        assert torch.all(a[0].tril(-1).sum(-1)[:, 1:] > 0)  # the past does get weight


def test_gradient_checkpointing_gives_the_same_gradients():
    lm = tiny_llm().train()
    ids = ids_batch()
    lm(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" not in ref and "lm_head.weight" in ref
    lm.zero_grad()
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in lm.model.layers)
    lm(ids, labels=ids, use_cache=False).loss.backward()
    for n, p in lm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_residual_dropout_is_read_per_call():
    lm = tiny_llm().train()
    ids = ids_batch()
    torch.testing.assert_close(lm(ids).logits, lm(ids).logits)  # default 0: deterministic in train mode
    lm.config.residual_dropout = 0.5
    assert not torch.allclose(lm(ids).logits, lm(ids).logits)
    lm.eval()
    torch.testing.assert_close(lm(ids).logits, lm(ids).logits)


def test_save_and_reload_keeps_weights_and_the_embedding_freeze(tmp_path):
    lm = tiny_llm(rope_theta=123.0)
    lm.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back, PaperLLMForCausalLM) and back.config.rope_theta == 123.0
    assert not back.model.embed_tokens.weight.requires_grad and back.lm_head.weight.requires_grad
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, lm(ids).logits)
    back.resize_token_embeddings(TINY["vocab_size"] + 8)
    assert not back.model.embed_tokens.weight.requires_grad


# --------------------------------------------------------------------------------- context adaptors on it
KINDS = ["lora", "bitfit", "ia3"]


def context_model(kind: str, seed: int = 0) -> ContextModel:
    cfg = adaptor_config(kind, **({"rank": 3} if kind == "lora" else {}))
    m = ContextModel(tiny_llm(seed), "image,question,answer", cfg, "AF", generated_context="answer")
    m.model.generation_config.eos_token_id = None
    randomize_adaptors(m, scale=0.3)
    return m


def test_presets_wrap_q_k_v_o_fused_up_and_down():
    assert MODEL_TYPE in PRESETS
    m = ContextModel(tiny_llm(), "a,b", adaptor_config("lora", rank=2), "AF")
    names = {n.split("layers.0.", 1)[1] for n in m.target_names if "layers.0." in n}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                     "mlp.down_proj"}
    assert len(m.target_names) == 6 * TINY["num_hidden_layers"]
    up = m.model.model.layers[0].mlp.up_proj
    assert isinstance(up, ContextLoRALayer) and up.lora_B.shape == (2, 2, 2 * TINY["intermediate_size"])
    m = ContextModel(tiny_llm(), "a,b", "ia3", "AF")
    layer = m.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, ContextIA3Layer) and layer.mlp.down_proj.role == "in"
    assert layer.mlp.down_proj.ia3_scale.shape == (2, TINY["intermediate_size"])  # the FFN intermediate
    assert layer.self_attn.k_proj.role == layer.self_attn.v_proj.role == "out"
    assert not isinstance(layer.self_attn.q_proj, ContextLayer) and not isinstance(layer.mlp.up_proj, ContextLayer)


@pytest.mark.parametrize("kind", KINDS)
def test_context_model_matches_naive_per_token_layers(kind, monkeypatch):
    m = context_model(kind).train()
    ids = ids_batch(s=11)
    ctx = torch.randint(-1, 3, ids.shape, generator=torch.Generator().manual_seed(5))
    out = m(ids, context_ids=ctx, labels=ids)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert len(fast) == len(m.adaptor_state_dict()) > 0
    m.zero_grad()
    flat = ctx.reshape(-1)
    monkeypatch.setattr(ContextLayer, "forward", lambda self, x: naive_adapt(self, x, flat))
    ref = m(ids, context_ids=ctx, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_context_model_generate_with_cache_equals_manual_loop(kind):
    m = context_model(kind, seed=1)
    ids = ids_batch(s=6, seed=7)
    ctx = torch.zeros_like(ids)
    ctx[:, 3:] = 1  # image, then question; answer tokens are generated
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(ids))
    cached = m.generate(ids, context_ids=ctx, use_cache=True, **common)
    with torch.no_grad():
        assert torch.equal(cached, manual_greedy(m, ids, ctx, 5, m.vocab.id("answer")))
    assert torch.equal(cached, m.generate(ids, context_ids=ctx, use_cache=False, **common))


# ------------------------------------------------------------------------------------------ parameter table
def by_hand(kind: str, contexts: int, rank: int = 0) -> int:
    """Per context, per layer, from the (d_in, d_out) list: LoRA r * (d_in + d_out), BitFit d_out, IA3 the keys,
    the values and the FFN intermediate."""
    per_layer = {
        "lora": sum(rank * (i + o) for i, o in PROJ),
        "bitfit": sum(o for _, o in PROJ),
        "ia3": D + D + F_HALF,
    }[kind]
    return contexts * L * per_layer


EXPECTED = {  # method -> (context-agnostic, two contexts)
    "IA3": (by_hand("ia3", 1), by_hand("ia3", 2)),
    "BitFit": (by_hand("bitfit", 1), by_hand("bitfit", 2)),
    **{f"LoRA-{r}": (by_hand("lora", 1, r), by_hand("lora", 2, r)) for r in (1, 8, 64)},
    FULL_FT: (TOTAL - EMBED, TOTAL - EMBED),  # everything but the frozen input embeddings
}


def test_hand_counts_are_what_the_widths_say():
    # spelled out once: LoRA-8 per context is 8 * 12 * (4 * 1536 + 6912 + 3840)
    assert EXPECTED["LoRA-8"][0] == 8 * 12 * (4 * 1536 + 6912 + 3840) == 1_622_016
    assert EXPECTED["IA3"][1] == 2 * 12 * (768 + 768 + 3072) == 110_592


def test_param_table_matches_hand_counts():
    rows = param_table(lambda: build_paper_llm(device="meta"), ("image", "text"))
    assert [r.method for r in rows] == list(EXPECTED)
    for r in rows:
        assert (r.agnostic.trainable, r.specific.trainable) == EXPECTED[r.method], r.method
        assert r.agnostic.total_lm == r.specific.total_lm == TOTAL
        assert r.specific.percent == pytest.approx(100 * EXPECTED[r.method][1] / TOTAL)


def test_count_for_resolves_the_name():
    assert count_for("paper-llm", "lora", [AGNOSTIC], "A", rank=4).trainable == L * 4 * 4 * (D + D)


def test_cli_table(capsys):
    count_params = load_script("count_params.py")
    count_params.main(["--table", "--model", "paper-llm"])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + len(EXPECTED) and table[0].startswith("| method |") and f"{TOTAL:,}" in table[0]
    for line in table[2:]:
        method, agnostic, _, specific, percent = [c.strip() for c in line.strip("|").split("|")]
        assert (int(agnostic.replace(",", "")), int(specific.replace(",", ""))) == EXPECTED[method], method
        assert float(percent.rstrip("%")) == pytest.approx(100 * EXPECTED[method][1] / TOTAL, abs=1e-4)
    got = count_params.main(["--table", "--model", "paper-llm", "--json"])
    assert json.loads(capsys.readouterr().out) == got
    from mtcpeft.cli import run_cli

    with pytest.raises(SystemExit) as exit_:  # through run_cli, as the script's __main__ runs it
        run_cli(lambda: count_params.main(["--table", "--model", "paper-llm", "--contexts", "image"]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("error: ") and "two contexts" in last
