"""Next-token losses restricted to label positions (``-100`` = no loss), for logits that may cover only the last
positions of the sequence (Hugging Face ``logits_to_keep``)."""
from __future__ import annotations

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
