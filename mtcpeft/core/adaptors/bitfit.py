"""Context-BitFit: a trainable bias per context added to the output of each targeted projection.

BitFit (Ben Zaken et al., 2022, arXiv 2106.10199) tunes only biases; here every context has its own bias
vector, looked up per token (a gather, not a loop over contexts). Zeros at init: the model starts unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mtcpeft.core.contexts import RoutingPlan
from .base import AdaptorConfig, ContextLayer, per_token_vectors, register_adaptor


@dataclass
class BitFitConfig(AdaptorConfig):
    """Context-BitFit has no options: one bias of d_out per context and targeted projection."""

    identity = 0.0  # an added bias of 0 changes nothing


class ContextBitFitLayer(ContextLayer):
    adaptor_param_names = ("bitfit_bias",)

    def __init__(self, base, router, config: BitFitConfig, role="proj", name=""):
        super().__init__(base, router, config, role, name)
        self.bitfit_bias = nn.Parameter(base.weight.new_zeros(self.num_contexts, self.out_features))  # (C, D)

    def adapt(self, x, plan: RoutingPlan):
        y = self.base_layer(x)  # (..., D)
        if plan.num_live == 0:
            return y
        bias = per_token_vectors(self.bitfit_bias.to(y.dtype), plan, identity=0.0)  # (D,) or (N, D)
        return y + bias.view(*((1,) * (y.dim() - 1)), -1) if bias.dim() == 1 else y + bias.view(y.shape)


BitFitConfig.layer_cls = ContextBitFitLayer
register_adaptor("bitfit")(BitFitConfig)
