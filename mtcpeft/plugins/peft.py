"""PEFT interop: one context group of a LoRA plugin <-> a Hugging Face PEFT LoRA adapter folder.

A PEFT adapter folder (``PeftModel.save_pretrained``, peft >= 0.7) holds ``adapter_config.json`` (``peft_type``
"LORA", ``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``fan_in_fan_out``, ...) and
``adapter_model.safetensors`` with, per adapted module ``<m>`` of the base LM,
``base_model.model.<m>.lora_A.weight`` (r, d_in) and ``base_model.model.<m>.lora_B.weight`` (d_out, r); the update
is ``(lora_alpha / r) * x A^T B^T`` (Hu et al., 2021, arXiv 2106.09685), as ours with ``B = lora_B.weight^T``.

Ours: ``<prefix><m>.lora_A`` (C, r, d_in) and ``<prefix><m>.lora_B`` (C, r, d_out), stacked over contexts; a
plugin's prefix is ``lm.model.`` (the VisionLanguageModel's name of the LM), a ContextModel's own
``adaptor_state_dict()`` has prefix "". So context ``c`` exports as ``A[c]`` and ``B[c]^T``.

GPT-2's Conv1D projections store their weight (d_in, d_out); PEFT adapts them with ``fan_in_fan_out=True``,
which only changes how PEFT merges into the base weight, not the LoRA factors: exported as such.

Only LoRA is exchanged: BitFit has no PEFT counterpart, and Context-IA3 on a fused projection scales a slice
PEFT cannot express. Imports refuse PEFT features that are not a plain LoRA update (DoRA, trained biases,
modules_to_save, embedding or convolution targets, ...). Per-module ranks (``rank_pattern``), alphas
(``alpha_pattern``) and rsLoRA scaling are imported exactly: scales are folded into B and ranks zero-padded to
the largest (alpha = rank, scale 1).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mtcpeft.core.adaptors.base import projection_dims
from mtcpeft.io import save_tensors, write_json
from .manifest import (DEFAULT_PREFIX, AdaptorInfo, Manifest, PluginError, atomic_dir, load_plugin, lm_fingerprint,
                       save_plugin)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change what the adapter computes beyond a plain LoRA update
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication",
                "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                "kasa_config", "monteclora_config", "velora_config")


class InteropError(PluginError):
    """A plugin or PEFT adapter cannot be converted; the message names the feature and what to do."""


# ------------------------------------------------------------------------------------------------ export
def _lora_source(source, prefix: str | None):
    """(contexts, adaptor, targets, base_lm, tensors, prefix, conv1d module names or None) of a ContextModel, a
    plugin dir or (manifest, tensors)."""
    from mtcpeft.core.model import ContextModel

    if isinstance(source, ContextModel):
        conv1d = {n for n, layer in source.context_layers() if type(layer.base_layer).__name__ == "Conv1D"}
        return (list(source.vocab.names), AdaptorInfo.of(source.adaptor), list(source.target_names),
                getattr(source.model.config, "name_or_path", "") or "", source.adaptor_state_dict(),
                "" if prefix is None else prefix, conv1d)
    if isinstance(source, (str, os.PathLike)):
        source = load_plugin(source)
    m, tensors = source
    return m.contexts, m.adaptor, m.targets, m.base_lm, tensors, m.prefix if prefix is None else prefix, None


def _gpt2_conv1d(targets: list[str]) -> set[str]:
    """Without the model at hand: GPT-2's preset projections are Conv1D (fan_in_fan_out in PEFT's terms)."""
    from mtcpeft.core.inject import PRESETS

    gpt2 = PRESETS["gpt2"]
    suffixes = gpt2.attention + gpt2.feedforward
    return {t for t in targets if t.startswith("transformer.h.") and t.endswith(suffixes)}


def export_peft(source, context: str | int, out_dir: str | os.PathLike, *, prefix: str | None = None,
                base_model_name_or_path: str | None = None) -> Path:
    """Write context ``context`` of a LoRA ContextModel / plugin directory / (manifest, tensors) as a PEFT LoRA
    adapter folder that ``peft.PeftModel.from_pretrained(base_lm, out_dir)`` loads.

    ``prefix``: how adaptor tensor names start (default: "" for a ContextModel, the manifest's for a plugin).
    """
    contexts, adaptor, targets, base_lm, tensors, prefix, conv1d = _lora_source(source, prefix)
    if adaptor.kind != "lora" or adaptor.full_finetune:
        raise InteropError(f"only LoRA adaptors export to PEFT; this one is {adaptor.kind!r}"
                           f"{' (full fine-tuning)' if adaptor.full_finetune else ''}")
    if isinstance(context, int):
        if not 0 <= context < len(contexts):
            raise InteropError(f"context id {context} is outside [0, {len(contexts)}) for contexts {contexts}")
        c = context
    elif context in contexts:
        c = contexts.index(context)
    else:
        raise InteropError(f"unknown context {context!r}; this adaptor's contexts are {contexts}")
    conv1d = conv1d if conv1d is not None else _gpt2_conv1d(targets)
    if conv1d and conv1d != set(targets):  # PEFT's fan_in_fan_out is one flag for the whole adapter
        raise InteropError(f"targets mix Conv1D ({sorted(conv1d)[:2]}) and Linear projections; PEFT's single "
                           "fan_in_fan_out flag cannot describe both: export each kind separately")
    weights = {}
    for t in targets:
        try:
            A, B = tensors[f"{prefix}{t}.lora_A"], tensors[f"{prefix}{t}.lora_B"]
        except KeyError as e:
            raise InteropError(f"missing tensor {e.args[0]!r} for target {t!r} (is the prefix {prefix!r} right?)") \
                from None
        weights[f"{PEFT_PREFIX}{t}.lora_A.weight"] = A[c].detach().clone()  # (r, d_in)
        weights[f"{PEFT_PREFIX}{t}.lora_B.weight"] = B[c].detach().t().contiguous()  # (d_out, r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or base_lm or None,
        "r": adaptor.options["rank"],
        "lora_alpha": adaptor.options["alpha"],
        "lora_dropout": adaptor.options.get("dropout", 0.0),
        "target_modules": targets,  # full module names: PEFT matches a name equal to a target exactly
        "fan_in_fan_out": bool(conv1d),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "revision": None,
    }
    with atomic_dir(out_dir) as tmp:
        save_tensors(weights, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        write_json(config, tmp / PEFT_CONFIG)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------ import
def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex matches the end of the name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_config(peft_dir: str | os.PathLike) -> dict:
    d = Path(peft_dir)
    if not (d / PEFT_CONFIG).is_file() or not (d / PEFT_WEIGHTS).is_file():
        raise InteropError(f"{d} is not a PEFT adapter folder: it needs {PEFT_CONFIG} and {PEFT_WEIGHTS} "
                           "(PeftModel.save_pretrained with safe_serialization=True)")
    try:
        config = json.loads((d / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{d / PEFT_CONFIG} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise InteropError(f"{d} is a {config.get('peft_type')!r} adapter; only PEFT LoRA adapters import")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise InteropError(f"{d} uses PEFT features that are not a plain LoRA update: {used}; a context group "
                           "can only hold A and B")
    return config


def import_peft(peft_dir: str | os.PathLike, context: str = "default", *, task: str = "peft",
                prefix: str = DEFAULT_PREFIX, lm: nn.Module | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter as a one-context LoRA group of ``task``: (manifest, tensors).

    tensors: ``<prefix><m>.lora_A`` (1, R, d_in) and ``<prefix><m>.lora_B`` (1, R, d_out). The manifest's
    ``contexts`` are [context]; given the base ``lm`` (a causal LM), targets are in model order, widths are checked
    against it and ``base_lm_fingerprint`` is its fingerprint (else empty).
    """
    d = Path(peft_dir)
    config = read_peft_config(d)
    weights = load_file(str(d / PEFT_WEIGHTS))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None or value.dim() != 2:
            raise InteropError(f"{d}: tensor {key!r} {list(value.shape)} is not a linear LoRA factor "
                               "(embedding, convolution and DoRA adapters do not import)")
        factors.setdefault(m.group(1), {})[m.group(2)] = value
    if not factors:
        raise InteropError(f"{d}: {PEFT_WEIGHTS} holds no LoRA factors")
    half = sorted(m for m, f in factors.items() if len(f) != 2)
    if half:
        raise InteropError(f"{d}: module {half[0]!r} has only one of lora_A / lora_B")
    a0 = config.get("lora_alpha", config["r"])
    rs = config.get("use_rslora", False)
    scales, ranks = {}, {}
    for mod, f in factors.items():
        r = f["lora_A"].shape[0]  # rank_pattern already shaped the tensors
        if f["lora_B"].shape[1] != r:
            raise InteropError(f"{d}: {mod} has lora_A {list(f['lora_A'].shape)} and lora_B "
                               f"{list(f['lora_B'].shape)}: their ranks differ")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, mod, a0)
        ranks[mod], scales[mod] = r, alpha / (math.sqrt(r) if rs else r)
    rank = max(ranks.values())
    # one rank and one scale: kept as they are (alpha = scale * rank); otherwise scales fold into B (alpha = rank)
    fold = len(set(ranks.values())) > 1 or len(set(scales.values())) > 1
    alpha = float(rank) if fold else next(iter(scales.values())) * rank
    targets = _order(list(factors), lm)
    tensors = {}
    for mod in targets:
        A, B = factors[mod]["lora_A"], factors[mod]["lora_B"].t()  # (r, d_in), (r, d_out)
        if fold:
            B = B * scales[mod]
        pad = rank - A.shape[0]
        tensors[f"{prefix}{mod}.lora_A"] = nn.functional.pad(A, (0, 0, 0, pad)).unsqueeze(0).contiguous()
        tensors[f"{prefix}{mod}.lora_B"] = nn.functional.pad(B, (0, 0, 0, pad)).unsqueeze(0).contiguous()
    if lm is not None:
        _check_widths(lm, tensors, prefix, d)
    manifest = Manifest(
        task=task,
        contexts=[context],
        task_contexts=[context],
        adaptor=AdaptorInfo("lora", {"rank": rank, "alpha": alpha, "dropout": float(config.get("lora_dropout", 0.0))}),
        placement=",".join(targets),
        targets=targets,
        base_lm=config.get("base_model_name_or_path") or "",
        base_lm_fingerprint=lm_fingerprint(lm) if lm is not None else "",
        adaptor_prefix=prefix if prefix != DEFAULT_PREFIX else None,
    )
    return manifest, tensors


