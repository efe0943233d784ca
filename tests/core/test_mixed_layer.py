"""The mixed-kind layer at the core: a kind's routing plan restricted from the shared one equals the plan built
from scratch on the remapped ids, and a mixed model equals each single-kind model on its groups on every
architecture (GPT-2's Conv1D and fused q|k|v included), under activation checkpointing too."""
import pytest
import torch

from conftest import VOCAB, tiny_lm
from mtcpeft import ContextModel
from mtcpeft.core.adaptors import MixedConfig, OptionError, adaptor_config
from mtcpeft.core.contexts import build_plan, restrict_plan
from support.reference import randomize_adaptors


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("groups", [(0, 2), (1,), (0, 1, 3), (3,)])
def test_a_restricted_plan_equals_the_plan_of_the_remapped_ids(groups, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 4, (3, 7), generator=g)
    if seed == 0:
        ids[:] = groups[0]  # uniform
    table = torch.full((5,), -1, dtype=torch.long)
    for local, c in enumerate(groups):
        table[c + 1] = local
    got = restrict_plan(build_plan(ids, 4), groups, table)
    want = build_plan(table[ids.reshape(-1) + 1], len(groups))
    assert (got.num_tokens, got.num_contexts, got.counts, got.uniform) == \
        (want.num_tokens, want.num_contexts, want.counts, want.uniform)
    assert torch.equal(got.ids, want.ids)
    assert (got.live_mask is None) == (want.live_mask is None)
    if want.live_mask is not None:
        assert torch.equal(got.live_mask, want.live_mask)
    assert (got.perm is None) == (want.perm is None)
    if want.perm is not None:
        assert torch.equal(got.perm, want.perm)


def _pair(family):
    kinds = {"lora": ["a", "b"], "ia3": ["c"], "bitfit": ["d", "e"]}
    singles = {}
    for i, (kind, names) in enumerate(kinds.items()):
        adaptor = adaptor_config("lora", rank=3, alpha=6.0) if kind == "lora" else kind
        singles[kind] = ContextModel(tiny_lm(family), names, adaptor, "AF").eval()
        randomize_adaptors(singles[kind], scale=0.3, seed=i)
    order = [k for k, names in kinds.items() for _ in names]
    mixed = ContextModel(tiny_lm(family), [n for names in kinds.values() for n in names],
                         MixedConfig.of(order, {k: m.adaptor for k, m in singles.items()}), "AF").eval()
    state = mixed.adaptor_state_dict()
    with torch.no_grad():
        for kind, single in singles.items():
            for key, value in single.adaptor_state_dict().items():
                module, _, param = key.rpartition(".")
                state[f"{module}.{kind}.{param}"].copy_(value)
    offsets = {"lora": 0, "ia3": 2, "bitfit": 3}
    return mixed, singles, offsets


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_mixed_model_equals_each_kind_on_its_groups(family):
    mixed, singles, offsets = _pair(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    for kind, single in singles.items():
        ctx = torch.randint(0, len(single.vocab), (2, 9), generator=g)
        ctx[0, -3:] = -1
        routed = torch.where(ctx >= 0, ctx + offsets[kind], ctx)
        with torch.no_grad():
            torch.testing.assert_close(mixed(ids, context_ids=routed).logits, single(ids, context_ids=ctx).logits,
                                       atol=1e-6, rtol=1e-6)


def test_checkpointing_carries_each_kinds_plan_to_the_recomputation():
    mixed, _, _ = _pair("llama")
    g = torch.Generator().manual_seed(2)
    ids, ctx = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(-1, 5, (2, 9), generator=g)

    def grads(model):
        model.train().zero_grad(set_to_none=True)
        loss = model(ids, context_ids=ctx, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = grads(mixed)
    mixed.gradient_checkpointing_enable()
    ckpt_loss, ckpt = grads(mixed)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def test_bad_mixed_options_name_the_problem():
    with pytest.raises(OptionError, match="mixed kinds must name adaptor kinds with groups"):
        MixedConfig(kinds=["lora", "none"], kind_options={"lora": {}, "none": {}})
    with pytest.raises(OptionError, match="mixed kind_options must hold the options of exactly the kinds"):
        MixedConfig(kinds=["lora", "ia3"], kind_options={"lora": {}})
    with pytest.raises(OptionError, match="mixed kinds must name one kind per context"):
        ContextModel(tiny_lm("llama"), "a,b,c", MixedConfig(kinds=["lora", "ia3"],
                                                           kind_options={"lora": {}, "ia3": {}}), "AF")
