"""Tensor arithmetic the kinds share when they combine context groups: TIES-merging and low-rank refactoring.

A *group* is one context's tensors of one adapted layer, in the order of the layer's ``adaptor_param_names``,
without the leading context dim. How the groups of a kind combine is the kind's own business
(:meth:`~mtcpeft.core.adaptors.base.AdaptorConfig.combine`); the kinds build it from these pieces.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from mtcpeft.errors import MtcpeftError


class GroupMergeError(MtcpeftError, ValueError):
    """Groups of a kind that cannot be combined or stored as asked; the message names the conflict and the fix.
    The plugin merger re-raises it as its own ``MergeError``."""


def ties_merge(deltas: Sequence[torch.Tensor], density: float = 0.2) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023, arXiv 2306.01708) of task vectors of one tensor (same shapes).

    Trim: each task vector keeps its top ``density`` fraction of entries by magnitude (ties at the threshold
    kept), others set to 0. Elect: the sign of the sum of the trimmed vectors. Disjoint merge: each entry is the
    mean of the trimmed values that are nonzero and agree with the elected sign (0 if none).
    """
    if not 0.0 < density <= 1.0:
        raise GroupMergeError(f"TIES density must be in (0, 1], got {density}")
    stack = torch.stack([d.reshape(-1).double() for d in deltas])  # (k, n)
    keep = max(1, math.ceil(density * stack.shape[1]))
    if keep < stack.shape[1]:
        threshold = stack.abs().topk(keep, dim=1).values[:, -1:]  # (k, 1)
        stack = torch.where(stack.abs() >= threshold, stack, torch.zeros_like(stack))
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(deltas[0].shape).to(deltas[0].dtype)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, d_in), B (rank, d_out) with A^T B the best rank-``rank`` approximation of delta (d_in, d_out)
    (truncated SVD, Eckart-Young); rows past the matrix's own rank are zeros."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    A, B = (U[:, :k] * root).t(), root[:, None] * Vh[:k]
    return pad_rows(A, rank).to(delta.dtype), pad_rows(B, rank).to(delta.dtype)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (n, d) zero-padded to (rows, d)."""
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))