def _order(modules: list[str], lm: nn.Module | None) -> list[str]:
    """Model order when the LM is at hand; otherwise a natural sort (layer numbers compared as numbers)."""
    if lm is not None:
        names = [n for n, _ in lm.named_modules()]
        absent = sorted(set(modules) - set(names))
        if absent:
            raise InteropError(f"the adapter targets {absent[:3]} which this base LM does not have; is it the "
                               "adapter of another model?")
        rank = {n: i for i, n in enumerate(names)}
        return sorted(modules, key=rank.__getitem__)
    return sorted(modules, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def _check_widths(lm: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, where) -> None:
    for key, t in tensors.items():
        mod, _, param = key[len(prefix):].rpartition(".")
        module = lm.get_submodule(mod)
        base = getattr(module, "base_layer", module)  # already wrapped by a ContextLayer
        d_in, d_out = projection_dims(base)
        want = d_in if param == "lora_A" else d_out
        if t.shape[-1] != want:
            raise InteropError(f"{where}: {mod} {param} has width {t.shape[-1]} but the base LM's projection has "
                               f"{want}; is it the adapter of another model?")


def peft_plugin(peft_dir: str | os.PathLike, out_dir: str | os.PathLike, lm: nn.Module, task: str,
                context: str = "default", generated_context: str | None = None) -> Path:
    """Save a PEFT LoRA adapter as a one-context plugin of ``task`` (mergeable like any task plugin)."""
    manifest, tensors = import_peft(peft_dir, context, task=task, lm=lm)
    manifest.generated_context = generated_context
    return save_plugin(out_dir, manifest, tensors)
