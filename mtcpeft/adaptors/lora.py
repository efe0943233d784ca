"""Context-LoRA: one low-rank update per context, computed on context-grouped token segments.

Per context c: ``delta_c(x) = (alpha / r) * B_c(A_c(dropout(x)))`` (Hu et al., 2021, arXiv 2106.09685),
applied to each token with the group of its context (Context-PEFT, arXiv 2312.08900).

Storage: ``lora_A`` (C, r, d_in) and ``lora_B`` (C, r, d_out). Both keep the rank first because on CPU the
weight-gradient matmuls that produce (r, d) run several times faster than those producing (d, r).

Cost: tokens are gathered into context order once (the shared plan), each segment runs two dense matmuls
with its own A_c, B_c, and the result is scattered back added onto the frozen output. Every token meets
exactly one A and one B, so the work per token does not grow with the number of contexts (the official
implementation multiplies every token by every context's A and masks: linear in C, and one non-finite
weight of an unused context poisons every token through 0 * inf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..contexts import RoutingPlan
from .base import AdaptorConfig, ContextLayer, register_adaptor


class _GroupedLoRA(torch.autograd.Function):
    """y[perm] += scale * B_c(A_c(x[perm])) segment by segment, in place on the frozen output y.

    y (N, D) frozen-layer output, x (N, d), A (C, r, d), B (C, r, D), perm (L,), counts: C python ints.
    Saves only the index, the (L, r) hidden and references to x, A, B: no (N, d) or (N, C, .) buffers.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, perm, counts, scale):
        xs = x.index_select(0, perm)  # (L, d) tokens in context order
        h = x.new_empty(xs.shape[0], A.shape[1])  # (L, r)
        out = x.new_empty(xs.shape[0], B.shape[2])  # (L, D)
        start = 0
        for c, n in enumerate(counts):
            if n:
                seg = slice(start, start + n)
                torch.mm(xs[seg], A[c].t(), out=h[seg])
                start += n
        h.mul_(scale)
        start = 0
        for c, n in enumerate(counts):
            if n:
                seg = slice(start, start + n)
                torch.mm(h[seg], B[c], out=out[seg])
                start += n
        y.index_add_(0, perm, out)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, A, B, perm, h)
        ctx.counts, ctx.scale = counts, scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, perm, h = ctx.saved_tensors  # h already carries the scale
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        gs = g.index_select(0, perm)  # (L, D)
        xs = x.index_select(0, perm) if need_A else None
        gA = torch.zeros_like(A) if need_A else None
        gB = torch.zeros_like(B) if need_B else None
        gxs = x.new_empty(xs.shape if xs is not None else (perm.shape[0], x.shape[1])) if need_x else None
        start = 0
        for c, n in enumerate(ctx.counts):
            if not n:
                continue
            seg = slice(start, start + n)
            start += n
            if need_B:
                torch.mm(h[seg].t(), gs[seg], out=gB[c])  # (r, D)
            if need_A or need_x:
                gh = torch.mm(gs[seg], B[c].t()).mul_(ctx.scale)  # (n, r)
                if need_A:
                    torch.mm(gh.t(), xs[seg], out=gA[c])  # (r, d)
                if need_x:
                    torch.mm(gh, A[c], out=gxs[seg])  # (n, d)
        gx = None
        if need_x:
            gx = x.new_zeros(x.shape) if perm.shape[0] != x.shape[0] else x.new_empty(x.shape)
            gx.index_copy_(0, perm, gxs)
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
        flat_y = y.reshape(-1, self.out_features)
        out = _GroupedLoRA.apply(flat_y, xd.reshape(-1, self.in_features), A, B, plan.perm, plan.counts, self.scale)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[1]}, scale={self.scale:g}"


LoRAConfig.layer_cls = ContextLoRALayer
register_adaptor("lora")(LoRAConfig)
