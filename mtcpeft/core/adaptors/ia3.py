"""Context-IA3: per-context scaling vectors on keys, values and the feed-forward intermediate.

IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638) rescales the attention keys and values and the FFN intermediate activation by
learned vectors. Keys/values are scaled at the OUTPUT of their projections (role "out"); the FFN
intermediate is the INPUT of the down projection (role "in"). Fused projections (GPT-2's ``c_attn`` = q|k|v)
scale only a slice of the output (``feature_slice``), so q stays untouched. Ones at init: the model starts
unchanged. Each token's vector is looked up by its context (a gather, not a loop over contexts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from mtcpeft.core.contexts import RoutingPlan
from .base import AdaptorConfig, ContextLayer, per_token_vectors, register_adaptor


@dataclass
class IA3Config(AdaptorConfig):
    """Context-IA3 has no options; its placement comes from the preset's IA3 table (keys, values, FFN)."""

    placement = "activations"  # the preset's IA3 tables: keys, values, FFN intermediate
    identity = 1.0  # a scale of 1 changes nothing


class ContextIA3Layer(ContextLayer):
    """role "out": y = base(x) * l_c on features [start, stop); role "in": y = base(x * l_c)."""

    adaptor_param_names = ("ia3_scale",)

    def __init__(self, base, router, config: IA3Config, role="out", name="", feature_slice=None):
        super().__init__(base, router, config, role, name)
        if role not in ("out", "in"):
            raise ValueError(f"IA3 role must be 'out' (keys, values) or 'in' (FFN intermediate), got {role!r}")
        width = self.out_features if role == "out" else self.in_features
        start, stop = feature_slice if feature_slice is not None else (0, width)
        if not 0 <= start < stop <= width:
            raise ValueError(f"IA3 feature slice {(start, stop)} does not fit a width of {width}")
        self.feature_slice = (start, stop)
        self.width = width
        self.ia3_scale = nn.Parameter(base.weight.new_ones(self.num_contexts, stop - start))  # (C, stop-start)

    def _scales(self, plan: RoutingPlan, dtype):
        start, stop = self.feature_slice
        table = self.ia3_scale.to(dtype)
        if (start, stop) != (0, self.width):  # untouched features keep a scale of exactly 1
            table = F.pad(table, (start, self.width - stop), value=1.0)
        return per_token_vectors(table, plan, identity=1.0)  # (W,) or (N, W)

    def adapt(self, x, plan: RoutingPlan):
        if plan.num_live == 0:
            return self.base_layer(x)
        if self.role == "in":
            s = self._scales(plan, x.dtype)
            return self.base_layer(x * (s if s.dim() == 1 else s.view(x.shape)))
        y = self.base_layer(x)
        s = self._scales(plan, y.dtype)
        return y * (s if s.dim() == 1 else s.view(y.shape))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, features={self.feature_slice}"


IA3Config.layer_cls = ContextIA3Layer
register_adaptor("ia3")(IA3Config)
