"""Every adaptor kind x projection type: outputs and gradients equal the naive per-token loop."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mtcpeft.core.adaptors import ADAPTORS, ContextIA3Layer, adaptor_config
from mtcpeft.core.contexts import Router
from support.reference import naive_adapt, randomize_adaptors

KINDS = [k for k in ADAPTORS.names() if ADAPTORS.get(k).layer_cls is not None]
C = 4


def make_layer(kind, proj, role, d=12, D=20):
    base = nn.Linear(d, D) if proj == "linear" else Conv1D(D, d)
    base.requires_grad_(False)
    router = Router(C)
    cfg = adaptor_config(kind, **({"rank": 3, "alpha": 6.0} if kind == "lora" else {}))
    kwargs = {}
    if kind == "ia3":
        kwargs["role"] = role
        if role == "out" and proj == "conv1d":
            kwargs["feature_slice"] = (D // 2, D)  # a fused projection: only part of the output is scaled
    layer = cfg.layer_cls(base, router, cfg, name="t", **kwargs)
    randomize_adaptors(layer)
    return layer, router


def context_patterns(shape):
    n = shape[0] * shape[1]
    yield "interleaved", torch.randint(-1, C, shape)
    yield "contiguous", torch.tensor(sorted(torch.randint(-1, C, (n,)).tolist())).view(shape)
    yield "runs", torch.arange(n).div(3, rounding_mode="floor").remainder(C + 1).sub(1).view(shape)
    yield "uniform", torch.full(shape, 2)
    yield "uniform+pad", torch.tensor([2] * (n - 3) + [-1] * 3).view(shape)
    yield "all-pad", torch.full(shape, -1)


def _grads(y, inputs, g):
    """Gradients with unused inputs (no live token of a context) as zeros."""
    grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads)]


CASES = [(k, p, r) for k in KINDS for p in ("linear", "conv1d") for r in (["out", "in"] if k == "ia3" else ["proj"])]


@pytest.mark.parametrize("kind, proj, role", CASES)
def test_layer_matches_naive_per_token_loop(kind, proj, role):
    layer, router = make_layer(kind, proj, role)
    shape = (2, 9)
    for label, ids in context_patterns(shape):
        x = torch.randn(*shape, layer.in_features, requires_grad=True)
        g = torch.randn(*shape, layer.out_features)
        params = [p for p in layer.parameters() if p.requires_grad]
        router.route(ids)
        y = layer(x)
        grads = _grads(y, [x, *params], g)
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = naive_adapt(layer, x_ref, ids.reshape(-1))
        grads_ref = _grads(y_ref, [x_ref, *params], g)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"{label}: output")
        for a, b, what in zip(grads, grads_ref, ["x", *[n for n, p in layer.named_parameters() if p.requires_grad]]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{label}: grad {what}")


@pytest.mark.parametrize("kind", KINDS)
def test_unused_context_with_nonfinite_weights_does_not_poison_others(kind):
    """Grouped/looked-up routing never touches a context no token uses (a masked scheme gives 0 * inf = NaN)."""
    layer, router = make_layer(kind, "linear", "out" if kind == "ia3" else "proj")
    with torch.no_grad():
        for name in type(layer).adaptor_param_names:
            getattr(layer, name)[3].fill_(float("inf"))
    ids = torch.randint(-1, 3, (2, 9))
    ids[0, :3] = torch.tensor([0, 1, 2])
    router.route(ids)
    x = torch.randn(2, 9, layer.in_features, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_lora_starts_as_base_and_dropout_only_in_training():
    layer, router = make_layer("lora", "linear", "proj")
    with torch.no_grad():
        layer.lora_B.zero_()
    router.route(torch.randint(-1, C, (2, 9)))
    x = torch.randn(2, 9, layer.in_features)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    cfg = adaptor_config("lora", rank=3, dropout=0.5)
    d = cfg.layer_cls(nn.Linear(12, 20), router, cfg)
    randomize_adaptors(d)
    d.eval()
    assert torch.equal(d(x), d(x))
    d.train()
    assert not torch.equal(d(x), d(x))


def test_ia3_rejects_bad_role_and_slice():
    with pytest.raises(ValueError, match="role"):
        ContextIA3Layer(nn.Linear(4, 4), Router(2), adaptor_config("ia3"), role="proj")
    with pytest.raises(ValueError, match="slice"):
        ContextIA3Layer(nn.Linear(4, 4), Router(2), adaptor_config("ia3"), role="out", feature_slice=(2, 9))


@pytest.mark.parametrize("kwargs, match", [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"rnk": 2}, "options")])
def test_bad_lora_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        adaptor_config("lora", **kwargs)


def test_unknown_adaptor_lists_known():
    with pytest.raises(KeyError, match="unknown adaptor 'loha'; known: bitfit, ia3, lora, mixed, none"):
        adaptor_config("loha")
