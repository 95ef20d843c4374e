"""Gemma 1 and Gemma 2 decoders, as PaliGemma 1 and 2 use them.

The config decides every difference (one branch point, `TextConfig.is_gemma2`): Gemma 2 adds
sandwich norms around attention and MLP, attention-logit and final-logit softcaps, a
query_pre_attn_scalar for the attention scale and a sliding window on alternate layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TextConfig
from . import cpu_kernels


def softcap(x: torch.Tensor, cap: float, inplace: bool = False) -> torch.Tensor:
    """cap * tanh(x / cap); inplace overwrites x (same values, no new tensors)."""
    if inplace:
        return x.div_(cap).tanh_().mul_(cap)
    return torch.tanh(x / cap) * cap


def gelu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with gelu's tanh approximation."""
    return F.gelu(gate, approximate="tanh") * up


def fused(x: torch.Tensor, dtypes: tuple = (torch.bfloat16,)) -> bool:
    """Whether a fused CPU kernel may take x: activations in one of dtypes (by default bf16, emulated,
    several passes an op in PyTorch; float32 stays on PyTorch's ops, the reference path), no gradient
    to give."""
    return x.dtype in dtypes and not (torch.is_grad_enabled() and x.requires_grad)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.kernels = False  # bf16 rows through the CPU kernels' one-pass norm (the torch backend sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels and fused(x):
            return cpu_kernels.rms_norm(x.contiguous(), 1.0 + self.weight.float(), self.eps)
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        # (x * (1 + w)) in float32, then the cast, as transformers does
        return (out * (1.0 + self.weight.float())).type_as(x)


