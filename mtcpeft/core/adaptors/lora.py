"""Context-LoRA: one low-rank update per context, computed on context-grouped token segments.

Per context c: ``delta_c(x) = (alpha / r) * B_c(A_c(dropout(x)))`` (Hu et al., 2021, arXiv 2106.09685),
applied to each token with the group of its context (Context-PEFT, arXiv 2312.08900).

Storage: ``lora_A`` (C, r, d_in) and ``lora_B`` (C, r, d_out). Both keep the rank first because on CPU the
weight-gradient matmuls that produce (r, d) run several times faster than those producing (d, r).

Cost: every token meets exactly one A and one B, so the work per token does not grow with the number of contexts
(the official implementation multiplies every token by every context's A and masks: linear in C, and one
non-finite weight of an unused context poisons every token through 0 * inf). Three implementations, chosen per
forward by :meth:`ContextLoRALayer.adapt` (the grouped two update the frozen output in place):

* uniform: all live tokens in one context (context-agnostic PEFT, every decode step): two plain matmuls;
* block loop (:class:`_GroupedLoRA`): tokens are taken in context order (the shared plan's permutation) one
  block of rows at a time: gathered, multiplied by their own A_c and B_c, scattered back, so the only extra
  memory is a few MB of block buffers and the (L, r) hidden;
* grouped GEMM (:class:`_GroupedMMLoRA`), on GPUs where it is fast (:func:`use_grouped_mm`): the block loop costs
  ~3 kernel launches per block in forward and ~7 in backward, tens to hundreds per layer at 16 contexts, each a
  tiny rank-r matmul that leaves the GPU idle between launches. Where ``torch.nn.functional.grouped_mm`` has its
  CUTLASS kernel — CUDA devices of compute capability 9.x / 10.x (H100/H200, B200/GB200) in bfloat16 (bf16
  weights or bf16 autocast) — each matmul over all context segments is ONE launch (2 grouped GEMMs forward, 4
  backward, plus gathers and one scatter), with no host sync: the segment offsets come from the plan's counts,
  already on the host. A GPU user should then expect the context-specific LoRA delta to cost about one plain
  LoRA plus a gather of x and a scatter of the update (memory-bound copies of L x (d_in + d_out) elements), flat
  in the number of contexts and segments. Elsewhere grouped_mm is slower than the block loop: on CPU (torch 2.14,
  fp32, 1 thread) sort + grouped_mm measured 1.2-1.7x one plain LoRA's delta where the block loop measured
  0.9-1.4x (12,288 tokens), and 1.05-1.12x vs the loop's 1.03-1.08x of a one-context layer with SmolLM2's
  shapes at 1,024 tokens and 2-16 contexts (whole layer, forward + backward); on other GPUs and dtypes (A100 = SM80, RTX 40 = SM89, RTX 50 = SM120; fp16, fp32) torch runs a
  fallback that copies the offsets to the host (a device sync per call) and loops over groups. Not measured here
  (no GPU on this machine): an expectation from the kernel selection in torch's ``_grouped_mm_cuda``.

Measured against PEFT's LoRA layer in bench/RESULTS.md (``python bench/adaptors.py``) and end to end in
bench/RESULTS_train_step.md (``python bench/train_step.py``).
"""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from mtcpeft.core.contexts import RoutingPlan
from .base import AdaptorConfig, ContextLayer, Group, OptionError, register_adaptor
from .merging import GroupMergeError, low_rank, pad_rows, ties_merge


# Rows per gather/scatter block: bounds the temporaries of one block (rows x (d_in + d_out) floats) to a few MB,
# so the grouped path costs about the memory of one plain LoRA whatever the number of contexts.
_BLOCK_BYTES = 8 << 20


