"""The composed task model: frozen vision encoder -> (trainable) projector -> image tokens spliced into the
input embeddings of a frozen LM that carries per-context adaptors (:class:`mtcpeft.core.model.ContextModel`).
Text-only tasks have no encoder and no projector: the same class then simply forwards to the LM.

Shapes: input_ids / context_ids / image_mask (B, S); pixel_values (B, 3, H, W) or cached image_features
(B, T, D_vision); the projector maps D_vision -> D_lm and its T outputs fill the positions where image_mask
is True, in order.
"""
from __future__ import annotations

import torch
from torch import nn

from mtcpeft.core.losses import mean_token_nll, positions_to_keep
from mtcpeft.core.model import ContextModel


class VisionLanguageModel(nn.Module):
    def __init__(self, lm: ContextModel, projector: nn.Module | None = None, encoder: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.encoder = encoder  # frozen; None when only cached features are used

    def image_tokens(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """(B, T, D_lm) projected image tokens from pixels (through the frozen encoder) or cached features."""
        if self.projector is None:
            raise ValueError("this model has no projector (a text-only task): its inputs cannot hold images")
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values (images) or image_features (cached encoder outputs)")
            if self.encoder is None:
                raise ValueError("this model has no vision encoder: pass cached image_features")
            with torch.no_grad():
                image_features = self.encoder(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(image_features.to(proj_dtype))

    def embed(self, input_ids, image_mask, pixel_values=None, image_features=None) -> torch.Tensor:
        """(B, S, D_lm) input embeddings with the image positions replaced by projected image tokens.

        In a mixed-task batch only some rows hold images: only those rows' images are encoded and projected
        (the others' pixel/feature rows are placeholders and are ignored).
        """
        embeds = self.lm.model.get_input_embeddings()(input_ids)
        if image_mask is None or not bool(image_mask.any()):
            return embeds
        rows = image_mask.any(1)
        pick = (lambda t: t if t is None or bool(rows.all()) else t[rows])
        img = self.image_tokens(pick(pixel_values), pick(image_features))
        per_row = image_mask[rows].sum(1)
        if not bool((per_row == img.shape[1]).all()):
            raise ValueError(
                f"each sequence with an image needs exactly {img.shape[1]} image positions (the encoder's tokens), "
                f"image_mask marks {per_row.tolist()}"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), img.to(embeds.dtype))

    def forward(self, input_ids, context_ids, image_mask=None, attention_mask=None, labels=None,
                pixel_values=None, image_features=None, **kwargs):
        """With ``labels``: ``.loss`` is the mean NLL of the label tokens, and ``.logits`` cover only the positions
        from the one before the first label on (the LM head over 49k words is skipped for image tokens)."""
        embeds = self.embed(input_ids, image_mask, pixel_values, image_features)
        if labels is not None:
            kwargs.setdefault("logits_to_keep", positions_to_keep(labels))
        out = self.lm(inputs_embeds=embeds, context_ids=context_ids, attention_mask=attention_mask, **kwargs)
        if labels is not None:
            out.loss = mean_token_nll(out.logits, labels)
        return out

    @torch.no_grad()
    def generate(self, input_ids, context_ids, image_mask=None, attention_mask=None, pixel_values=None,
                 image_features=None, **kwargs) -> torch.Tensor:
        """Generated token ids only (B, new): the prompt goes in as embeddings."""
        embeds = self.embed(input_ids, image_mask, pixel_values, image_features)
        return self.lm.generate(inputs_embeds=embeds, context_ids=context_ids, attention_mask=attention_mask, **kwargs)
