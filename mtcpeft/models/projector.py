"""Vision tokens -> LM embedding width: dropout, then a linear map (the paper) or a two-layer MLP."""
from __future__ import annotations

import torch
from torch import nn

PROJECTOR_KINDS = ("linear", "mlp")


class Projector(nn.Module):
    """(B, T, in_dim) image tokens -> (B, T, out_dim) LM input embeddings; trainable.

    ``kind="linear"``: Dropout(p) -> Linear, as in the paper (dropout 0.1 before the projection).
    ``kind="mlp"``: Dropout(p) -> Linear -> GELU -> Linear (hidden width ``out_dim``).
    Dropout acts only in train mode.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", dropout: float = 0.1):
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {kind!r}; known: {', '.join(PROJECTOR_KINDS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"projector dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        self.dropout = nn.Dropout(dropout)
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tokens may arrive in a cache's float16: compute in the projector's own dtype
        return self.proj(self.dropout(x.to(self.proj_dtype)))  # (B, T, out_dim)

    @property
    def proj_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
