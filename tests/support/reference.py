"""Naive per-token reference implementations of every adaptor kind: a Python loop over tokens that applies
the parameters of each token's context to that token alone. Independent of the grouped/looked-up fast paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtcpeft.core.adaptors import ContextBitFitLayer, ContextIA3Layer, ContextLoRALayer


def base_apply(layer, x):
    return layer.base_layer(x)


def naive_adapt(layer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (..., d), ids (N,) -> (..., D): token by token."""
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    rows = []
    for n in range(xf.shape[0]):
        xn = xf[n : n + 1]
        c = int(ids[n])
        if isinstance(layer, ContextIA3Layer) and layer.role == "in":
            if c >= 0:
                s = F.pad(layer.ia3_scale[c], (layer.feature_slice[0], layer.width - layer.feature_slice[1]), value=1.0)
                xn = xn * s
            rows.append(layer.base_layer(xn))
            continue
        y = layer.base_layer(xn)
        if c >= 0:
            if isinstance(layer, ContextLoRALayer):
                y = y + layer.scale * (xn @ layer.lora_A[c].t()) @ layer.lora_B[c]
            elif isinstance(layer, ContextBitFitLayer):
                y = y + layer.bitfit_bias[c]
            elif isinstance(layer, ContextIA3Layer):
                start, stop = layer.feature_slice
                y = torch.cat([y[:, :start], y[:, start:stop] * layer.ia3_scale[c], y[:, stop:]], dim=1)
            else:
                raise TypeError(type(layer))
        rows.append(y)
    return torch.cat(rows, 0).view(*lead, -1)


def randomize_adaptors(model, scale: float = 0.5, seed: int = 0) -> None:
    """Give every adaptor tensor non-trivial values so that wrong routing changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_(1.0 + noise if "ia3" in name else noise)


def manual_greedy(m, ids, ctx, steps, gen_ctx):
    """Independent oracle: full-sequence forwards, no cache, contexts grown by hand."""
    for _ in range(steps):
        logits = m(ids, context_ids=ctx).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        ctx = torch.cat([ctx, torch.full_like(nxt, gen_ctx)], 1)
    return ids
