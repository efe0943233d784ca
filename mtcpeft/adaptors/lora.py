"""Context-LoRA: one low-rank update per context, computed on context-grouped token segments.

Per context c: ``delta_c(x) = (alpha / r) * B_c(A_c(dropout(x)))`` (Hu et al., 2021, arXiv 2106.09685),
applied to each token with the group of its context (Context-PEFT, arXiv 2312.08900).

Storage: ``lora_A`` (C, r, d_in) and ``lora_B`` (C, r, d_out). Both keep the rank first because on CPU the
weight-gradient matmuls that produce (r, d) run several times faster than those producing (d, r).

Cost: tokens are taken in context order (the shared plan's permutation) one block of rows at a time: gathered,
multiplied by their own A_c and B_c, and scattered back added onto the frozen output, so the only extra memory
is a few MB of block buffers and the (L, r) hidden. Every token meets exactly one A and one B, so the work per
token does not grow with the number of contexts (the official implementation multiplies every token by every
context's A and masks: linear in C, and one non-finite weight of an unused context poisons every token through
0 * inf). Measured against PEFT's LoRA layer in bench/RESULTS.md (``python bench/adaptors.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..contexts import RoutingPlan
from .base import AdaptorConfig, ContextLayer, register_adaptor


# Rows per gather/scatter block: bounds the temporaries of one block (rows x (d_in + d_out) floats) to a few MB,
# so the grouped path costs about the memory of one plain LoRA whatever the number of contexts.
_BLOCK_BYTES = 8 << 20


def _blocks(counts: tuple[int, ...], rows: int):
    """(context, start, stop) over the context-sorted live tokens, segments cut into blocks of <= rows."""
    start = 0
    for c, n in enumerate(counts):
        for s in range(start, start + n, rows):
            yield c, s, min(s + rows, start + n)
        start += n


class _GroupedLoRA(torch.autograd.Function):
    """y[perm] += scale * B_c(A_c(x[perm])) block by block, in place on the frozen output y.

    y (..., D) frozen-layer output, x (..., d) with N tokens, A (C, r, d), B (C, r, D), perm (L,) indices into
    the N flattened tokens, counts: C python ints.
    Tokens are gathered, multiplied and scattered back one block of rows at a time into two reused buffers,
    so no (L, d) or (L, D) copy ever exists; saves only the index, the (L, r) hidden and x, A, B.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, perm, counts, scale):
        d, D = x.shape[-1], y.shape[-1]
        yf, xf = y.view(-1, D), x.reshape(-1, d)  # flat views (x copied only if it was not contiguous)
        rows = max(256, _BLOCK_BYTES // (x.element_size() * (d + D)))
        h = x.new_empty(perm.shape[0], A.shape[1])  # (L, r), context order
        xs_buf, out_buf = x.new_empty(rows, d), x.new_empty(rows, D)
        for c, s, e in _blocks(counts, rows):
            xs = torch.index_select(xf, 0, perm[s:e], out=xs_buf[: e - s])
            torch.mm(xs, A[c].t(), out=h[s:e])
            h[s:e].mul_(scale)
            yf.index_add_(0, perm[s:e], torch.mm(h[s:e], B[c], out=out_buf[: e - s]))
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, A, B, perm, h)
        ctx.counts, ctx.scale, ctx.rows = counts, scale, rows
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, perm, h = ctx.saved_tensors  # h already carries the scale
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        rows, d, D = ctx.rows, x.shape[-1], g.shape[-1]
        gf, xf = g.reshape(-1, D), x.reshape(-1, d)
        # weight grads are accumulated block by block: contexts without tokens keep exact zeros
        gA = torch.zeros_like(A) if need_A else None
        gB = torch.zeros_like(B) if need_B else None
        gx = gxf = None
        if need_x:  # every live token is written exactly once; -1 tokens (absent from perm) get zeros
            gx = x.new_empty(x.shape) if perm.shape[0] == xf.shape[0] else x.new_zeros(x.shape)
            gxf = gx.view(-1, d)  # written through a flat view; gx itself (x's shape) is returned
        gs_buf, xs_buf, gxs_buf = g.new_empty(rows, D), x.new_empty(rows, d), x.new_empty(rows, d)
        for c, s, e in _blocks(ctx.counts, rows):
            idx, n = perm[s:e], e - s
            gs = torch.index_select(gf, 0, idx, out=gs_buf[:n])  # (n, D)
            if need_B:
                gB[c].addmm_(h[s:e].t(), gs)  # (r, D): the fast layout on CPU
            if need_A or need_x:
                gh = torch.mm(gs, B[c].t()).mul_(ctx.scale)  # (n, r)
                if need_A:
                    gA[c].addmm_(gh.t(), torch.index_select(xf, 0, idx, out=xs_buf[:n]))  # (r, d)
                if need_x:
                    gxf.index_copy_(0, idx, torch.mm(gh, A[c], out=gxs_buf[:n]))
        return g, gx, gA, gB, None, None, None


@dataclass
class LoRAConfig(AdaptorConfig):
    """Context-LoRA options."""

    rank: int = 8  # r: rank of each context's update
    alpha: float | None = None  # scaling numerator; the update is scaled by alpha / rank (None: alpha = rank)
    dropout: float = 0.0  # dropout on the layer input of the LoRA branch only

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class ContextLoRALayer(ContextLayer):
    adaptor_param_names = ("lora_A", "lora_B")

    def __init__(self, base, router, config: LoRAConfig, role="proj", name=""):
        super().__init__(base, router, config, role, name)
        C, r = self.num_contexts, config.rank
        w = base.weight
        self.lora_A = nn.Parameter(w.new_empty(C, r, self.in_features))
        self.lora_B = nn.Parameter(w.new_zeros(C, r, self.out_features))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A: Kaiming-uniform per context as for an nn.Linear (r, d_in) weight; B: zeros (starts as the base)."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in = d_in
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def adapt(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        y = self.base_layer(x)
        if plan.num_live == 0:
            return y
        xd = self.dropout(x)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if plan.uniform is not None:  # one context: two plain matmuls, no permutation
            c = plan.uniform
            h = F.linear(xd, A[c]) * self.scale  # (..., r)
            if plan.live_mask is not None:
                h = h * plan.live_mask.view(*x.shape[:-1], 1).to(h.dtype)
            return y + h @ B[c]
        # y and x go in unflattened: an in-place Function on a *view* of y would make autograd wrap it in
        # CopySlices, which copies and clones the full (N, D) gradient in backward
        y = y if y.is_contiguous() else y.contiguous()  # updated in place through a flat view
        # under autocast y comes out in the low-precision dtype: run the grouped matmuls in y's dtype, explicitly
        dt = y.dtype
        with torch.autocast(y.device.type, enabled=False):
            return _GroupedLoRA.apply(y, xd.to(dt), A.to(dt), B.to(dt), plan.perm, plan.counts, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[1]}, scale={self.scale:g}"


LoRAConfig.layer_cls = ContextLoRALayer
register_adaptor("lora")(LoRAConfig)
