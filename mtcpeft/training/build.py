"""Builders between a :class:`mtcpeft.config.RunConfig` and the objects the trainer runs: they turn config
fields into flat constructor arguments so that no class reads the config itself."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mtcpeft.config import ConfigError, RunConfig, config_to_dict
from mtcpeft.core.contexts import ContextVocab
from mtcpeft.core.model import ContextModel
from mtcpeft.data.dataset import DataReport, EmptySplitError, EncodedDataset, check_images, open_image
from mtcpeft.data.image_ref import RowImage
from mtcpeft.data.packing import EmptyTargetError, PromptTooLongError
from mtcpeft.models.lm import load_lm, load_tokenizer
from mtcpeft.models.projector import Projector
from mtcpeft.models.vision import build_vision_encoder, cached_features, image_transform
from mtcpeft.models.vlm import VisionLanguageModel
from mtcpeft.plugins.manifest import (AdaptorInfo, LayoutInfo, Manifest, ProjectorInfo, VisionInfo, lm_fingerprint,
                                      save_plugin)

SHARED = "shared"  # the one context of a context-agnostic model


def set_residual_dropout(lm: nn.Module, p: float) -> None:
    """Residual dropout as in the paper, for LMs that have one (GPT-2: resid_pdrop; OPT: dropout)."""
    mtype = lm.config.model_type
    if mtype == "gpt2":
        lm.config.resid_pdrop = p
        for name, m in lm.named_modules():
            if isinstance(m, nn.Dropout) and name.endswith(("resid_dropout", "mlp.dropout")):
                m.p = p
    elif mtype == "context_peft_llm":  # the paper's LLM reads it on every forward
        lm.config.residual_dropout = p
    elif mtype == "opt":
        lm.config.dropout = p
        for m in lm.modules():
            if isinstance(getattr(m, "dropout", None), float):
                m.dropout = p
    else:
        raise ConfigError(f"{mtype} models have no residual dropout to set; leave model.residual_dropout "
                          "null")


def build_context_lm(cfg: RunConfig, task, lm: nn.Module | None = None, vocab: ContextVocab | None = None) -> ContextModel:
    """The LM with the configured adaptor injected; with ``train.mode=full`` every LM weight trains instead. ``vocab``
    replaces the task's contexts (a unified plugin's groups); generated tokens then name their context per call."""
    spec = cfg.adaptor
    lm = lm if lm is not None else load_lm(cfg.model.lm)
    if cfg.model.residual_dropout is not None:
        set_residual_dropout(lm, cfg.model.residual_dropout)
    contexts = ContextVocab((SHARED,)) if spec.context_agnostic else task.vocab
    gen = SHARED if spec.context_agnostic else task.generated_context
    if vocab is not None:
        contexts, gen = vocab, None
    model = ContextModel(lm, contexts, spec.build(), spec.targets, generated_context=gen)
    if cfg.train.mode == "full":
        for p in lm.parameters():
            p.requires_grad_(True)
        if hasattr(lm, "freeze_input_embeddings"):  # the paper's LLM keeps its input embeddings frozen
            lm.freeze_input_embeddings()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def context_map(cfg: RunConfig, task) -> torch.Tensor | None:
    """Context-agnostic runs route every live token of the task's contexts to the one shared group."""
    if not cfg.adaptor.context_agnostic:
        return None
    return task.vocab.remap_table(ContextVocab((SHARED,)), {c: SHARED for c in task.contexts})


def build_task_model(cfg: RunConfig, task, lm: nn.Module | None = None, vocab: ContextVocab | None = None,
                     images: bool | None = None):
    """(VisionLanguageModel, tokenizer, SequenceLayout) for ``task``; text-only tasks get no encoder/projector.
    ``vocab`` / ``images`` override the task's contexts and its need for images (a unified multi-task model)."""
    ctx_lm = build_context_lm(cfg, task, lm, vocab)
    encoder = projector = None
    if task.uses_images if images is None else images:
        encoder = build_vision_encoder(cfg.model.vision, cfg.model.vision_pretrained, cfg.model.image_size)
        width = ctx_lm.model.get_input_embeddings().embedding_dim
        projector = Projector(encoder.dim, width, cfg.model.projector, cfg.model.projector_dropout)
    layout = task.layout(cfg.data, encoder)
    model = VisionLanguageModel(ctx_lm, projector, encoder)
    # taken now, while every frozen weight is whole (ZeRO-3 partitions them once the model is prepared)
    model.fingerprints = {"lm": lm_fingerprint(ctx_lm), "vision": encoder.fingerprint() if encoder else None}
    return model, load_tokenizer(cfg.model.lm), layout


def read_split(cfg: RunConfig, task, split: str) -> tuple[list[dict], str]:
    """A split's examples and what the format reader dropped (one line, or ""), after checking the task reads
    ``data.source`` (:meth:`~mtcpeft.data.task.Task.read`); the split's limit applied."""
    limit = {"train": cfg.data.train_limit, "val": cfg.data.val_limit}.get(split)
    examples, note = task.read(split, cfg.data)
    return examples[:limit], note