def _blocks(counts: tuple[int, ...], rows: int, perm: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """(context, start, stop, perm[start:stop]) over the context-sorted live tokens, segments cut into blocks of
    <= rows."""
    out, start = [], 0
    for c, n in enumerate(counts):
        for s in range(start, start + n, rows):
            e = min(s + rows, start + n)
            out.append((c, s, e, perm[s:e]))
        start += n
    return out


class _GroupedLoRA(torch.autograd.Function):
    """y[perm] += scale * B_c(A_c(x[perm])) block by block, in place on the frozen output y.

    y (..., D) frozen-layer output, x (..., d) with N tokens, A (C, r, d), B (C, r, D), perm (L,) indices into
    the N flattened tokens, counts: C python ints.
    Tokens are gathered, multiplied and scattered back one block of rows at a time into two reused buffers,
    so no (L, d) or (L, D) copy ever exists; saves only the index, the unscaled (L, r) hidden and x, A, B.
    The loop body is a handful of torch calls (scale folded into index_add_ / addmm_, per-context views taken
    once per call): with short segments (small batches, many contexts) dispatch, not arithmetic, is the cost.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, perm, counts, scale):
        d, D = x.shape[-1], y.shape[-1]
        yf, xf = y.view(-1, D), x.reshape(-1, d)  # flat views (x copied only if it was not contiguous)
        rows = max(256, _BLOCK_BYTES // (x.element_size() * (d + D)))
        h = x.new_empty(perm.shape[0], A.shape[1])  # (L, r), context order
        xs_buf, out_buf = x.new_empty(rows, d), x.new_empty(rows, D)
        At, Bc = A.transpose(1, 2).unbind(0), B.unbind(0)  # (d, r) and (r, D) per context
        blocks = _blocks(counts, rows, perm)
        for c, s, e, idx in blocks:
            xs = torch.index_select(xf, 0, idx, out=xs_buf[: e - s])
            hs = torch.mm(xs, At[c], out=h[s:e])
            yf.index_add_(0, idx, torch.mm(hs, Bc[c], out=out_buf[: e - s]), alpha=scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, A, B, perm, h)
        ctx.blocks, ctx.scale, ctx.rows = blocks, scale, rows
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, perm, h = ctx.saved_tensors  # h without the scale
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        rows, scale, d, D = ctx.rows, ctx.scale, x.shape[-1], g.shape[-1]
        gf, xf = g.reshape(-1, D), x.reshape(-1, d)
        # weight grads are accumulated block by block: contexts without tokens keep exact zeros
        gA = torch.zeros_like(A) if need_A else None
        gB = torch.zeros_like(B) if need_B else None
        gAc = gA.unbind(0) if need_A else None
        gBc = gB.unbind(0) if need_B else None
        gx = gxf = None
        if need_x:  # every live token is written exactly once; -1 tokens (absent from perm) get zeros
            gx = x.new_empty(x.shape) if perm.shape[0] == xf.shape[0] else x.new_zeros(x.shape)
            gxf = gx.view(-1, d)  # written through a flat view; gx itself (x's shape) is returned
        gs_buf, xs_buf, gxs_buf = g.new_empty(rows, D), x.new_empty(rows, d), x.new_empty(rows, d)
        Ac, Bt = A.unbind(0), B.transpose(1, 2).unbind(0)  # (r, d) and (D, r) per context
        for c, s, e, idx in ctx.blocks:
            n = e - s
            gs = torch.index_select(gf, 0, idx, out=gs_buf[:n])  # (n, D)
            if need_B:
                gBc[c].addmm_(h[s:e].t(), gs, alpha=scale)  # (r, D): the fast layout on CPU
            if need_A or need_x:
                gh = torch.mm(gs, Bt[c]).mul_(scale)  # (n, r)
                if need_A:
                    gAc[c].addmm_(gh.t(), torch.index_select(xf, 0, idx, out=xs_buf[:n]))  # (r, d)
                if need_x:
                    gxf.index_copy_(0, idx, torch.mm(gh, Ac[c], out=gxs_buf[:n]))
        return g, gx, gA, gB, None, None, None


# ----------------------------------------------------------------------------------------- grouped GEMM path
GROUPED_MM = "auto"
"""How context-grouped LoRA runs: ``"auto"`` (grouped GEMM where it has a fast kernel, see :func:`use_grouped_mm`;
the block loop elsewhere), ``"always"`` (grouped GEMM wherever grouped_mm accepts the shapes, CPU included: for
tests and measurements), ``"never"`` (the block loop everywhere). A module-level switch: set
``mtcpeft.core.adaptors.lora.GROUPED_MM``."""

_FAST_GROUPED_MM_MAJORS = (9, 10)  # compute capabilities with torch's CUTLASS bf16 grouped GEMM (SM90, SM100)


@lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def grouped_mm_layout_ok(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether grouped_mm accepts these operands: float dtypes, every row stride it sees (d_in, r, d_out) a multiple
    of 16 bytes (8 elements in bf16), 16-byte aligned weights (not views at odd offsets of a flat buffer)."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    align = 16 // x.element_size()
    dims_ok = all(n % align == 0 for n in (A.shape[1], A.shape[2], B.shape[2]))
    return dims_ok and A.data_ptr() % 16 == 0 and B.data_ptr() % 16 == 0


def use_grouped_mm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Grouped GEMM or block loop for the grouped path. x (..., d_in), A (C, r, d_in), B (C, r, d_out), one dtype.

    ``"auto"``: grouped GEMM only on CUDA (not ROCm) devices of compute capability 9.x/10.x in bfloat16, where
    torch's ``_grouped_mm_cuda`` takes its CUTLASS kernel; any other device, dtype or layout would take torch's
    fallback (a host sync and a loop over groups), slower than the block loop.
    """
    if GROUPED_MM not in ("auto", "always", "never"):
        raise ValueError(f"mtcpeft.core.adaptors.lora.GROUPED_MM is {GROUPED_MM!r}; set it to 'auto', 'always' or 'never'")
    if GROUPED_MM == "never" or not grouped_mm_layout_ok(x, A, B):
        return False
    if GROUPED_MM == "always":
        return True
    return (x.is_cuda and torch.version.hip is None and x.dtype == torch.bfloat16
            and _cuda_major(x.device.index if x.device.index is not None else torch.cuda.current_device())
            in _FAST_GROUPED_MM_MAJORS)


_OFFSETS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # plan -> int32 offsets on the device, one copy per plan


def _offsets(plan: RoutingPlan, device: torch.device) -> torch.Tensor:
    """(C,) int32 end of each context's segment in the sorted live tokens (empty contexts repeat the previous
    end), built once per plan and device: every layer of the forward and its recomputation share it."""
    offs = _OFFSETS.get(plan)
    if offs is None or offs.device != device:
        offs = torch.tensor(list(itertools.accumulate(plan.counts)), dtype=torch.int32).to(device, non_blocking=True)
        _OFFSETS[plan] = offs
    return offs


class _GroupedMMLoRA(torch.autograd.Function):
    """The update of :class:`_GroupedLoRA` with one ``grouped_mm`` per matmul over all context segments.

    y (..., D) frozen output (updated in place), x (..., d), A (C, r, d), B (C, r, D), perm (L,), offs (C,) int32
    segment ends on x's device, counts: C python ints. Forward: xs = x[perm] (L, d), h = scale * xs A_c^T (L, r),
    y[perm] += h B_c. Saves x, A, B, perm, offs and h; xs is gathered again in backward rather than kept.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, perm, offs, counts, scale):
        d, D = x.shape[-1], y.shape[-1]
        xs = x.reshape(-1, d).index_select(0, perm)  # (L, d), context order
        h = F.grouped_mm(xs, A.transpose(1, 2), offs=offs).mul_(scale)  # (L, r)
        y.view(-1, D).index_add_(0, perm, F.grouped_mm(h, B, offs=offs))
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, A, B, perm, offs, h)
        ctx.counts, ctx.scale = counts, scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, perm, offs, h = ctx.saved_tensors  # h already carries the scale
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        d, D = x.shape[-1], g.shape[-1]
        # a gathered, hence dense, upstream gradient: grouped_mm's own backward fails on stride-0 operands such as
        # the expanded gradient of `.sum()`; .contiguous() is a no-op on the fresh gather, kept as the guarantee
        gs = g.reshape(-1, D).index_select(0, perm).contiguous()  # (L, D)
        gA = gB = gx = None
        if need_B:
            gB = F.grouped_mm(h.t(), gs, offs=offs)  # (C, r, D)
        if need_A or need_x:
            gh = F.grouped_mm(gs, B.transpose(1, 2), offs=offs).mul_(ctx.scale)  # (L, r)
            if need_A:
                gA = F.grouped_mm(gh.t(), x.reshape(-1, d).index_select(0, perm), offs=offs)  # (C, r, d)
            if need_x:  # -1 tokens (absent from perm) get zeros
                gx = x.new_empty(x.shape) if perm.shape[0] == x.shape[:-1].numel() else x.new_zeros(x.shape)
                gx.view(-1, d).index_copy_(0, perm, F.grouped_mm(gh, A, offs=offs))
        # contexts without tokens get exact zeros whatever the kernel leaves in an empty group (SM100 kernels have
        # written non-zero weight gradients there: pytorch/pytorch#172439)
        for c, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (gA, gB):
                    if grad is not None:
                        grad[c].zero_()
        return g, gx, gA, gB, None, None, None, None


@dataclass
class LoRAConfig(AdaptorConfig):
    """Context-LoRA options."""

    rank: int = 8  # r: rank of each context's update
    alpha: float | None = None  # scaling numerator; the update is scaled by alpha / rank (None: alpha = rank)
    dropout: float = 0.0  # dropout on the layer input of the LoRA branch only

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise OptionError("LoRA", "rank", "must be a positive integer", self.rank)
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError("LoRA", "dropout", "must be in [0, 1)", self.dropout)
        if self.alpha is not None and not self.alpha > 0:
            raise OptionError("LoRA", "alpha", "must be positive (or null: alpha = rank)", self.alpha)
        if self.alpha is None:
            self.alpha = float(self.rank)

    identity = 0.0  # of B; a group that changes nothing has B = 0 and any A
    strategies = {
        **AdaptorConfig.strategies,
        "average": "averages A and B separately (NOT the mean of the updates B·A: approximate)",
        "ties": "TIES-merges the dense updates scale·A^T·B, re-factorised to the rank by truncated SVD (approximate)",
        "concat": "concatenates LoRA ranks",  # exact: [A1; A2]^T [B1; B2] = A1^T B1 + A2^T B2
    }

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # ------------------------------------------------------------------ plugins and merging (see AdaptorConfig)
    def shape_problem(self, shapes: dict[str, list[int]]) -> tuple[str, str] | None:
        """lora_A (C, rank, d_in) and lora_B (C, rank, d_out), agreeing on (C, rank)."""
        for param, shape in shapes.items():
            if len(shape) != 3:
                return param, f"has shape {shape}; a LoRA {param} is 3-D (contexts, rank, width)"
            if shape[1] != self.rank:
                return param, f"has rank dim {shape[1]} but adaptor.rank is {self.rank}"
        a, b = shapes["lora_A"], shapes["lora_B"]
        if a[:2] != b[:2]:
            return "lora_B", f"has shape {b} but lora_A has {a}: they disagree on (contexts, rank)"
        return None

    def fit_problem(self, source: "LoRAConfig") -> str | None:
        if source.rank > self.rank:
            return (f"LoRA groups of rank {source.rank} exceed the model's rank {self.rank}; build the model with "
                    f"rank >= {source.rank}")
        return None

    def _fold(self, group: Group, source: "LoRAConfig") -> Group:
        """Fold ``source``'s scale into B so that this config's scale computes the same update (exact)."""
        A, B = group
        return [A, B * (source.scale / self.scale)] if source.scale != self.scale else [A, B]

    def conform(self, group: Group, source: "LoRAConfig") -> Group:
        """Scale folded into B, both factors zero-padded to this rank: the same update, exactly."""
        return [pad_rows(t, self.rank) for t in self._fold(group, source)]

    def identity_group(self, shapes: Sequence[torch.Size], seed: str) -> Group:
        """B = 0 and A a Kaiming-uniform seeded by ``seed`` (so that joint fine-tuning can start from it)."""
        d_in, d_out = shapes[0][-1], shapes[1][-1]
        g = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
        bound = 1.0 / math.sqrt(d_in)
        return [torch.rand(self.rank, d_in, generator=g) * 2 * bound - bound, torch.zeros(self.rank, d_out)]

    @classmethod
    def merged(cls, sources: Sequence["LoRAConfig"], new_groups: Sequence[Sequence["LoRAConfig"]],
               strategy: str) -> "LoRAConfig":
        """The largest rank any group needs (concat: the sum of its members'), the sources' common scale or 1
        (each source's then folded into B: exact), the largest dropout (it acts in training only)."""
        scales = {c.scale for c in sources}
        scale = scales.pop() if len(scales) == 1 else 1.0
        rank = max(c.rank for c in sources)
        for members in new_groups:
            ranks = [c.rank for c in members]
            rank = max(rank, sum(ranks) if strategy == "concat" else max(ranks))
        return cls(rank=rank, alpha=scale * rank, dropout=max(c.dropout for c in sources))

    def combine(self, members: Sequence[tuple[Group, "LoRAConfig"]], strategy: str, density: float) -> Group:
        """concat: the sum of the updates (exact); average: A and B averaged separately; ties: TIES on the dense
        updates (d_in, d_out), then the best rank-r factors (r: the members' largest rank)."""
        folded = [self._fold(g, c) for g, c in members]  # one common scale: this config's
        if strategy == "concat":
            A, B = torch.cat([m[0] for m in folded]), torch.cat([m[1] for m in folded])
            return [pad_rows(A, self.rank), pad_rows(B, self.rank)]
        rank = max(m[0].shape[0] for m in folded)
        if strategy == "average":
            A, B = [torch.stack([pad_rows(m[i], rank) for m in folded]).mean(0) for i in (0, 1)]
        elif strategy == "ties":
            s = self.scale
            merged = ties_merge([s * m[0].t().double() @ m[1].double() for m in folded], density)  # (d_in, d_out)
            A, B = low_rank(merged / s, rank)
            A, B = A.to(folded[0][0].dtype), B.to(folded[0][1].dtype)
        else:
            raise GroupMergeError(self.strategy_problem(strategy) or f"LoRA cannot combine by {strategy!r}")
        return [pad_rows(A, self.rank), pad_rows(B, self.rank)]


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
            xd, A, B = xd.to(dt), A.to(dt), B.to(dt)
            if use_grouped_mm(xd, A, B):  # one grouped GEMM per matmul (CUDA SM90/SM100, bf16)
                offs = _offsets(plan, y.device)
                return _GroupedMMLoRA.apply(y, xd, A, B, plan.perm, offs, plan.counts, self.scale)
            return _GroupedLoRA.apply(y, xd, A, B, plan.perm, plan.counts, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[1]}, scale={self.scale:g}"


LoRAConfig.layer_cls = ContextLoRALayer
register_adaptor("lora")(LoRAConfig)
