"""The Context-PEFT paper's own LLM, as a Hugging Face causal LM built from its configuration (no weights exist).

Context-PEFT (Hadji-Kyriacou & Arandjelović, 2023, arXiv 2312.08900) fine-tunes a 12-layer decoder-only LLM of
width 768 that it pre-trained itself and never released. This file rebuilds that architecture so that parameter
counts and behaviour can be studied; it is registered with ``AutoConfig`` / ``AutoModelForCausalLM`` under
:data:`MODEL_TYPE` when this module is imported.

Architecture (defaults of :class:`PaperLLMConfig`):

* 12 pre-norm decoder layers, width 768, 12 attention heads of 64 with rotary position embeddings (RoPE, Su et
  al., 2021, arXiv 2104.09864); the base frequency is ``rope_theta`` (default 10,000);
* SwiGLU feed-forward (Shazeer, 2020, arXiv 2002.05202) whose gate and up projections are ONE fused Linear
  ``mlp.up_proj`` 768 -> 6144, split into ``[gate | up]`` halves of 3072, then ``silu(gate) * up`` and
  ``mlp.down_proj`` 3072 -> 768; no biases;
* RMS norm (Zhang & Sennrich, 2019, arXiv 1910.07467) before attention, before the feed-forward and at the end;
* the OPT-125m vocabulary (50,272 tokens, OPT's pad/bos/eos ids 1/2/2) with FROZEN input embeddings
  (``freeze_embeddings=True``: ``requires_grad`` is False from construction on);
* an UNTIED output head by default (``tie_word_embeddings=False``). A head tied to frozen input embeddings
  would be frozen too, leaving the model without any trainable unembedding; untied, the head is an ordinary
  trainable matrix and "full fine-tuning" means every LM weight except the input embeddings.
  ``tie_word_embeddings=True`` ties them (and then freezes both when ``freeze_embeddings`` is set).

Hugging Face semantics: ``forward(input_ids | inputs_embeds, attention_mask, position_ids, cache (or past_key_values),
use_cache, labels, logits_to_keep)`` with a :class:`~transformers.DynamicCache`, ``generate()`` (greedy, beam,
sampling), gradient checkpointing, and ``output_attentions=True`` returning per-layer attention weights
(B, heads, S_q, S_kv): such a call always runs eager attention, whatever ``attn_implementation`` says, because
the fused kernels never materialise the weights. Norms, the rotary embedding, ``apply_rotary_pos_emb`` and the
eager attention kernel are transformers' own (the Llama ones).

    from .paper_llm import build_paper_llm
    lm = build_paper_llm()                          # randomly initialised, 190.5M parameters
    lm = build_paper_llm(device="meta")             # shapes only: instant, for counting parameters
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb, eager_attention_forward,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

MODEL_TYPE = "context_peft_llm"
NAME = "paper-llm"  # the short name launch scripts accept

# The KV cache's name in model outputs and layer calls: "cache" from transformers 5.24 on, "past_key_values" before.
# Read from the public output dataclass and mask function of the installed release, not assumed.
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
_MASK_CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


# -------------------------------------------------------------------------------------------------- config
@strict
class PaperLLMConfig(PreTrainedConfig):
    """Configuration of the Context-PEFT paper's LLM; every default is the paper's size (see the module docstring).

    ``rope_theta=...`` is accepted as a keyword and stored in ``rope_parameters["rope_theta"]`` (the transformers 5
    layout); :attr:`rope_theta` reads it back.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = [CACHE]

    vocab_size: int = 50272  # OPT-125m's embedding rows
    hidden_size: int = 768
    intermediate_size: int = 3072  # width of each SwiGLU half: the fused up projection outputs 2x this
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: one key/value head per query head (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # the gate activation of SwiGLU
    max_position_embeddings: int = 2048  # RoPE needs no table; this only bounds the rotary cache
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 1  # OPT's tokenizer: <pad> = 1, </s> = 2 (used as bos and eos)
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    freeze_embeddings: bool = True  # input embeddings get requires_grad=False at construction
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0  # dropout on each sub-layer output before the residual add (read per call)

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by ``@strict`` validation: widths must divide evenly."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}; "
                "change one of them"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}; change one of them"
            )

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", self.default_theta))


# --------------------------------------------------------------------------------------------------- model
class PaperLLMAttention(nn.Module):
    """Multi-head self-attention with RoPE on q and k. (B, S, D) -> (B, S, D), plus the weights when asked."""

    def __init__(self, config: PaperLLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        h = config.hidden_size
        q, kv = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, S_past + S, hd)
        attention: Callable = eager_attention_forward
        if not kwargs.get("output_attentions"):  # the weights exist only in the eager kernel
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (B, S, H * hd)
        return self.o_proj(out), weights