def read_examples(cfg: RunConfig, task, split: str) -> list[dict]:
    """A split's examples (see :func:`read_split`)."""
    return read_split(cfg, task, split)[0]


def build_datasets(cfg: RunConfig, task, model: VisionLanguageModel, tokenizer, layout, splits=("train", "val"),
                   progress: bool = True, routes: torch.Tensor | None = None) -> dict[str, tuple[EncodedDataset, DataReport]]:
    """Read, check, encode every split; images become cached features (encoder run once) unless training-time
    augmentation needs the pixels. ``routes`` maps the task's context ids to the model's groups (index id + 1;
    default: identity, or the shared group of a context-agnostic model). A dataset's ``examples`` are the ones it
    kept; a split that keeps none raises :class:`EmptySplitError` naming the split, its files and what was dropped."""
    if cfg.data.streaming and "train" in splits:
        raise ConfigError("data.streaming=true: the training split is read as a stream "
                          "(mtcpeft.training.streams.build_train_stream), which this command does not do; set "
                          "data.streaming=false")
    out = {}
    for split in splits:
        examples, note = read_split(cfg, task, split)
        report = DataReport(examples=len(examples), reader=note)
        reasons: dict[str, str] = {}
        bad = check_images([e["image"] for e in examples], cfg.data.on_bad_image, progress, reasons) \
            if task.uses_images else set()
        report.bad_images = sorted(bad)
        report.bad_image_example = next((f"{p}: {reasons[p]}" for p in report.bad_images), "")
        items, keep = [], []
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
            items.append(enc)
            keep.append(e)
        report.kept = len(items)
        if not items:
            raise EmptySplitError(f"the {task.name} {split} split has no usable examples: {report.why_empty()}; "
                                  f"data: {cfg.data.describe(split)}; fix the data or point data.* at other files")
        image_fn = image_input(cfg, model, keep, split, progress) if task.uses_images else None
        out[split] = (EncodedDataset(items, image_fn, routes if routes is not None else context_map(cfg, task), keep),
                      report)
    return out


def image_input(cfg: RunConfig, model: VisionLanguageModel, examples: list[dict], split: str, progress: bool = True,
                cache_name: str | None = None):
    """index -> {"image_features"} from a feature cache (encoder run once), or {"pixel_values"} when training-time
    augmentation needs the pixels."""
    augment = cfg.data.augment and split == "train"
    paths = [e["image"] for e in examples]
    if cfg.data.cache_features and not augment:
        name = cache_name or (split if cfg.task == "caption" else f"{cfg.task}_{split}")
        cache = Path(cfg.output_dir) / "features" / f"{name}.safetensors"  # reused on resume
        images = {p: p.load if isinstance(p, RowImage) else p for p in sorted(set(paths))}  # rows: read lazily
        feats = cached_features(cache, model.encoder, images, progress=progress)
        return lambda i: {"image_features": feats[paths[i]].float()}
    transform = image_transform(model.encoder, train=split == "train", augment=augment)
    return lambda i: {"pixel_values": transform(open_image(paths[i]))}


# ------------------------------------------------------------------------------------------------ plugins
def task_plugin(model: VisionLanguageModel, cfg: RunConfig, task, out_dir: str | Path,
                state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adaptor + projector (or the whole LM with ``train.mode=full``) with a manifest that can rebuild the
    model."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = state if state is not None else dict(model.named_parameters())
    tensors = {n: t for n, t in state.items() if n in trainable}
    ctx_lm = model.lm
    fingerprints = getattr(model, "fingerprints", None) or {
        "lm": lm_fingerprint(ctx_lm), "vision": model.encoder.fingerprint() if model.encoder is not None else None}
    manifest = Manifest(
        task=task.name,
        contexts=list(ctx_lm.vocab.names),
        task_contexts=list(task.contexts),
        generated_context=task.generated_context if not cfg.adaptor.context_agnostic else SHARED,
        adaptor=AdaptorInfo.of(ctx_lm.adaptor, full_finetune=cfg.train.mode == "full"),
        placement=cfg.adaptor.targets,
        targets=ctx_lm.target_names,
        base_lm=cfg.model.lm,
        base_lm_fingerprint=fingerprints["lm"],
        layout=LayoutInfo(cfg.data.seq_len, cfg.data.max_target_tokens),
        data=config_to_dict(cfg.data),  # what it was trained on: launch/evaluate.py evaluates on it by default
    )
    if model.encoder is not None:
        manifest.vision = VisionInfo(cfg.model.vision, cfg.model.vision_pretrained, model.encoder.image_size,
                                     fingerprints["vision"])
        manifest.projector = ProjectorInfo(cfg.model.projector, model.encoder.dim,
                                           ctx_lm.model.get_input_embeddings().embedding_dim)
    return save_plugin(out_dir, manifest, tensors)
