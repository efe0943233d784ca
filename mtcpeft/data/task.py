"""What a task declares — its contexts, data sources, how an example becomes tokens, the context of generated
tokens, and its metrics — and the one sequence packer every task shares.

Every task lays an example out as a prompt followed by a target, left-aligned and right-padded:

    [BOS] <image tokens, if any> <prompt text ...> <target text ... [EOS]> <padding to seq_len>
    loss only on the target (and its [EOS]); padding takes context -1 (no adaptor) and no attention.

A task only lists its segments (:meth:`Task.segments`); packing, truncation and generation prompts are shared.
Format readers live in :mod:`mtcpeft.data`, metrics in :mod:`mtcpeft.evaluation.metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtcpeft.config import ConfigError
from mtcpeft.core.contexts import ContextVocab
from mtcpeft.core.losses import IGNORE  # label of positions that take no loss
from mtcpeft.errors import MtcpeftError
from mtcpeft.registry import Registry

TASKS: Registry[type["Task"]] = Registry("task")


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

    @property
    def target_start(self) -> int:
        """Where the target starts when the prompt has no text (captioning): 1 + T."""
        return 1 + self.num_image_tokens


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


class Task:
    """Base of tasks. Subclasses set the class attributes and implement :meth:`examples`, :meth:`prompt_segments`,
    :meth:`target_text`, :meth:`example_id` and :meth:`score`."""

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]]
    generated_context: ClassVar[str]  # context of target / generated tokens
    bos_context: ClassVar[str]  # context of the leading [BOS]
    uses_images: ClassVar[bool] = False
    sources: ClassVar[tuple[str, ...]]  # data.source values this task reads; the first is the offline default
    metric: ClassVar[str]  # the headline generation metric (a key of :meth:`score`)

    @property
    def vocab(self) -> ContextVocab:
        return ContextVocab(self.contexts)

    # ------------------------------------------------------------------------------------- declared per task
    def examples(self, split: str, data) -> list[dict]:  # pragma: no cover - interface
        """Read ``split`` ("train" / "val") of the data a DataConfig names into example dicts."""
        raise NotImplementedError

    def read(self, split: str, data) -> tuple[list[dict], str]:
        """(the examples of ``split``, what the format reader dropped in one line or ""). Tasks whose readers drop
        records (SQuAD, VQA v2) override this and define :meth:`examples` as ``self.read(split, data)[0]``."""
        return self.examples(split, data), ""

    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:  # pragma: no cover
        """The segments after [BOS] and before the target (image tokens, question ...)."""
        raise NotImplementedError

    def target_text(self, example: dict) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def example_id(self, example: dict):  # pragma: no cover - interface
        """The key one prediction is made for (captioning: the image; QA/VQA: the question)."""
        raise NotImplementedError

    def score(self, predictions: dict, examples: list[dict]) -> dict:  # pragma: no cover - interface
        """Generation metrics of ``predictions`` {example_id: text} against the examples' references."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- shared
    def image_segment(self, layout: SequenceLayout) -> Segment:
        return Segment(self.vocab.id("image"), [0] * layout.num_image_tokens, image=True)

    def encode(self, example: dict, tokenizer, layout: SequenceLayout) -> dict:
        """One training example -> lists of length seq_len: input_ids, context_ids, labels, attention_mask,
        image_mask; plus ``truncated`` (bool). Raises :class:`EmptyTargetError` on an empty target and
        :class:`PromptTooLongError` on a prompt that does not fit."""
        target = self.target_text(example) or ""  # a leading space is kept: it is part of the first word's token
        if not target.strip():
            raise EmptyTargetError(f"empty {self.name} target for example {self.example_id(example)}")
        bos, eos, pad = special_ids(tokenizer)
        text = tokenizer(target, add_special_tokens=False)["input_ids"]
        cut = len(text) > layout.max_target_tokens - 1
        tgt = text[: layout.max_target_tokens - 1] + [eos]
        segs, trimmed = self._fit(self.prompt_segments(example, tokenizer, layout), self._prompt_budget(layout))
        segs.append(Segment(self.vocab.id(self.generated_context), tgt))
        out = self._pack(segs, bos, pad, layout.seq_len, loss_from=len(segs) - 1)
        out["truncated"] = cut or trimmed
        return out

    def prompt(self, example: dict, tokenizer, layout: SequenceLayout) -> dict:
        """The generation prompt of one example (unpadded lists): [BOS] + prompt segments."""
        bos, _, pad = special_ids(tokenizer)
        segs, _ = self._fit(self.prompt_segments(example, tokenizer, layout), self._prompt_budget(layout))
        return self._pack(segs, bos, pad, None, loss_from=None)

    @staticmethod
    def _prompt_budget(layout: SequenceLayout) -> int:
        """Prompt tokens after [BOS]: the same in training and generation, so both see the same passage."""
        return layout.seq_len - 1 - layout.max_target_tokens

    def _fit(self, segs: list[Segment], budget: int) -> tuple[list[Segment], bool]:
        """Shorten the ``trim`` segment from its start until the prompt fits ``budget`` tokens."""
        over = sum(len(s.ids) for s in segs) - budget
        if over <= 0:
            return list(segs), False
        trim = [s for s in segs if s.trim]
        if not trim or len(trim[0].ids) < over:
            raise PromptTooLongError(f"{self.name}: the prompt needs {over} more tokens than data.seq_len leaves; "
                                     "raise data.seq_len or lower data.max_target_tokens (or shorten the text)")
        return [Segment(s.context, s.ids[over:], s.image, s.trim) if s is trim[0] else s for s in segs], True

    def _pack(self, segs: list[Segment], bos: int, pad: int, seq_len: int | None, loss_from: int | None) -> dict:
        ids, ctx, labels, image = [bos], [self.vocab.id(self.bos_context)], [IGNORE], [False]
        for k, s in enumerate(segs):
            ids += [pad] * len(s.ids) if s.image else s.ids
            ctx += [s.context] * len(s.ids)
            labels += s.ids if loss_from is not None and k >= loss_from else [IGNORE] * len(s.ids)
            image += [s.image] * len(s.ids)
        n = len(ids)
        n_pad = 0 if seq_len is None else seq_len - n
        return {"input_ids": ids + [pad] * n_pad, "context_ids": ctx + [-1] * n_pad, "labels": labels + [IGNORE] * n_pad,
                "attention_mask": [1] * n + [0] * n_pad, "image_mask": image + [False] * n_pad}


def register_task(cls: type[Task]) -> type[Task]:
    return TASKS.register(cls.name)(cls)


def get_task(name: str) -> Task:
    """An instance of a registered task; an unknown name lists the known ones."""
    return TASKS.get(name)()
