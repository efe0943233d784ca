"""Perplexity from a summed negative log-likelihood (natural log) over ``count`` predicted tokens."""
from __future__ import annotations

import math


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): the exponentiated mean token NLL. ``count`` must be positive."""
    if count <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got count={count}; check the labels")
    return math.exp(nll_sum / count)
