"""The training split of a streaming run (``data.streaming=true``) as an :class:`~mtcpeft.data.streaming.ItemStream`
whose rows are turned into the task's examples, checked and encoded as they are read (the streaming twin of
:func:`mtcpeft.training.build.build_datasets`, which reads a split whole).

Items carry the same tensors as :class:`~mtcpeft.data.dataset.EncodedDataset` items; images are decoded and
transformed when read (``pixel_values``: a stream has no fixed set of images to cache features of). What was
dropped is counted in the stream's :class:`~mtcpeft.data.dataset.DataReport` (this process's rows only).
"""
from __future__ import annotations

import torch

from mtcpeft.config import RunConfig
from mtcpeft.data.dataset import DataReport, check_images, open_image
from mtcpeft.data.packing import EmptyTargetError, PromptTooLongError
from mtcpeft.data.streaming import ItemStream, open_stream, row_reader, rows_dataset
from mtcpeft.models.vision import image_transform
from .build import build_datasets, context_map

KEYS = ("input_ids", "context_ids", "labels", "attention_mask", "image_mask")


def build_train_stream(cfg: RunConfig, task, model, tokenizer, layout, rank: int = 0, world_size: int = 1,
                       routes: torch.Tensor | None = None) -> ItemStream:
    """This process's stream of training items (see the module docstring). ``routes`` as in ``build_datasets``."""
    data = cfg.data
    stream, key, base = open_stream(data, "train")
    read = row_reader(task, data, "train", f"{key}[streamed batch]", base)  # images: "<split>[streamed batch][row]"
    routes = routes if routes is not None else context_map(cfg, task)
    transform = image_transform(model.encoder, train=True, augment=data.augment) if task.uses_images else None
    report, reader_dropped = DataReport(), [0]
    features = stream.features

    def encode_rows(rows: dict) -> dict:
        examples, dropped = read(rows_dataset(rows, features))
        report.examples += len(examples)
        if dropped:  # e.g. unanswerable questions, answers not in their passage (the QA reader's checks)
            reader_dropped[0] += dropped
            report.reader = f"{reader_dropped[0]:,} questions dropped by the reader"
        bad, reasons = set(), {}
        if task.uses_images:
            bad = check_images([e["image"] for e in examples], data.on_bad_image, progress=False, reasons=reasons)
            report.bad_images += sorted(bad)
            report.bad_image_example = report.bad_image_example or next((f"{p}: {reasons[p]}" for p in sorted(bad)), "")
        out = {k: [] for k in KEYS + (("pixel_values",) if task.uses_images else ())}
        for e in examples:
            if task.uses_images and e["image"] in bad:
                continue
            try:
                enc = task.encode(e, tokenizer, layout)
            except EmptyTargetError:
                report.empty_targets += 1
                continue
            except PromptTooLongError:
                report.too_long += 1
                continue
            report.truncated += enc.pop("truncated", False)
            for k in KEYS:
                out[k].append(torch.tensor(enc[k], dtype=torch.bool if k == "image_mask" else torch.long))
            if routes is not None:
                out["context_ids"][-1] = routes[out["context_ids"][-1] + 1]
            if transform is not None:
                out["pixel_values"].append(transform(open_image(e["image"])))
        report.kept += len(out["input_ids"])
        return out

    return ItemStream(stream, encode_rows, cfg.seed, data.shuffle_buffer, rank, world_size, data.describe("train"),
                      report)


def build_run_data(cfg: RunConfig, task, model, tokenizer, layout, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> tuple[object, object, dict[str, DataReport]]:
    """(the training set: a dataset, or this process's :class:`ItemStream` with ``data.streaming``; the validation
    dataset; {split: DataReport}). A stream's report fills as training reads it."""
    if not cfg.data.streaming:
        data = build_datasets(cfg, task, model, tokenizer, layout, progress=progress)
        return data["train"][0], data["val"][0], {split: report for split, (_, report) in data.items()}
    val, report = build_datasets(cfg, task, model, tokenizer, layout, splits=("val",), progress=progress)["val"]
    train = build_train_stream(cfg, task, model, tokenizer, layout, rank, world_size)
    return train, val, {"train": train.report, "val": report}
