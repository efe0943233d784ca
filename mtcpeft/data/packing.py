"""The one sequence packer every task shares: segments in, fixed-length training rows (or generation prompts) out.

Every example is laid out as a prompt followed by a target, left-aligned and right-padded:

    [BOS] <image tokens, if any> <prompt text ...> <target text ... [EOS]> <padding to seq_len>
    loss only on the target (and its [EOS]); padding takes context -1 (no adaptor) and no attention.

A task lists the segments of its prompt (:class:`Segment`); :func:`pack_example` and :func:`pack_prompt` do the
rest: the target's truncation, the trimming of an over-long prompt, and the same prompt budget in training and
generation.
"""
from __future__ import annotations

from dataclasses import dataclass

from mtcpeft.config import ConfigError
from mtcpeft.core.losses import IGNORE  # label of positions that take no loss
from mtcpeft.errors import MtcpeftError


class EmptyTargetError(MtcpeftError, ValueError):
    """An example has nothing to learn (empty caption / answer); datasets count and skip these."""


class PromptTooLongError(MtcpeftError, ValueError):
    """An example's prompt does not fit the layout even after trimming; datasets count and skip these."""


@dataclass(frozen=True)
class SequenceLayout:
    """Token budget of one example: seq_len = 1 ([BOS]) + image tokens + prompt text + target (with [EOS])."""

    num_image_tokens: int = 0  # T: the vision encoder's tokens (0 for text-only tasks)
    seq_len: int = 128
    max_target_tokens: int = 63  # caption / answer tokens kept, counting [EOS]

    def __post_init__(self):
        if 1 + self.num_image_tokens + self.max_target_tokens > self.seq_len:
            raise ConfigError(
                f"seq_len {self.seq_len} cannot hold [BOS] + {self.num_image_tokens} image tokens + "
                f"{self.max_target_tokens} target tokens; raise data.seq_len or lower data.max_target_tokens"
            )

    @classmethod
    def of(cls, data, image_tokens: int = 0) -> "SequenceLayout":
        """The layout a data config asks for (``data.seq_len``, ``data.max_target_tokens``) with ``image_tokens``
        image positions (the encoder's tokens for a task that reads images, else 0)."""
        return cls(image_tokens, data.seq_len, data.max_target_tokens)

    @property
    def target_start(self) -> int:
        """Where the target starts when the prompt has no text (captioning): 1 + T."""
        return 1 + self.num_image_tokens

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens after [BOS]: the same in training and generation, so both see the same passage."""
        return self.seq_len - 1 - self.max_target_tokens


@dataclass
class Segment:
    """A run of tokens in one context. ``image=True`` reserves ``len(ids)`` image positions; ``trim`` marks the
    segment that is shortened from its start when the prompt does not fit (a QA passage)."""

    context: int
    ids: list[int]
    image: bool = False
    trim: bool = False


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids; models without a BOS or PAD token use EOS there (PAD is masked out anyway)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer of model.lm has no EOS token; tasks need one to end generated text")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def pack_example(prompt: list[Segment], target: str, target_context: int, bos_context: int, tokenizer,
                 layout: SequenceLayout, what: str) -> dict:
    """One training row: lists of length seq_len (input_ids, context_ids, labels, attention_mask, image_mask) and
    ``truncated`` (the target cut to ``max_target_tokens`` or the prompt trimmed). ``target`` is not empty (the task
    checks: :class:`EmptyTargetError`); ``what`` names the task in errors. Raises :class:`PromptTooLongError` on a
    prompt that does not fit."""
    bos, eos, pad = special_ids(tokenizer)
    text = tokenizer(target, add_special_tokens=False)["input_ids"]
    cut = len(text) > layout.max_target_tokens - 1
    segs, trimmed = fit_prompt(prompt, layout.prompt_budget, what)
    segs.append(Segment(target_context, text[: layout.max_target_tokens - 1] + [eos]))
    out = _pack(segs, bos_context, bos, pad, layout.seq_len, loss_from=len(segs) - 1)
    out["truncated"] = cut or trimmed
    return out


def pack_prompt(prompt: list[Segment], bos_context: int, tokenizer, layout: SequenceLayout, what: str) -> dict:
    """The generation prompt of one example (unpadded lists): [BOS] + the prompt, trimmed as in training."""
    bos, _, pad = special_ids(tokenizer)
    segs, _ = fit_prompt(prompt, layout.prompt_budget, what)
    return _pack(segs, bos_context, bos, pad, None, loss_from=None)


def fit_prompt(segs: list[Segment], budget: int, what: str) -> tuple[list[Segment], bool]:
    """(segments, trimmed): the ``trim`` segment shortened from its start until the prompt fits ``budget``."""
    over = sum(len(s.ids) for s in segs) - budget
    if over <= 0:
        return list(segs), False
    trim = [s for s in segs if s.trim]
    if not trim or len(trim[0].ids) < over:
        raise PromptTooLongError(f"{what}: the prompt needs {over} more tokens than data.seq_len leaves; "
                                 "raise data.seq_len or lower data.max_target_tokens (or shorten the text)")
    return [Segment(s.context, s.ids[over:], s.image, s.trim) if s is trim[0] else s for s in segs], True


def _pack(segs: list[Segment], bos_context: int, bos: int, pad: int, seq_len: int | None,
          loss_from: int | None) -> dict:
    ids, ctx, labels, image = [bos], [bos_context], [IGNORE], [False]
    for k, s in enumerate(segs):
        ids += [pad] * len(s.ids) if s.image else s.ids
        ctx += [s.context] * len(s.ids)
        labels += s.ids if loss_from is not None and k >= loss_from else [IGNORE] * len(s.ids)
        image += [s.image] * len(s.ids)
    n = len(ids)
    n_pad = 0 if seq_len is None else seq_len - n
    return {"input_ids": ids + [pad] * n_pad, "context_ids": ctx + [-1] * n_pad, "labels": labels + [IGNORE] * n_pad,
            "attention_mask": [1] * n + [0] * n_pad, "image_mask": image + [False] * n_pad}
