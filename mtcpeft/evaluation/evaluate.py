"""Evaluate a task plugin on a split: perplexity of the targets (teacher forcing) and the task's generation
metrics (caption: BLEU-4 / CIDEr-D; vqa: VQA accuracy; qa: SQuAD exact match / F1), plus example generations."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtcpeft.core.losses import perplexity as token_perplexity, target_nll
from mtcpeft.training.build import build_datasets, image_input
from .generation import generate_texts


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 16, progress: bool = False) -> dict:
    """exp(mean NLL over every target token of ``dataset``), as the trainer's validation computes it."""
    model.eval()
    batches = tqdm(DataLoader(dataset, batch_size=batch_size), desc="perplexity", disable=not progress)
    nll, count = target_nll(model, batches)
    return {"loss": nll / max(count, 1), "ppl": token_perplexity(nll, max(count, 1)), "tokens": count}


def unique_by_id(task, examples: list[dict]) -> list[dict]:
    """One example per prediction key (captioning has several captions per image: generate once per image)."""
    seen, out = set(), []
    for e in examples:
        key = task.example_id(e)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def evaluate_task(cfg, task, model, tokenizer, layout, split: str = "val", beams: int = 1, batch_size: int = 16,
                  num_examples: int = 8, progress: bool = True, routes=None, generated_context: str | None = None,
                  ) -> dict:
    """{"split", "examples", "perplexity": {...}, "metrics": {...}, "samples": [...]} for one split. A unified
    model takes the task's ``routes`` and the group of its generated tokens (see :func:`generate_texts`)."""
    data, report = build_datasets(cfg, task, model, tokenizer, layout, splits=(split,), progress=progress,
                                  routes=routes)[split]
    if progress:
        print(report.summary(split))
    ppl = perplexity(model, data, batch_size, progress)  # a task's own rows: never a mixed batch
    examples = unique_by_id(task, data.examples)  # the examples that were kept (readable image, fitting prompt)
    images = image_input(cfg, model, examples, split, progress, cache_name=f"{split}_unique") if task.uses_images else None
    texts = generate_texts(model, tokenizer, layout, task, examples, images, beams, batch_size=batch_size,
                           progress=progress, routes=routes, generated_context=generated_context)
    predictions = {task.example_id(e): t for e, t in zip(examples, texts)}
    metrics = task.score(predictions, data.examples)  # every kept example: captioning scores against all captions
    samples = [{"id": task.example_id(e), **{k: e[k] for k in ("image", "question", "caption", "answer", "answers")
                                              if k in e}, "generated": t} for e, t in zip(examples, texts)]
    return {"split": split, "data": vars(report) | {"bad_images": len(report.bad_images)},
            "predictions": len(predictions), "perplexity": ppl, "metrics": metrics, "samples": samples[:num_examples]}
