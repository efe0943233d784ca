"""Image captioning, laid out as in Context-PEFT (arXiv 2312.08900, section 4):

    [BOS] <T projected image tokens> <caption tokens ... [EOS]> <padding to seq_len>
    ctx:  text  image x T            text ...                 -1
    loss: only on the caption tokens and [EOS] (the last positions of the sequence)

The paper uses T = 64 (Swin V2), seq_len 128, so a caption has up to 63 tokens counting [EOS]. Data: COCO's
official caption JSON or the Karpathy split (:mod:`mtcpeft.data.coco`), or easy-VQA offline. Metrics: BLEU-4 and
CIDEr-D of one generated caption per image against all of its references.
"""
from __future__ import annotations

from pathlib import Path

from mtcpeft.config import ConfigError
from mtcpeft.data.coco import read_coco_captions, read_karpathy
from mtcpeft.data.easyvqa import easyvqa_captions

from mtcpeft.data.task import Segment, SequenceLayout, Task, register_task

CaptionLayout = SequenceLayout  # the captioning name of the shared layout


@register_task
class CaptionTask(Task):
    name = "caption"
    contexts = ("image", "text")
    generated_context = "text"
    bos_context = "text"
    uses_images = True
    sources = ("easyvqa", "coco", "karpathy")
    metric = "cider"

    def examples(self, split: str, data) -> list[dict]:
        if data.source == "easyvqa":
            return easyvqa_captions(split)
        if data.source == "karpathy":
            return read_karpathy(need(data.karpathy_json, "data.karpathy_json", exists=True),
                                 need_dir(data.images, "data.images"), split)
        if data.source == "coco":
            key = "annotations" if split == "train" else "val_annotations"
            images = "val_images" if split != "train" and getattr(data, "val_images", None) else "images"
            return read_coco_captions(need(getattr(data, key), f"data.{key}", exists=True),
                                      need_dir(getattr(data, images), f"data.{images}"))
        raise ValueError(f"the caption task reads data.source {', '.join(self.sources)}, not {data.source!r}")

    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:
        return [self.image_segment(layout)]

    def target_text(self, example: dict) -> str:
        return example.get("caption") or ""

    def example_id(self, example: dict):
        return example["image_id"]

    def score(self, predictions: dict, examples: list[dict]) -> dict:
        from mtcpeft.evaluation.metrics.caption import caption_scores

        refs: dict = {}
        for e in examples:  # one example per caption: gather every reference of an image
            refs.setdefault(e["image_id"], set()).update(e.get("references") or [e["caption"]])
        refs = {k: sorted(v) for k, v in refs.items() if k in predictions}
        scores = caption_scores({k: v for k, v in predictions.items() if k in refs}, refs)
        return {k: v for k, v in scores.items() if not isinstance(v, dict)}


def need(value, key: str, exists: bool = False) -> str:
    """A required data path, or an error naming the config key to set (``exists``: the path must exist)."""
    if not value:
        raise ConfigError(f"{key} is not set; pass it in the config or as an override, e.g. {key}=/path/to/file")
    if exists and not Path(value).exists():
        raise ConfigError(f"{key}={value} does not exist; check the path (relative paths start where you run)")
    return value


def need_dir(value, key: str) -> str:
    """A required image folder, or an error naming the config key."""
    if not Path(need(value, key)).is_dir():
        raise ConfigError(f"{key}={value} is not a folder; point it at the folder that holds the images")
    return value
