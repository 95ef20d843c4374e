"""PaliGemma: SigLIP features, projected, in place of the `<image>` tokens of a Gemma prompt."""

from __future__ import annotations

import torch
import torch.nn as nn

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

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) channels-first pixels -> (B, N, text hidden) features (not scaled)."""
        return self.projector(self.vision(pixels))

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None, image_start: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features in place of the `<image>` tokens.

        Each row's N image tokens are contiguous from image_start[b] (after its left padding).
        """
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        h = self.text.embed(torch.where(is_image, 0, input_ids))
        if features is None:
            return h
        L, N = input_ids.shape[1], features.shape[1]
        idx = (torch.arange(L, device=input_ids.device)[None, :] - image_start[:, None]).clamp(0, N - 1)  # (B, L)
        placed = features.gather(1, idx[..., None].expand(-1, -1, features.shape[2])).to(h.dtype)
        return torch.where(is_image[..., None], placed, h)

    def forward(self, h: torch.Tensor, masks: dict, cache: list | None, offset: int, last_only: bool) -> torch.Tensor:
        """Embedded inputs (B, L, D) -> logits (B, L or 1, vocab)."""
        h = self.text(h, masks, cache, offset, last_only)
        if last_only:
            # (B, 1, D) already; multiplied as a (B, D) matrix: a strided 3-D input sends matmul down
            # its batched path, which copies the whole (transposed) output head
            return self.text.logits(h[:, -1].contiguous())[:, None]
        return self.text.logits(h)
