"""Image captioning, laid out as in Context-PEFT (arXiv 2312.08900, section 4):

    [BOS] <T projected image tokens> <caption tokens ... [EOS]> <padding to seq_len>
    ctx:  text  image x T            text ...                 -1
    loss: only on the caption tokens and [EOS] (the last positions of the sequence)

The paper uses T = 64 (Swin V2), seq_len 128, so a caption has up to 63 tokens counting [EOS]. Data: COCO's
official caption JSON or the Karpathy split (:mod:`mtcpeft.data.coco`), or easy-VQA offline.
"""
from __future__ import annotations

from dataclasses import dataclass

from mtcpeft.data.coco import read_coco_captions, read_karpathy
from mtcpeft.data.easyvqa import easyvqa_captions
from mtcpeft.losses import IGNORE  # label of positions that take no loss

from .base import Task, register_task



@dataclass(frozen=True)
class CaptionLayout:
    num_image_tokens: int  # T
    seq_len: int = 128
    max_caption_tokens: int = 63  # including [EOS]

    def __post_init__(self):
        if 1 + self.num_image_tokens + self.max_caption_tokens > self.seq_len:
            raise ValueError(
                f"seq_len {self.seq_len} cannot hold [BOS] + {self.num_image_tokens} image tokens + "
                f"{self.max_caption_tokens} caption tokens; raise data.seq_len or lower data.max_caption_tokens"
            )

    @property
    def caption_start(self) -> int:
        return 1 + self.num_image_tokens


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids; models without a BOS or PAD token use EOS there (PAD is masked out anyway)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; captioning needs one to end captions")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


@register_task
class CaptionTask(Task):
    name = "caption"
    contexts = ("image", "text")
    generated_context = "text"
    uses_images = True

    def examples(self, split: str, data) -> list[dict]:
        if data.source == "easyvqa":
            return easyvqa_captions(split)
        if data.source == "karpathy":
            return read_karpathy(_path(data.karpathy_json, "data.karpathy_json"), _path(data.images, "data.images"), split)
        if data.source == "coco":
            ann = data.annotations if split == "train" else data.val_annotations
            return read_coco_captions(_path(ann, f"data.{'annotations' if split == 'train' else 'val_annotations'}"),
                                      _path(data.images, "data.images"))
        raise ValueError(f"unknown caption data source {data.source!r}; use easyvqa, coco or karpathy")

    def encode(self, example: dict, tokenizer, layout: CaptionLayout) -> dict:
        """-> lists of length seq_len: input_ids, context_ids, labels, attention_mask, image_mask; plus
        ``truncated`` (bool). Raises ValueError on an empty caption (the dataset counts and skips those)."""
        caption = (example.get("caption") or "").strip()
        if not caption:
            raise ValueError(f"empty caption for image {example.get('image_id')}")
        bos, eos, pad = special_ids(tokenizer)
        text = tokenizer(caption, add_special_tokens=False)["input_ids"]
        budget = layout.max_caption_tokens - 1
        truncated = len(text) > budget
        cap = text[:budget] + [eos]
        T, S = layout.num_image_tokens, layout.seq_len
        n_pad = S - 1 - T - len(cap)
        image, text_ctx = self.vocab.id("image"), self.vocab.id("text")
        return {
            "input_ids": [bos] + [pad] * T + cap + [pad] * n_pad,
            "context_ids": [text_ctx] + [image] * T + [text_ctx] * len(cap) + [-1] * n_pad,
            "labels": [IGNORE] * (1 + T) + cap + [IGNORE] * n_pad,
            "attention_mask": [1] * (1 + T + len(cap)) + [0] * n_pad,
            "image_mask": [False] + [True] * T + [False] * (len(cap) + n_pad),
            "truncated": truncated,
        }

    def prompt(self, tokenizer, layout: CaptionLayout) -> dict:
        """The generation prompt: [BOS] and the image tokens (captions are generated in context "text")."""
        bos, _, _ = special_ids(tokenizer)
        T = layout.num_image_tokens
        return {
            "input_ids": [bos] + [bos] * T,
            "context_ids": [self.vocab.id("text")] + [self.vocab.id("image")] * T,
            "attention_mask": [1] * (1 + T),
            "image_mask": [False] + [True] * T,
        }


def _path(value, key: str) -> str:
    if not value:
        raise ValueError(f"{key} is not set; pass it in the config or as an override, e.g. {key}=/path/to/file")
    return value
