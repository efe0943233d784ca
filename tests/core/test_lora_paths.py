"""Context-LoRA's two grouped implementations give the same outputs and gradients: the grouped-GEMM path
(torch.nn.functional.grouped_mm, the CUDA SM90/SM100 bf16 fast path, forced on CPU through the module switch) and
the block loop; several context counts, empty contexts and -1 tokens, random and span layouts, against each other
and a dense per-token reference."""
import pytest
import torch
from torch import nn

from conftest import tiny_lm
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.core.adaptors import lora
from mtcpeft.core.adaptors.lora import ContextLoRALayer, grouped_mm_layout_ok, use_grouped_mm
from mtcpeft.core.contexts import Router

HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")
needs_grouped_mm = pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch has no grouped_mm")
PATHS = ["loop", pytest.param("grouped_mm", marks=needs_grouped_mm)]
D_IN, D_OUT, RANK = 16, 24, 8


@pytest.fixture
def calls(monkeypatch):
    """Which implementation ran: counts of grouped_mm calls and of each autograd Function's forward."""
    seen = {"grouped_mm": 0, "_GroupedLoRA": 0, "_GroupedMMLoRA": 0}
    if HAS_GROUPED_MM:
        real = torch.nn.functional.grouped_mm

        def spy(*args, **kwargs):
            seen["grouped_mm"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    for name in ("_GroupedLoRA", "_GroupedMMLoRA"):
        fn = getattr(lora, name)
        real_fwd = fn.forward

        def counted(ctx, *args, _real=real_fwd, _name=name):
            seen[_name] += 1
            return _real(ctx, *args)

        monkeypatch.setattr(fn, "forward", staticmethod(counted))
    return seen


def use_path(monkeypatch, path: str) -> None:
    """Force one implementation through the module-level switch."""
    monkeypatch.setattr(lora, "GROUPED_MM", "always" if path == "grouped_mm" else "never")


FUNCTION = {"loop": "_GroupedLoRA", "grouped_mm": "_GroupedMMLoRA"}


def _ids(num_contexts: int, empty: set[int], dead: float, seed: int, layout: str, shape=(3, 11)) -> torch.Tensor:
    """(B, S) ids over the contexts not in ``empty``, at random per token or in contiguous spans per row, a
    fraction ``dead`` of them -1 (padding, at random positions or as a right-padded tail)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([c for c in range(num_contexts) if c not in empty])
    if layout == "random":
        ids = used[torch.randint(0, len(used), shape, generator=g)]
        ids[torch.rand(shape, generator=g) < dead] = -1
        return ids
    ids = torch.empty(shape, dtype=torch.long)
    for b in range(shape[0]):
        cuts = sorted(torch.randint(1, shape[1], (2,), generator=g).tolist())
        pick = used[torch.randint(0, len(used), (3,), generator=g)]
        ids[b, : cuts[0]], ids[b, cuts[0]: cuts[1]], ids[b, cuts[1]:] = pick
        ids[b, shape[1] - int(dead * shape[1]):] = -1
    return ids


def _layer(num_contexts: int, seed: int, rank: int = RANK):
    torch.manual_seed(seed)
    router = Router(num_contexts)
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    layer = ContextLoRALayer(base, router, LoRAConfig(rank=rank, alpha=2.0 * rank))
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
    return layer, router


def _run(layer, router, ids, x, g, path, monkeypatch):
    """Output and (dx, dA, dB) on ``path``; ``g`` None means `.sum().backward()`."""
    use_path(monkeypatch, path)
    router.route(ids)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.sum() if g is None else y).backward(None if g is None else g)
    out = (y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.lora_A.grad = layer.lora_B.grad = None
    return out


def _dense_reference(layer, ids, x, g):
    """Per-token weights gathered densely: y = base(x) + scale * (x A_t^T) B_t, t = each token's context."""
    x = x.clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    live = (ids >= 0).unsqueeze(-1).to(x.dtype)
    c = ids.clamp(min=0)
    h = torch.einsum("bsd,bsrd->bsr", x, A[c]) * layer.scale * live
    y = layer.base_layer(x) + torch.einsum("bsr,bsrD->bsD", h, B[c])
    y.backward(g)
    return y.detach(), x.grad, A.grad, B.grad


CASES = [(2, set(), 0.0), (3, {1}, 0.2), (5, {0, 3}, 0.0), (16, {2, 7, 15}, 0.3)]


@pytest.mark.parametrize("layout", ["random", "spans"])
@pytest.mark.parametrize("num_contexts,empty,dead", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_paths_match_the_dense_reference(path, num_contexts, empty, dead, layout, monkeypatch, calls):
    layer, router = _layer(num_contexts, seed=num_contexts)
    ids = _ids(num_contexts, empty, dead, seed=num_contexts, layout=layout)
    x = torch.randn(*ids.shape, D_IN)
    g = torch.randn(*ids.shape, D_OUT)
    got = _run(layer, router, ids, x, g, path, monkeypatch)
    assert calls[FUNCTION[path]] == 1 and sum(calls[f] for f in FUNCTION.values()) == 1, calls
    assert calls["grouped_mm"] == (6 if path == "grouped_mm" else 0), "2 grouped GEMMs forward, 4 backward"
    ref = _dense_reference(layer, ids, x, g)
    for name, a, r in zip(("y", "dx", "dA", "dB"), got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{path} {name}: {m}")
    dx, dA, dB = got[1:]
    base_only = g @ layer.base_layer.weight  # -1 tokens: the frozen layer's input gradient, no adaptor term
    torch.testing.assert_close(dx[ids < 0], base_only[ids < 0], atol=1e-6, rtol=1e-6)
    for c in empty:
        assert (dA[c] == 0).all() and (dB[c] == 0).all(), f"empty context {c} must keep exact zero gradients"


@needs_grouped_mm
@pytest.mark.parametrize("layout", ["random", "spans"])
@pytest.mark.parametrize("num_contexts,empty,dead", CASES)
def test_grouped_mm_agrees_with_the_block_loop(num_contexts, empty, dead, layout, monkeypatch):
    layer, router = _layer(num_contexts, seed=10 + num_contexts)
    ids = _ids(num_contexts, empty, dead, seed=10 + num_contexts, layout=layout)
    x, g = torch.randn(*ids.shape, D_IN), torch.randn(*ids.shape, D_OUT)
    loop = _run(layer, router, ids, x, g, "loop", monkeypatch)
    grouped = _run(layer, router, ids, x, g, "grouped_mm", monkeypatch)
    for name, a, b in zip(("y", "dx", "dA", "dB"), grouped, loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"grouped_mm vs loop {name}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_stride0_upstream_gradient(path, monkeypatch):
    """`.sum().backward()` hands backward an expanded (stride-0) gradient, which grouped_mm itself rejects."""
    layer, router = _layer(4, seed=1)
    ids = _ids(4, {2}, 0.1, seed=1, layout="random")
    x = torch.randn(*ids.shape, D_IN)
    got = _run(layer, router, ids, x, None, path, monkeypatch)
    ref = _dense_reference(layer, ids, x, torch.ones(*ids.shape, D_OUT))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_unused_non_finite_context_does_not_leak(path, monkeypatch):
    """An empty context's weights never touch other tokens, on either implementation."""
    layer, router = _layer(3, seed=2)
    with torch.no_grad():
        layer.lora_A[1] = float("inf")
        layer.lora_B[1] = float("nan")
    ids = _ids(3, {1}, 0.2, seed=2, layout="spans")
    out = _run(layer, router, ids, torch.randn(*ids.shape, D_IN), torch.randn(*ids.shape, D_OUT), path, monkeypatch)
    assert all(t.isfinite().all() for t in out)


@needs_grouped_mm
def test_bf16_grouped_mm_agrees_with_the_loop(monkeypatch, calls):
    """The dtype the CUDA fast path runs in (grouped_mm runs bf16 on CPU too)."""
    layer, router = _layer(3, seed=3)
    layer.to(torch.bfloat16)
    ids = _ids(3, set(), 0.1, seed=3, layout="random")
    x = torch.randn(*ids.shape, D_IN, dtype=torch.bfloat16)
    g = torch.randn(*ids.shape, D_OUT, dtype=torch.bfloat16)
    grouped = _run(layer, router, ids, x, g, "grouped_mm", monkeypatch)
    assert calls["grouped_mm"] == 6
    loop = _run(layer, router, ids, x, g, "loop", monkeypatch)
    for a, b in zip(grouped, loop):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("path", PATHS)
def test_model_trains_the_same_on_every_path(path, monkeypatch, calls):
    """A whole ContextModel (tiny llama, 3 contexts, padding in -1, one context unused; checkpointing on, so the
    recomputation runs the path again) gives the loop's loss and gradients."""
    model = ContextModel(tiny_lm("llama"), "image,question,answer", LoRAConfig(rank=8, alpha=16.0), "AF")
    model.train()
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        for _, layer in model.context_layers():
            layer.lora_B.normal_(0.0, 0.2)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    ctx = torch.tensor([[0] * 5 + [2] * 7, [0] * 4 + [2] * 6 + [-1] * 2])  # "question" has no tokens

    def run(p):
        use_path(monkeypatch, p)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, context_ids=ctx, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: v.grad.clone() for k, v in model.adaptor_state_dict().items()}

    loss_loop, grads_loop = run("loop")
    before = calls[FUNCTION[path]]
    loss, grads = run(path)
    assert calls[FUNCTION[path]] > before
    torch.testing.assert_close(loss, loss_loop, atol=1e-6, rtol=1e-6)
    for k in grads_loop:
        torch.testing.assert_close(grads[k], grads_loop[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        assert (grads[k][1] == 0).all(), f"{k}: the unused context must keep a zero gradient"


@needs_grouped_mm
def test_grouped_mm_selection(monkeypatch):
    A, B = torch.zeros(3, 8, 16), torch.zeros(3, 8, 24)
    x = torch.zeros(5, 16)
    monkeypatch.setattr(lora, "GROUPED_MM", "auto")
    assert not use_grouped_mm(x, A, B), "auto never picks grouped_mm on CPU (slower there than the block loop)"
    monkeypatch.setattr(lora, "GROUPED_MM", "always")
    assert use_grouped_mm(x, A, B)
    # row strides must be multiples of 16 bytes: rank 2 in fp32, or rank 4 / width 12 in bf16, do not qualify
    assert not use_grouped_mm(x, torch.zeros(3, 2, 16), torch.zeros(3, 2, 24))
    xb = x.bfloat16()
    assert not grouped_mm_layout_ok(xb, torch.zeros(3, 4, 16, dtype=torch.bfloat16), B.bfloat16())
    assert not grouped_mm_layout_ok(xb, A.bfloat16(), torch.zeros(3, 8, 12, dtype=torch.bfloat16))
    assert grouped_mm_layout_ok(xb, A.bfloat16(), B.bfloat16())
    assert not grouped_mm_layout_ok(x.double(), A.double(), B.double())
    monkeypatch.setattr(lora, "GROUPED_MM", "never")
    assert not use_grouped_mm(x, A, B)
    monkeypatch.setattr(lora, "GROUPED_MM", "fast")
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        use_grouped_mm(x, A, B)


@needs_grouped_mm
def test_forced_grouped_mm_falls_back_where_shapes_do_not_fit(monkeypatch, calls):
    """'always' still takes the block loop where grouped_mm would reject the shapes (rank 2 in fp32)."""
    layer, router = _layer(3, seed=5, rank=2)
    ids = _ids(3, set(), 0.0, seed=5, layout="random")
    x = torch.randn(*ids.shape, D_IN)
    monkeypatch.setattr(lora, "GROUPED_MM", "always")
    router.route(ids)
    assert layer(x).isfinite().all()
    assert calls["grouped_mm"] == 0 and calls["_GroupedLoRA"] == 1
