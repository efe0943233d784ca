"""Next-token losses restricted to label positions (``-100`` = no loss), for logits that may cover only the last
positions of the sequence (Hugging Face ``logits_to_keep``)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE = -100


def positions_to_keep(labels: torch.Tensor) -> int:
    """How many final positions' logits a loss on ``labels`` (B, S) needs: from the one before the first label."""
    live = (labels != IGNORE).any(0).nonzero()
    first = int(live[0]) if len(live) else labels.shape[1]
    return min(labels.shape[1], labels.shape[1] - first + 1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token NLL and label counts, (B,) and (B,).

    logits (B, L, V) are the LAST L positions of the sequence (L <= S); labels (B, S).
    """
    L, S = logits.shape[1], labels.shape[1]
    targets = labels[:, S - L + 1 :]  # logits at position t predict the label at t + 1
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1), (targets != IGNORE).sum(1)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual causal-LM loss: mean NLL over every label token of the batch."""
    nll, n = token_nll(logits, labels)
    return nll.sum() / n.sum().clamp(min=1)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): the exponentiated mean token NLL (natural log); inf when that overflows (a diverged
    loss). ``count`` must be positive."""
    if count <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got count={count}; check the labels")
    mean = nll_sum / count
    return math.exp(mean) if mean < 709.0 else math.inf


@torch.no_grad()
def target_nll(model, batches: Iterable[dict], gather: Callable | None = None) -> tuple[float, int]:
    """Summed NLL and count of the label tokens of ``batches`` under ``model`` (teacher forcing): the numbers
    :func:`perplexity` takes. ``gather``: collects each batch's (nll, count) tensors from every process
    (accelerate's ``gather_for_metrics``); None on one process."""
    nll, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        per_ex, n = token_nll(model(**batch).logits, batch["labels"])  # logits may cover only the last positions
        if gather is not None:
            per_ex, n = gather((per_ex, n))
        nll += per_ex.double().sum().cpu()
        count += int(n.sum())
    return float(nll), count
