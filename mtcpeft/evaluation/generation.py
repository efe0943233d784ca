"""Batched generation: prompts of different lengths are left-padded (padding takes context -1 and no attention),
images go in as pixels or cached features, new tokens take each row's generated context.

One code path, :func:`generate_rows`, serves every caller: rows of one task (:func:`generate_texts`) or of several
(:func:`mtcpeft.evaluation.requests.generate_requests`: a caption, a VQA answer and a QA answer in one batch).
A row without an image in a batch with images gets a zero placeholder image, which the model never reads:
:meth:`~mtcpeft.models.vlm.VisionLanguageModel.embed` encodes only the rows whose image_mask marks positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mtcpeft.data.packing import special_ids

IMAGE_KEYS = ("pixel_values", "image_features")


def left_pad(prompts: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpadded prompt dicts (lists) -> a left-padded batch of tensors."""
    width = max(len(p["input_ids"]) for p in prompts)
    fill = {"input_ids": pad_id, "context_ids": -1, "attention_mask": 0, "image_mask": False}
    batch = {}
    for key, value in fill.items():
        rows = [[value] * (width - len(p[key])) + list(p[key]) for p in prompts]
        batch[key] = torch.tensor(rows, dtype=torch.bool if key == "image_mask" else torch.long)
    return batch


@dataclass
class Row:
    """One prompt to generate from, ready for a batch of any tasks.

    prompt: ``task.prompt(...)`` (unpadded lists) with its context ids already in the model's groups;
    generated_context: the group of its new tokens (None: the model's default); max_new_tokens: its budget;
    image: None, or a zero-argument callable giving ``{"pixel_values": (3, H, W)}`` or ``{"image_features": (T, D)}``
    (called when its batch is built, so images are read one batch at a time).
    """

    prompt: dict
    generated_context: str | int | None
    max_new_tokens: int
    image: Callable[[], dict] | None = None


def route_prompt(prompt: dict, routes: torch.Tensor | None) -> dict:
    """The prompt with its task's context ids mapped to the model's groups (``routes[id + 1]``; -1 stays -1)."""
    if routes is None:
        return prompt
    return {**prompt, "context_ids": routes[torch.as_tensor(prompt["context_ids"], dtype=torch.long) + 1].tolist()}


def stack_images(images: list[dict | None], encoder) -> dict[str, torch.Tensor]:
    """The image inputs of a batch: one tensor, one row per prompt. Rows without an image (text-only tasks) get
    zeros of the image rows' shape; when some rows give pixels and others cached features, the pixels are encoded
    to features here (as the model would encode them)."""
    given = [im for im in images if im is not None]
    if not given:
        return {}
    keys = {next(iter(im)) for im in given}
    key = keys.pop() if len(keys) == 1 else "image_features"
    if len(keys) > 1:
        dtype = next(im["image_features"] for im in given if "image_features" in im).dtype
        with torch.no_grad():
            images = [im if im is None or "image_features" in im else {"image_features": encoder(
                im["pixel_values"].unsqueeze(0).to(_device(encoder)))[0].to("cpu", dtype)} for im in images]
        given = [im for im in images if im is not None]
    blank = torch.zeros_like(given[0][key])
    return {key: torch.stack([blank if im is None else im[key] for im in images])}


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _one_context(contexts: list):
    """A batch's generated_context argument: one for every row when they agree, else one per row."""
    if all(c == contexts[0] for c in contexts):
        return {} if contexts[0] is None else {"generated_context": contexts[0]}
    return {"generated_context": list(contexts)}


@torch.no_grad()
def generate_rows(model, tokenizer, rows: Sequence[Row], beams: int = 1, batch_size: int = 16,
                  progress: bool = False, desc: str = "generating") -> list[str]:
    """One generated text per row, in order: ``batch_size`` rows (of any tasks) per ``model.generate`` call.

    Each row's text is what the row generates alone. Rows with different ``max_new_tokens`` share one greedy
    call (run to the largest budget; each row is cut to its own, which greedy decoding makes exact); beam search
    ranks finished beams by length, so there a batch makes one call per distinct budget.
    """
    _, eos, pad = special_ids(tokenizer)
    model.eval()
    device = _device(model)
    encoder = getattr(model, "encoder", None)
    out: list[str] = []
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
        batch_rows = rows[s:s + batch_size]
        images = [r.image() if r.image is not None else None for r in batch_rows]
        budgets = [r.max_new_tokens for r in batch_rows]
        calls = [list(range(len(batch_rows)))] if beams == 1 else \
            [[i for i, b in enumerate(budgets) if b == budget] for budget in sorted(set(budgets))]
        new: dict[int, torch.Tensor] = {}  # row -> its generated ids, cut to its budget
        for idx in calls:
            batch = left_pad([batch_rows[i].prompt for i in idx], pad)
            batch.update(stack_images([images[i] for i in idx], encoder))
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = model.generate(**batch, **_one_context([batch_rows[i].generated_context for i in idx]),
                                 num_beams=beams, do_sample=False, max_new_tokens=max(budgets[i] for i in idx),
                                 eos_token_id=eos, pad_token_id=pad)
            new.update({i: row[:budgets[i]] for i, row in zip(idx, ids)})
        out += [tokenizer.decode(new[i], skip_special_tokens=True).strip() for i in range(len(batch_rows))]
    return out


def generate_texts(model, tokenizer, layout, task, examples: list[dict], image_input: Callable[[int], dict] | None = None,
                   beams: int = 1, max_new_tokens: int | None = None, batch_size: int = 16,
                   progress: bool = False, routes: torch.Tensor | None = None,
                   generated_context: str | None = None) -> list[str]:
    """One generated text per example of one task (greedy, or beam search with ``beams`` > 1), in order.

    ``image_input(i)`` gives example i's {"pixel_values"} or {"image_features"} (image tasks only). A unified
    multi-task model takes ``routes`` (the task's context ids -> its groups, index id + 1) and the group of the
    generated tokens.
    """
    budget = max_new_tokens or layout.max_target_tokens
    rows = [Row(route_prompt(task.prompt(e, tokenizer, layout), routes), generated_context, budget,
                (lambda i=i: image_input(i)) if task.uses_images else None) for i, e in enumerate(examples)]
    return generate_rows(model, tokenizer, rows, beams, batch_size, progress, desc=f"generating ({task.name})")
