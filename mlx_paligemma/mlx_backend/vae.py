"""big_vision's VQ-VAE mask decoder: 16 codebook indices -> a 64x64 map in about [-1, 1].

The 16 codes index a 128-entry codebook; the 4x4 grid of code vectors goes through a 1x1 conv to
128 channels, ReLU, two residual blocks, four stride-2 transposed convs (128, 64, 32, 16 channels,
each followed by ReLU) and a 1x1 conv to one channel (big_vision
`evaluators/proj/paligemma/transfers/segmentation.py`, `Decoder`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import GRID, HIDDEN, UP_CHANNELS


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.conv3(nn.relu(self.conv2(nn.relu(self.conv1(x)))))


class MaskDecoder(nn.Module):
    def __init__(self, num_codes: int, embedding_dim: int):
        super().__init__()
        self.embedding = mx.zeros((num_codes, embedding_dim))
        self.conv_in = nn.Conv2d(embedding_dim, HIDDEN, 1)
        self.blocks = [ResBlock(HIDDEN) for _ in range(2)]
        dims = (HIDDEN,) + UP_CHANNELS
        # flax's ConvTranspose(kernel 4, stride 2, padding=2, transpose_kernel=True) pads the
        # stride-dilated input by 2 on each side: MLX's padding=1 (kernel - 1 - 2) is the same
        self.ups = [nn.ConvTranspose2d(dims[i], dims[i + 1], 4, stride=2, padding=1) for i in range(len(UP_CHANNELS))]
        self.conv_out = nn.Conv2d(UP_CHANNELS[-1], 1, 1)

    def __call__(self, codes: mx.array) -> mx.array:
        N = codes.shape[0]
        # the 16 codes fill the 4x4 grid row by row: (N, 16, D) -> (N, 4, 4, D), MLX convs are NHWC
        x = self.embedding[codes].reshape(N, GRID, GRID, -1)
        x = nn.relu(self.conv_in(x))
        for block in self.blocks:
            x = block(x)
        for up in self.ups:
            x = nn.relu(up(x))
        return self.conv_out(x)[..., 0]  # (N, 64, 64)


def sanitize(name: str, w: np.ndarray) -> mx.array:
    """Canonical weights (PyTorch layouts) -> MLX's layouts."""
    w = np.asarray(w, dtype=np.float32)
    if name.startswith("ups.") and name.endswith(".weight"):
        # PyTorch transposed conv weights are I,O,H,W; MLX's are O,H,W,I
        w = w.transpose(1, 2, 3, 0)
    elif name.endswith(".weight"):
        # PyTorch conv weights are O,I,H,W; MLX's are O,H,W,I
        w = w.transpose(0, 2, 3, 1)
    return mx.array(np.ascontiguousarray(w))


def load_decoder(weights: dict[str, np.ndarray], device: str | None = None) -> MaskDecoder:
    """A MaskDecoder holding the canonical `weights`, in float32 (on `device`, None: MLX's default)."""
    from .backend import pick_device

    if device is not None:
        mx.set_default_device(pick_device(device))
    num_codes, dim = weights["embedding"].shape
    decoder = MaskDecoder(num_codes, dim)
    decoder.load_weights([(k, sanitize(k, w)) for k, w in weights.items()], strict=True)
    mx.eval(decoder.parameters())
    return decoder


def decode(decoder: MaskDecoder, codes: np.ndarray) -> np.ndarray:
    """(N, 16) integer codes -> (N, 64, 64) float32 maps on the host."""
    out = decoder(mx.array(np.asarray(codes, dtype=np.int32)))
    return np.array(out.astype(mx.float32))
