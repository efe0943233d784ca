"""Evaluation metrics of the tasks: SQuAD exact match / F1, VQA accuracy, COCO caption BLEU / CIDEr-D, perplexity.

Each takes plain dicts — predictions {example id: text}, references {example id: [texts]} — and returns a dict of
floats plus per-example scores.
"""
from .caption import caption_scores
from mtcpeft.core.losses import perplexity  # the one implementation; the trainer uses it too
from .squad import squad_scores
from .vqa import vqa_accuracy

__all__ = ["caption_scores", "perplexity", "squad_scores", "vqa_accuracy"]
