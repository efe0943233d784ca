"""ContextModel: a frozen causal LM with per-context adaptors, driven by per-token ``context_ids``.

``forward(input_ids, context_ids, ...)`` and ``generate(input_ids, context_ids, generated_context=...)`` keep
Hugging Face semantics (labels -> loss, attention_mask, KV cache, beam search). The routing plan is built once
per forward and shared by every adapted layer (see :mod:`mtcpeft.contexts`).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .adaptors import AdaptorConfig, ContextLayer, adaptor_config
from .contexts import ContextIdsError, ContextVocab, Router, check_context_ids
from .inject import inject
from .io import save_tensors


class AdaptorStateError(ValueError):
    """An adaptor state does not fit this model (names, shapes, contexts or kind differ)."""


class ContextModel(nn.Module):
    """Wraps an unmodified causal LM; adaptors are injected in place and everything else is frozen.

    Args:
        model: a Hugging Face causal LM (or any module whose projections a preset or pattern names).
        contexts: the context vocabulary, e.g. ``"image,text"``; one name = context-agnostic PEFT.
        adaptor: an :class:`AdaptorConfig` or a registered kind name ("lora", "bitfit", "ia3", "none").
        targets: "A", "F", "AF" or module-name patterns (see :func:`mtcpeft.inject.resolve_targets`).
        generated_context: the context of tokens produced by :meth:`generate` unless the call names one.
    """

    def __init__(
        self,
        model: nn.Module,
        contexts: ContextVocab | str | Iterable[str],
        adaptor: AdaptorConfig | str = "lora",
        targets: str | list[str] = "AF",
        generated_context: str | int | None = None,
    ):
        super().__init__()
        self.model = model
        self.vocab = contexts if isinstance(contexts, ContextVocab) else ContextVocab.of(contexts)
        self.adaptor = adaptor_config(adaptor) if isinstance(adaptor, str) else adaptor
        self.router = Router(len(self.vocab))
        self.target_names = inject(model, self.adaptor, self.router, targets)
        self.generated_context = None if generated_context is None else self.vocab.id(generated_context)
        self._generation: tuple[torch.Tensor, int] | None = None
        model.register_forward_pre_hook(self._route_generation_step, with_kwargs=True)

    # ----------------------------------------------------------------------------------------------- routing
    def _context_ids(self, context_ids: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
        if context_ids is None:
            if len(self.vocab) == 1:  # context-agnostic: every token takes the one group
                return torch.zeros(shape, dtype=torch.long, device=device)
            raise ContextIdsError(
                f"context_ids is required: this model has contexts {list(self.vocab.names)}; pass one id per token"
            )
        check_context_ids(context_ids, len(self.vocab), shape)
        return context_ids

    @staticmethod
    def _token_shape(input_ids, inputs_embeds) -> tuple[torch.Size, torch.device]:
        if input_ids is not None:
            return input_ids.shape, input_ids.device
        if inputs_embeds is not None:
            return inputs_embeds.shape[:-1], inputs_embeds.device
        raise ValueError("pass input_ids or inputs_embeds")

    @contextmanager
    def routing(self, context_ids: torch.Tensor) -> Iterator[None]:
        """Route calls made directly on ``self.model`` inside the block (advanced use)."""
        self.router.route(context_ids)
        try:
            yield
        finally:
            self.router.clear()

    def forward(self, input_ids=None, context_ids=None, inputs_embeds=None, **kwargs):
        """Hugging Face forward plus ``context_ids`` (B, S) long: ids of ``self.vocab``, -1 = no adaptor."""
        shape, device = self._token_shape(input_ids, inputs_embeds)
        self.router.route(self._context_ids(context_ids, shape, device))
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, context_ids=None, generated_context: str | int | None = None, **kwargs):
        """``model.generate`` where prompt tokens take ``context_ids`` and new tokens ``generated_context``.

        Works with and without the KV cache and with beam search (prompt contexts follow the beam expansion).
        """
        gen = generated_context if generated_context is not None else self.generated_context
        if gen is None:
            raise ContextIdsError(
                "generate needs the context of generated tokens: pass generated_context='<name>' or build the "
                f"ContextModel with generated_context=...; contexts are {list(self.vocab.names)}"
            )
        shape, device = self._token_shape(input_ids, kwargs.get("inputs_embeds"))
        prompt = self._context_ids(context_ids, shape, device).long()
        self._generation = (prompt, self.vocab.id(gen))
        try:
            return self.model.generate(input_ids=input_ids, **kwargs)
        finally:
            self._generation = None
            self.router.clear()

    def _route_generation_step(self, module, args, kwargs):
        """Pre-forward hook on the LM: during generate, route the tokens of this step by their positions."""
        if self._generation is None:
            return None
        prompt, gen = self._generation
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, seq = tokens.shape[:2]
        pos = kwargs.get("cache_position")
        if pos is None:
            past = kwargs.get("past_key_values")
            start = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
            pos = torch.arange(start, start + seq, device=prompt.device)
        if batch != prompt.shape[0]:  # beam search / num_return_sequences expand the batch
            prompt = prompt.repeat_interleave(batch // prompt.shape[0], dim=0)
        ctx = torch.full((batch, seq), gen, dtype=torch.long, device=prompt.device)
        in_prompt = pos < prompt.shape[1]
        ctx[:, in_prompt] = prompt[:, pos[in_prompt]]
        self.router.route(ctx)
        return None

    # ------------------------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Non-reentrant checkpointing by default: recomputed layers read the same (kept) routing plan."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # the transformers >= 5 name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def context_layers(self) -> Iterator[tuple[str, ContextLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ContextLayer):
                yield name, module

    def num_adaptor_parameters(self) -> int:
        return sum(t.numel() for t in self.adaptor_state_dict().values())

    # ------------------------------------------------------------------------------------- adaptor state
    def adaptor_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.<param>": tensor}`` of every per-context tensor, each stacked over contexts (C, ...)."""
        return {
            f"{name}.{p}": getattr(layer, p) for name, layer in self.context_layers() for p in layer.adaptor_param_names
        }

    def load_adaptor_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the adaptors after checking that every name and shape matches."""
        own = self.adaptor_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdaptorStateError(
                f"adaptor state does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (same adaptor kind and targets?)"
            )
        bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
        if bad:
            k, got, want = bad[0]
            raise AdaptorStateError(f"{k} has shape {got} but this model needs {want} (contexts, rank and widths)")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def metadata(self) -> dict[str, str]:
        return {
            "contexts": json.dumps(list(self.vocab.names)),
            "adaptor": json.dumps(self.adaptor.to_dict()),
            "targets": json.dumps(self.target_names),
        }

    def save_adaptor(self, path: str) -> None:
        """Write the adaptor tensors as safetensors (atomically), with contexts and config as metadata."""
        save_tensors(self.adaptor_state_dict(), path, metadata=self.metadata())

    def load_adaptor(self, path: str) -> None:
        """Load a file written by :meth:`save_adaptor`, refusing one made for other contexts or another kind."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        for key, ours in self.metadata().items():
            if key in meta and key != "targets" and json.loads(meta[key]) != json.loads(ours):
                raise AdaptorStateError(f"{path} was saved with {key}={meta[key]} but this model has {ours}")
        self.load_adaptor_state_dict(state)


