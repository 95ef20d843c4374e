"""big_vision's VQ-VAE mask decoder: 16 codebook indices -> a 64x64 map in about [-1, 1].

The 16 codes index a 128-entry codebook; the 4x4 grid of code vectors goes through a 1x1 conv to
128 channels, ReLU, two residual blocks, four stride-2 transposed convs (128, 64, 32, 16 channels,
each followed by ReLU) and a 1x1 conv to one channel (big_vision
`evaluators/proj/paligemma/transfers/segmentation.py`, `Decoder`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GRID, HIDDEN, UP_CHANNELS


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class MaskDecoder(nn.Module):
    def __init__(self, num_codes: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_codes, embedding_dim))
        self.conv_in = nn.Conv2d(embedding_dim, HIDDEN, 1)
        self.blocks = nn.ModuleList(ResBlock(HIDDEN) for _ in range(2))
        dims = (HIDDEN,) + UP_CHANNELS
        # flax's ConvTranspose(kernel 4, stride 2, padding=2, transpose_kernel=True) pads the
        # stride-dilated input by 2 on each side: PyTorch's padding=1 (kernel - 1 - 2) is the same
        self.ups = nn.ModuleList(nn.ConvTranspose2d(dims[i], dims[i + 1], 4, stride=2, padding=1) for i in range(len(UP_CHANNELS)))
        self.conv_out = nn.Conv2d(UP_CHANNELS[-1], 1, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        N = codes.shape[0]
        # the 16 codes fill the 4x4 grid row by row: (N, 16, D) -> (N, D, 4, 4)
        x = self.embedding[codes].reshape(N, GRID, GRID, -1).permute(0, 3, 1, 2)
        x = F.relu(self.conv_in(x))
        for block in self.blocks:
            x = block(x)
        for up in self.ups:
            x = F.relu(up(x))
        return self.conv_out(x)[:, 0]  # (N, 64, 64)


def sanitize(name: str, w: np.ndarray) -> torch.Tensor:
    """Canonical weights are in PyTorch's layouts already (conv O,I,H,W; transposed conv I,O,H,W)."""
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def load_decoder(weights: dict[str, np.ndarray], device: str | None = None) -> MaskDecoder:
    """A MaskDecoder on `device` (None: the backend's default) holding the canonical `weights`, in float32."""
    from .backend import pick_device

    num_codes, dim = weights["embedding"].shape
    decoder = MaskDecoder(num_codes, dim)
    decoder.load_state_dict({k: sanitize(k, w) for k, w in weights.items()}, strict=True)
    return decoder.to(pick_device(device)).eval()


def decode(decoder: MaskDecoder, codes: np.ndarray) -> np.ndarray:
    """(N, 16) integer codes -> (N, 64, 64) float32 maps on the host."""
    device = decoder.embedding.device
    with torch.inference_mode():
        out = decoder(torch.as_tensor(np.asarray(codes, dtype=np.int64), device=device))
    return out.float().cpu().numpy()