class Embedding(nn.Embedding):
    """nn.Embedding with MLX's `as_linear`, the output head tied to it."""

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE (rotate_half) of x (B, n, L, hd) with the tables (L, hd) of its positions.

    x may be strided (a transposed projection); the result is contiguous, so that attention multiplies
    it in place: a sum takes the layout of its first operand, here the (contiguous) concatenation.
    The same sum as transformers' x * cos + rotate_half(x) * sin, in the other (exact) order.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1) * sin + x * cos


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dim, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcapping
        self.kernels = False  # decoding's attention products on the CPU kernels (the torch backend sets it)
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache, offset: int, rope_tables: tuple,
                last_only: bool = False) -> torch.Tensor:
        """Attention of x's L positions; with last_only, keys and values of all L positions (the cache)
        but the query, the attention and the output of the last position only: (B, 1, D)."""
        B, L, _ = x.shape
        xq, Lq, cos, sin = x, L, *rope_tables
        if last_only:
            xq, Lq, cos, sin, mask = x[:, -1:].contiguous(), 1, cos[-1:], sin[-1:], None if mask is None else mask[:, :, -1:]
        q = self.q_proj(xq).reshape(B, Lq, self.n_heads, -1).transpose(1, 2)  # (B, nh, Lq, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(1, 2)  # (B, nkv, L, hd)
        # contiguous, as rope leaves q and k: a bf16 product on the CPU (oneDNN) copies any other layout
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(1, 2).contiguous()
        q = rope(q, cos, sin)
        k = rope(k, *rope_tables)
        if cache is not None:
            cached = cache.update_and_fetch(k, v, offset)
            # a prefill's filled positions are exactly k and v, contiguous: attending over them copies
            # nothing, where a bf16 product on the CPU copies any strided view of the cache first.
            # Decoding reads the cache in place, in its dtype (float32 on CPUs: those products take views).
            if offset:
                k, v = cached
        if self.kernels and k.dtype != torch.float32:  # a decode step reads the float32 cache as it is
            # bf16 products are emulated on this CPU: attention in float32 (prefill, a forward without a
            # cache, LoRA training: its bf16 products and their backward were most of a training step)
            k, v = k.float(), v.float()
        q = q.to(k.dtype)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, Lq, -1).to(x.dtype))

    def _softcapped_attention(self, q, k, v, mask):
        B, nh, L, hd = q.shape
        rep, nkv = self.n_heads // self.n_kv_heads, self.n_kv_heads
        S = k.shape[2]
        # the query heads sharing a kv head become rows of one product: no copy of the keys per head
        q = q.reshape(B, nkv, rep * L, hd)
        # decoding on a CPU with our kernels: the two products that read the float32 cache are theirs
        # (they have no derivative: a few-token forward in training keeps PyTorch's products)
        streamed = (self.kernels and rep * L <= 8 and not q.requires_grad and q.dtype == torch.float32
                    and k.dtype == torch.float32 and hd % 8 == 0)
        scores = cpu_kernels.attention_scores(q, k) if streamed else q @ k.transpose(-1, -2)
        # without autograd the scores are scaled, capped and masked in place: a long prefill holds
        # two (B, nh, L, S) tensors at a time instead of four (2.2 GB each for 28B-896 in float32)
        inplace = not scores.requires_grad
        if self.kernels and inplace and scores.dtype == torch.float32 and scores.is_contiguous():
            # on our kernels' path: scale, softcap, mask and softmax in one kernel (two passes, not six)
            weights = cpu_kernels.softcap_softmax_(scores.reshape(B, nkv * rep * L, S), L, self.scale, self.softcap, mask)
            weights = weights.reshape(B, nkv, rep * L, S)
        else:
            scores = (scores.mul_(self.scale) if inplace else scores * self.scale).reshape(B, nkv, rep, L, S)
            # the softcap comes before the mask, as in transformers
            scores = softcap(scores, self.softcap, inplace)
            if mask is not None:
                fill = torch.finfo(scores.dtype).min
                scores = scores.masked_fill_(~mask[:, :, None], fill) if inplace else scores.masked_fill(~mask[:, :, None], fill)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).reshape(B, nkv, rep * L, S)
        out = cpu_kernels.attention_values(weights, v) if streamed else weights @ v
        return out.reshape(B, nh, L, hd)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.kernels = False  # bf16 GELU-gated product on the CPU kernels (the torch backend sets it)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.kernels and fused(gate):
            return self.down_proj(cpu_kernels.gelu_mul(gate.contiguous(), up.contiguous()))
        return self.down_proj(gelu_gate(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.sliding = config.is_sliding(layer)
        self.sandwich = config.is_gemma2
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, masks: dict, cache, offset: int, rope_tables: tuple,
                last_only: bool = False) -> torch.Tensor:
        mask = masks["sliding" if self.sliding else "full"]
        h = self.self_attn(self.input_layernorm(x), mask, cache, offset, rope_tables, last_only)
        if last_only:
            x = x[:, -1:]  # the attention kept the last position only: so do the residual and the MLP
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        # Gemma 1's post_attention_layernorm is the norm before the MLP
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        hd = config.head_dim
        # computed on the CPU in float32 as transformers does (not a buffer: the model is built on "meta")
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device="cpu") / hd))

    def rope_tables(self, offset: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (L, hd) of positions offset .. offset + L: angles in float32, cast to the compute
        dtype, as transformers does. Computed once a forward for all the layers."""
        positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]  # (L, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # text embeddings are scaled by sqrt(hidden), the scale (a float32 scalar) cast to the compute dtype first
        h = self.embed_tokens(input_ids)
        return h * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(h.dtype)

    def forward(self, h: torch.Tensor, masks: dict, cache: list | None, offset: int, last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, L, D) after the final norm; with last_only, (B, 1, D) of the last position.

        The last position's state depends on the other positions only through the keys and values,
        so the last layer (once it has cached them) computes its query, attention output and MLP for
        the last position alone: ~1/num_layers of a prefill's products saved.
        """
        # positions count from 1, as in transformers (with RoPE only rounding differs from 0)
        tables = self.rope_tables(offset + 1, h.shape[1], h.device, h.dtype)
        last = len(self.layers) - 1 if last_only and h.shape[1] > 1 else None  # a decode step is one position already
        for i, layer in enumerate(self.layers):
            h = layer(h, masks, cache[i] if cache is not None else None, offset, tables, i == last)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # the output head is tied to the embedding; Gemma 2 soft-caps the final logits
        out = self.embed_tokens.as_linear(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = softcap(out, cap)
        return out
