"""Batched generation for any task: prompts of different lengths are left-padded (padding takes context -1 and
no attention), images go in as pixels or cached features, new tokens take the task's generated context."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from mtcpeft.data.packing import special_ids


def left_pad(prompts: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpadded prompt dicts (lists) -> a left-padded batch of tensors."""
    width = max(len(p["input_ids"]) for p in prompts)
    fill = {"input_ids": pad_id, "context_ids": -1, "attention_mask": 0, "image_mask": False}
    batch = {}
    for key, value in fill.items():
        rows = [[value] * (width - len(p[key])) + list(p[key]) for p in prompts]
        batch[key] = torch.tensor(rows, dtype=torch.bool if key == "image_mask" else torch.long)
    return batch


@torch.no_grad()
def generate_texts(model, tokenizer, layout, task, examples: list[dict], image_input: Callable[[int], dict] | None = None,
                   beams: int = 1, max_new_tokens: int | None = None, batch_size: int = 16,
                   progress: bool = False, routes: torch.Tensor | None = None,
                   generated_context: str | None = None) -> list[str]:
    """One generated text per example (greedy, or beam search with ``beams`` > 1), in order.

    ``image_input(i)`` gives example i's {"pixel_values"} or {"image_features"} (image tasks only). A unified
    multi-task model takes ``routes`` (the task's context ids -> its groups, index id + 1) and the group of the
    generated tokens.
    """
    _, eos, pad = special_ids(tokenizer)
    max_new_tokens = max_new_tokens or layout.max_target_tokens
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc=f"generating ({task.name})", disable=not progress):
        idx = list(range(s, min(s + batch_size, len(examples))))
        batch = left_pad([task.prompt(examples[i], tokenizer, layout) for i in idx], pad)
        if routes is not None:
            batch["context_ids"] = routes[batch["context_ids"] + 1]
        batch = {k: v.to(device) for k, v in batch.items()}
        if task.uses_images:
            images = [image_input(i) for i in idx]
            key = next(iter(images[0]))
            batch[key] = torch.stack([im[key] for im in images]).to(device)
        extra = {"generated_context": generated_context} if generated_context is not None else {}
        ids = model.generate(**batch, **extra, num_beams=beams, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad)
        out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return out
