"""ContextModel: a frozen causal LM with per-context adaptors, driven by per-token ``context_ids``.

``forward(input_ids, context_ids, ...)`` and ``generate(input_ids, context_ids, generated_context=...)`` keep
Hugging Face semantics (labels -> loss, attention_mask, KV cache, beam search). The routing plan is built once
per forward and shared by every adapted layer (see :mod:`mtcpeft.core.contexts`).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from torch import nn

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import save_tensors
from .adaptors import AdaptorConfig, ContextLayer, adaptor_config
from .contexts import ContextIdsError, ContextVocab, Router, check_context_ids
from .inject import inject


class AdaptorStateError(MtcpeftError, ValueError):
    """An adaptor state does not fit this model (names, shapes, contexts or kind differ)."""


# generate() options under which a step may feed tokens that are later taken back (assisted decoding)
_SPECULATIVE = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class GenerationRouting:
    """Where the tokens of each forward of one ``generate`` call sit, kept by mtcpeft itself.

    Every step of decoding appends one token to each row. With the KV cache a step feeds only the positions the
    cache does not hold yet, so they continue from a counter of positions fed so far; without the cache every step
    feeds the whole sequence from position 0. Nothing is read from transformers' keyword arguments for the cache,
    whose names change between releases. As a cross-check, a 2-D ``attention_mask`` (a public input every version
    passes, one column per position so far) must end where the step ends; if not, generation stops with an error
    instead of routing tokens to the wrong contexts.

    prompt: (B, P) context ids of the prompt (-1 for padding); generated: the context id of new tokens, one for
    every row or (B,) one per row (a mixed-task batch: each row generates in its own task's context).
    """

    def __init__(self, prompt: torch.Tensor, generated: int | torch.Tensor, cached: bool):
        self.prompt, self.cached = prompt, cached
        self.generated = torch.as_tensor(generated, dtype=torch.long, device=prompt.device).reshape(-1, 1)
        if self.generated.shape[0] not in (1, prompt.shape[0]):
            raise ContextIdsError(f"{self.generated.shape[0]} generated contexts for {prompt.shape[0]} prompts: "
                                  "give one, or one per row")
        self.fed = 0  # positions already in the cache

    def step(self, batch: int, seq: int, attention_mask=None) -> torch.Tensor:
        """(batch, seq) context ids of the tokens of this forward."""
        start = self.fed if self.cached else 0
        end = start + seq
        if self.cached:
            self.fed = end
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] != end:
            raise ContextIdsError(
                f"generation step feeds {seq} tokens that mtcpeft places at positions {start}..{end - 1} "
                f"({'with' if self.cached else 'without'} KV cache), but the attention mask covers "
                f"{attention_mask.shape[1]} positions: this transformers version decodes in a way ContextModel "
                "cannot route; pass use_cache explicitly or use a transformers version listed in pyproject.toml"
            )
        prompt, gen = self.prompt, self.generated
        if batch != prompt.shape[0]:  # beam search / num_return_sequences repeat each row
            if batch % prompt.shape[0]:
                raise ContextIdsError(f"generation step has {batch} rows for a prompt of {prompt.shape[0]}")
            rep = batch // prompt.shape[0]
            prompt = prompt.repeat_interleave(rep, dim=0)
            gen = gen.repeat_interleave(rep, dim=0) if gen.shape[0] > 1 else gen
        pos = torch.arange(start, end, device=prompt.device)
        ctx = gen.expand(batch, seq).clone()
        in_prompt = pos < prompt.shape[1]
        ctx[:, in_prompt] = prompt[:, pos[in_prompt]]
        return ctx


class ContextModel(nn.Module):
    """Wraps an unmodified causal LM; adaptors are injected in place and everything else is frozen.

    Args:
        model: a Hugging Face causal LM (or any module whose projections a preset or pattern names).
        contexts: the context vocabulary, e.g. ``"image,text"``; one name = context-agnostic PEFT.
        adaptor: an :class:`AdaptorConfig` or a registered kind name ("lora", "bitfit", "ia3", "none").
        targets: "A", "F", "AF" or module-name patterns (see :func:`mtcpeft.core.inject.resolve_targets`).
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
        self._generation: GenerationRouting | None = None
        model.register_forward_pre_hook(self._route_generation_step, with_kwargs=True)
        model.register_forward_hook(self._end_generation_step, with_kwargs=True, always_call=True)

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
        """Route calls made directly on ``self.model`` inside the block (advanced use); no routing outside it."""
        with self.router.active(self.router.build(context_ids)):
            yield

    def forward(self, input_ids=None, context_ids=None, inputs_embeds=None, **kwargs):
        """Hugging Face forward plus ``context_ids`` (B, S) long: ids of ``self.vocab``, -1 = no adaptor.

        The routing plan lives exactly as long as this call (and is carried to its recomputation under activation
        checkpointing by :meth:`gradient_checkpointing_enable`)."""
        shape, device = self._token_shape(input_ids, inputs_embeds)
        with self.router.active(self.router.build(self._context_ids(context_ids, shape, device))):
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, context_ids=None,
                 generated_context: str | int | Sequence[str | int] | None = None, **kwargs):
        """``model.generate`` where prompt tokens take ``context_ids`` and new tokens ``generated_context``: one
        context for every row, or a list with one per row (rows of different tasks in one batch).

        Right for greedy, sampling, beam search and ``num_return_sequences``, with left padding, with and without
        the KV cache: each step's tokens are placed by :class:`GenerationRouting`, state kept here for this call.
        """
        gen = generated_context if generated_context is not None else self.generated_context
        if gen is None:
            raise ContextIdsError(
                "generate needs the context of generated tokens: pass generated_context='<name>' or build the "
                f"ContextModel with generated_context=...; contexts are {list(self.vocab.names)}"
            )
        unsupported = sorted(k for k in _SPECULATIVE if kwargs.get(k) is not None)
        if unsupported:
            raise ValueError(f"generate with {unsupported} (speculative decoding) is not supported by ContextModel: "
                             "it rewinds steps, so tokens could not be routed to their contexts; drop the option")
        shape, device = self._token_shape(input_ids, kwargs.get("inputs_embeds"))
        prompt = self._context_ids(context_ids, shape, device).long()
        config = kwargs.get("generation_config") or self.model.generation_config
        cached = kwargs.get("use_cache", getattr(config, "use_cache", True))
        gen_ids = self.vocab.id(gen) if isinstance(gen, (str, int)) else self.vocab.ids(list(gen))
        self._generation = GenerationRouting(prompt, gen_ids, cached=bool(cached))
        try:
            return self.model.generate(input_ids=input_ids, **kwargs)
        finally:
            self._generation = None
            self.router.clear()

    def _route_generation_step(self, module, args, kwargs):
        """Pre-forward hook on the LM: during generate, route the tokens of this step (ends with the step)."""
        if self._generation is None:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        ctx = self._generation.step(tokens.shape[0], tokens.shape[1], kwargs.get("attention_mask"))
        self.router.plan = self.router.build(ctx)
        return None

    def _end_generation_step(self, module, args, kwargs, output):
        if self._generation is not None:
            self.router.clear()  # no plan outlives its step
        return None

    # ------------------------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Non-reentrant activation checkpointing whose recomputation re-installs the routing plan of the forward
        it recomputes (captured by the checkpoint's ``context_fn``), whatever forwards ran in between."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"] or "context_fn" in kwargs:
            raise ValueError("ContextModel checkpoints with use_reentrant=False and its own context_fn (it carries "
                             "each forward's routing plan to the recomputation); drop use_reentrant/context_fn")
        kwargs["context_fn"] = self.router.checkpoint_context
        if hasattr(self.model, "activation_checkpointing_enable"):  # the transformers >= 5.x name
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


