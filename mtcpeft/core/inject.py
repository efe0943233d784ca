"""Inject context adaptors into an unmodified model: wrap target projections in place, freeze the rest.

Targets come from per-architecture presets — ``"A"`` attention (q, k, v, o), ``"F"`` feed-forward
(up/gate/down), ``"AF"`` both — or from explicit module-name patterns. IA3 reads its own placement table
(keys and values scaled at their projection's output, the FFN intermediate at the down projection's input).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from mtcpeft.errors import MtcpeftError
from .adaptors.base import AdaptorConfig, ContextLayer, projection_dims
from .contexts import Router


@dataclass(frozen=True)
class IA3Target:
    """An IA3 placement: module-name suffix, "out"/"in", and which equal parts of the width it scales."""

    suffix: str
    role: str
    parts: tuple[int, int] | None = None  # (first, n): scale parts first..n-1 of n equal parts (fused qkv)


@dataclass(frozen=True)
class Preset:
    attention: tuple[str, ...]
    feedforward: tuple[str, ...]
    ia3_attention: tuple[IA3Target, ...]
    ia3_feedforward: tuple[IA3Target, ...]


_LLAMA = Preset(
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    feedforward=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ia3_attention=(IA3Target("self_attn.k_proj", "out"), IA3Target("self_attn.v_proj", "out")),
    ia3_feedforward=(IA3Target("mlp.down_proj", "in"),),
)

PRESETS: dict[str, Preset] = {
    # SmolLM2 is a llama; Qwen2, Mistral and Gemma share llama's module names
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "gemma": _LLAMA,
    "gpt2": Preset(  # Conv1D projections; c_attn is fused q|k|v (IA3 scales only its k and v thirds)
        attention=("attn.c_attn", "attn.c_proj"),
        feedforward=("mlp.c_fc", "mlp.c_proj"),
        ia3_attention=(IA3Target("attn.c_attn", "out", (1, 3)),),
        ia3_feedforward=(IA3Target("mlp.c_proj", "in"),),
    ),
    "opt": Preset(
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        feedforward=("fc1", "fc2"),
        ia3_attention=(IA3Target("self_attn.k_proj", "out"), IA3Target("self_attn.v_proj", "out")),
        ia3_feedforward=(IA3Target("fc2", "in"),),
    ),
    # the Context-PEFT paper's LLM (mtcpeft/models/paper_llm.py, MODEL_TYPE): SwiGLU with ONE fused gate|up
    # projection mlp.up_proj (768 -> 6144), so "F" is up_proj + down_proj; IA3 scales the FFN intermediate at
    # down_proj's input (after silu(gate) * up)
    "context_peft_llm": Preset(
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        feedforward=("mlp.up_proj", "mlp.down_proj"),
        ia3_attention=(IA3Target("self_attn.k_proj", "out"), IA3Target("self_attn.v_proj", "out")),
        ia3_feedforward=(IA3Target("mlp.down_proj", "in"),),
    ),
}
PLACEMENTS = ("A", "F", "AF")


class TargetError(MtcpeftError, ValueError):
    """The requested targets do not match the model; the message lists candidate module names."""


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def projection_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_projection(m) and not isinstance(m, ContextLayer)]


def _candidates(model: nn.Module) -> str:
    """Distinct projection names with layer numbers folded (``layers.*.self_attn.q_proj``)."""
    seen = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in projection_names(model))
    return ", ".join(list(seen)[:24]) or "(no nn.Linear / Conv1D modules at all)"


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(
    model: nn.Module, config: AdaptorConfig, targets: str | Sequence[str]
) -> list[tuple[str, str, tuple[int, int] | None]]:
    """[(module name, role, parts)] to wrap. ``targets``: a placement ("A", "F", "AF") or name patterns.

    A pattern is a module-name suffix (``q_proj``, ``attn.c_attn``) or ``re:<regex>`` matched against the full
    name; for a kind placed on activations (IA3) a pattern may end in ``:in`` to act on the projection's input
    instead of its output.
    """
    names = projection_names(model)
    if isinstance(targets, str) and targets.upper() in PLACEMENTS:
        placement = targets.upper()
        mtype = model_type(model)
        preset = PRESETS.get(mtype)
        if preset is None:
            raise TargetError(
                f"no target preset for model type {mtype!r} (presets: {sorted(PRESETS)}); pass explicit module-name "
                f"patterns instead, e.g. targets=['q_proj', 'v_proj']. Candidate modules: {_candidates(model)}"
            )
        if config.placement == "activations":
            wanted = (preset.ia3_attention if "A" in placement else ()) + (
                preset.ia3_feedforward if "F" in placement else ()
            )
        else:
            wanted = tuple(
                IA3Target(s, "proj")
                for s in (preset.attention if "A" in placement else ()) + (preset.feedforward if "F" in placement else ())
            )
        out = [(n, t.role, t.parts) for t in wanted for n in names if _matches(n, t.suffix)]
        missing = [t.suffix for t in wanted if not any(_matches(n, t.suffix) for n in names)]
        if missing:
            raise TargetError(
                f"the {mtype!r} preset expects modules {missing} that this model does not have; pass explicit "
                f"patterns instead. Candidate modules: {_candidates(model)}"
            )
        return sorted(out, key=lambda t: names.index(t[0]))
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: dict[str, tuple[str, str, None]] = {}
    for pattern in targets:
        role = "proj"
        if config.placement == "activations":
            role = "out"
            for r in ("in", "out"):
                if pattern.endswith(":" + r):
                    pattern, role = pattern[: -len(r) - 1], r
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise TargetError(
                f"target {pattern!r} matches no projection module (placements are {PLACEMENTS}); "
                f"candidates: {_candidates(model)}"
            )
        for n in hits:
            out[n] = (n, role, None)
    return sorted(out.values(), key=lambda t: names.index(t[0]))


def inject(model: nn.Module, config: AdaptorConfig, router: Router, targets: str | Sequence[str] = "AF") -> list[str]:
    """Freeze every parameter of ``model``, then wrap the targets with ``config``'s layers (each member kind of a mixed
    config at its own placement). Returns the names of the context layers, in model order."""
    if any(isinstance(m, ContextLayer) for m in model.modules()):
        raise TargetError("this model already holds context adaptors; inject into a fresh copy of the base model")
    for p in model.parameters():
        p.requires_grad_(False)
    members = [m for m in config.members() if m.layer_cls is not None]
    if not members:  # the "none" adaptor
        return []
    names = projection_names(model)
    placed: dict[str, list[tuple[AdaptorConfig, str, dict]]] = {}  # module -> what acts on it (one per kind)
    for member in members:
        for name, role, parts in resolve_targets(model, member, config.member_targets(member, targets)):
            kwargs = {}
            if parts is not None:
                d_in, d_out = projection_dims(model.get_submodule(name))
                width = d_out if role == "out" else d_in
                first, n = parts
                kwargs["feature_slice"] = (width * first // n, width)
            placed.setdefault(name, []).append((member, role, kwargs))
    adapted = []
    for name in sorted(placed, key=names.index):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module, layers = config.wrap(getattr(parent, attr), router, name, placed[name])
        setattr(parent, attr, module)
        adapted += layers
    return adapted
