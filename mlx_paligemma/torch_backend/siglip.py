"""SigLIP So400m vision tower (no CLS token, no pooling head), as PaliGemma uses it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from . import cpu_kernels
from .gemma import fused


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = config.head_dim**-0.5
        self.kernels = False  # attention in float32 on CPUs that emulate bfloat16 (the torch backend sets it)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, nh, L, hd)
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.kernels:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.kernels = False  # gelu in one pass on the CPU kernels (the torch backend sets it)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # the kernels' path keeps the vision activations in float32, whose gelu PyTorch takes ~2.6 ns an
        # element for here (77 ms of a 3B-224 first token on Zen 3); ours is one vectorized pass
        if self.kernels and fused(h, (torch.float32, torch.bfloat16)):
            return self.fc2(cpu_kernels.gelu(h.contiguous()))
        return self.fc2(F.gelu(h, approximate="tanh"))  # gelu, tanh approximation


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels (B, C, H, W) channels-first, as PyTorch convolutions take them
        x = self.patch_embedding(pixels)  # (B, D, H/p, W/p)
        # (B, N, D), patches in row-major order; contiguous once here, or the residual stream keeps the
        # transposed layout and every layer norm copies its input
        x = x.flatten(2).transpose(1, 2).contiguous()
        return x + self.position_embedding.weight


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))
