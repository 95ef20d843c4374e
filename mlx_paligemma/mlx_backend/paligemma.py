"""PaliGemma: SigLIP features, projected, in place of the `<image>` tokens of a Gemma prompt."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import PaliGemmaConfig
from .gemma import GemmaModel
from .siglip import VisionModel


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision = VisionModel(config.vision)
        self.projector = nn.Linear(config.vision.hidden_size, config.projection_dim)
        self.text = GemmaModel(config.text)

    def image_features(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) channels-last pixels -> (B, N, text hidden) features (not scaled)."""
        return self.projector(self.vision(pixels))

    def embed(self, input_ids: mx.array, features: mx.array | None, image_start: mx.array | None) -> mx.array:
        """Token embeddings with image features in place of the `<image>` tokens.

        Each row's N image tokens are contiguous from image_start[b] (after its left padding).
        """
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        h = self.text.embed(mx.where(is_image, 0, input_ids))
        if features is None:
            return h
        L, N = input_ids.shape[1], features.shape[1]
        idx = mx.clip(mx.arange(L)[None, :] - image_start[:, None], 0, N - 1)  # (B, L)
        placed = mx.take_along_axis(features, idx[..., None], axis=1).astype(h.dtype)
        return mx.where(is_image[..., None], placed, h)

    def __call__(self, h: mx.array, masks: dict, cache: list | None, offset: int, last_only: bool) -> mx.array:
        """Embedded inputs (B, L, D) -> logits (B, L or 1, vocab)."""
        return self.text.logits(self.text(h, masks, cache, offset, last_only))  # last_only: (B, 1, D) already
