"""With one context, Context-LoRA / Context-IA3 equal PEFT's LoRA / IA3 given the same weights (PEFT is an
independent implementation, used here as the oracle)."""
import copy

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import LoraConfig, get_peft_model

from conftest import FAMILIES, VOCAB, tiny_lm
from mtcpeft import ContextModel, IA3Config, LoRAConfig
from support.reference import randomize_adaptors

# per family: LoRA target suffixes (as PEFT names them) and IA3 (targets, feed-forward targets)
PEFT_TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "opt": (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


def _compare(ours, peft_model, pairs):
    """Same logits and loss gradients. pairs: (our param, PEFT param, map of our gradient to PEFT's layout);
    entries the map leaves NaN are not compared (PEFT has a parameter there that ours deliberately lacks)."""
    ids = _inputs()
    ours.train(), peft_model.train()
    out = ours(ids, labels=ids)
    ref = peft_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for mine, theirs, to_peft in pairs:
        g = to_peft(mine.grad)
        keep = ~g.isnan()
        torch.testing.assert_close(g[keep], theirs.grad[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_context_lora_equals_peft_lora(family):
    base = tiny_lm(family)
    ours = ContextModel(copy.deepcopy(base), "all", LoRAConfig(rank=4, alpha=8.0), "AF")
    randomize_adaptors(ours, scale=0.3)
    targets, _, _ = PEFT_TARGETS[family]
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=family == "gpt2"),
    )
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    pairs = []
    with torch.no_grad():
        for name, layer in ours.context_layers():
            p = peft_layers[name]
            p.lora_A["default"].weight.copy_(layer.lora_A[0])  # PEFT A: (r, d_in)
            p.lora_B["default"].weight.copy_(layer.lora_B[0].t())  # PEFT B: (d_out, r)
            pairs.append((layer.lora_A, p.lora_A["default"].weight, lambda g: g[0]))
            pairs.append((layer.lora_B, p.lora_B["default"].weight, lambda g: g[0].t()))
    assert len(peft_layers) == len(pairs) // 2 > 0
    _compare(ours, peft_model, pairs)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_context_ia3_equals_peft_ia3(family):
    base = tiny_lm(family)
    ours = ContextModel(copy.deepcopy(base), "all", IA3Config(), "AF")
    randomize_adaptors(ours, scale=0.3)
    _, targets, ff = PEFT_TARGETS[family]
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftIA3Config(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=family == "gpt2"),
    )
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "ia3_l")}
    assert set(peft_layers) == {n for n, _ in ours.context_layers()}
    pairs = []
    with torch.no_grad():
        for name, layer in ours.context_layers():
            p = peft_layers[name].ia3_l["default"]
            start, stop = layer.feature_slice
            full = torch.ones(layer.width)  # PEFT scales the whole width; ours leaves q of a fused qkv at 1
            full[start:stop] = layer.ia3_scale[0]
            p.copy_(full.view_as(p))

            def to_peft(g, p=p, start=start, stop=stop, width=layer.width):
                full_g = torch.full((width,), float("nan"))
                full_g[start:stop] = g[0]
                return full_g.view_as(p)

            pairs.append((layer.ia3_scale, p, to_peft))
    _compare(ours, peft_model, pairs)