class PaperLLMMLP(nn.Module):
    """SwiGLU with a fused gate|up projection: (B, S, D) -> up_proj (B, S, 2F) -> silu(gate) * up (B, S, F) -> D.

    The FFN intermediate (where IA3 scales) is the input of ``down_proj``.
    """

    def __init__(self, config: PaperLLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up_proj(x).chunk(2, dim=-1)  # first half gates, second half carries
        return self.down_proj(self.act_fn(gate) * up)


class PaperLLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, config: PaperLLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.self_attn = PaperLLMAttention(config, layer_idx)
        self.mlp = PaperLLMMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The cache comes as ``kwargs[CACHE]``: under activation checkpointing transformers drops it by that name."""
        p = self.config.residual_dropout if self.training else 0.0  # read per call: settable on a built model
        cache = kwargs.pop(CACHE, None)
        attn, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = hidden_states + F.dropout(attn, p, self.training)
        return hidden_states + F.dropout(self.mlp(self.post_attention_layernorm(hidden_states)), p, self.training)


class PaperLLMPreTrainedModel(PreTrainedModel):
    config: PaperLLMConfig
    config_class = PaperLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PaperLLMDecoderLayer"]
    _skip_keys_device_placement = [CACHE]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": PaperLLMDecoderLayer, "attentions": PaperLLMAttention}

    def freeze_input_embeddings(self) -> None:
        """``requires_grad=False`` on the input embeddings when the config's ``freeze_embeddings`` says so."""
        embeddings = self.get_input_embeddings() if self.config.freeze_embeddings else None
        if embeddings is not None:
            embeddings.weight.requires_grad_(False)

    def tie_weights(self, *args, **kwargs):
        """Transformers' tying, then the embedding freeze again: ``from_pretrained`` and
        ``resize_token_embeddings`` put new (trainable) Parameters in place and call this afterwards."""
        out = super().tie_weights(*args, **kwargs)
        self.freeze_input_embeddings()
        return out


class PaperLLMModel(PaperLLMPreTrainedModel):
    """The decoder stack: embeddings -> layers -> final RMS norm. Returns the last hidden state (B, S, D)."""

    def __init__(self, config: PaperLLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PaperLLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()
        self.freeze_input_embeddings()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The KV cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier releases).
        ``position_ids`` (B, S) win; else ``cache_position`` (S,) (absolute positions of these tokens, passed by
        earlier releases); else positions continue after what the cache holds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, D)
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            if cache_position is None:
                past = cache.get_seq_length() if cache is not None else 0
                cache_position = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = cache_position.unsqueeze(0)
        mask_config = self.config
        if kwargs.get("output_attentions") and self.config._attn_implementation != "eager":
            mask_config = copy.copy(self.config)  # the eager kernel takes an additive float mask
            mask_config._attn_implementation = "eager"
        mask = create_causal_mask(
            config=mask_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, **{_MASK_CACHE: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)  # cos, sin (B, S, hd)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings, attention_mask=mask, position_ids=position_ids,
                **{CACHE: cache}, **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE: cache})


class PaperLLMForCausalLM(PaperLLMPreTrainedModel, GenerationMixin):
    """The paper's LLM with its language-model head; ``labels`` (B, S) give the shifted next-token loss
    (-100 ignored), as every Hugging Face causal LM."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PaperLLMConfig):
        super().__init__(config)
        self.model = PaperLLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.freeze_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``logits_to_keep``: 0 = logits for every position, n = for the last n, a tensor = those positions.
        The KV cache comes as ``cache`` or ``past_key_values`` (whichever the installed transformers passes)."""
        out: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))  # (B, S', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            **{CACHE: getattr(out, CACHE)},
        )


AutoConfig.register(MODEL_TYPE, PaperLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(PaperLLMConfig, PaperLLMForCausalLM, exist_ok=True)


# ------------------------------------------------------------------------------------------------ builders
def paper_llm_config(**overrides) -> PaperLLMConfig:
    """The paper's configuration; keyword overrides for any field (``rope_theta=5e5``, ``num_hidden_layers=2``)."""
    return PaperLLMConfig(**overrides)


def build_paper_llm(
    *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, **overrides
) -> PaperLLMForCausalLM:
    """A randomly initialised :class:`PaperLLMForCausalLM` (``device="meta"``: shapes only, instant)."""
    config = paper_llm_config(**overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


__all__ = [
    "MODEL_TYPE", "NAME", "PaperLLMConfig", "PaperLLMModel", "PaperLLMForCausalLM", "paper_llm_config",
    "build_paper_llm",
]
