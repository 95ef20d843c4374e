"""Gemma 1 and Gemma 2 decoders, as PaliGemma 1 and 2 use them.

The config decides every difference (one branch point, `TextConfig.is_gemma2`): Gemma 2 adds
sandwich norms around attention and MLP, attention-logit and final-logit softcaps, a
query_pre_attn_scalar for the attention scale and a sliding window on alternate layers.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: mx.array) -> mx.array:
    """cap * tanh(x / cap), fused into one kernel."""
    return mx.tanh(x / cap) * cap


@partial(mx.compile, shapeless=True)
def gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """gelu(gate) * up with gelu's tanh approximation, fused into one kernel."""
    return nn.gelu_approx(gate) * up


class Linear(nn.Linear):
    """nn.Linear that may hold its weight transposed, (in, out), when `transposed` is set.

    On the CPU mlx multiplies through BLAS sgemm, which reads a row-major (in, out) weight
    1.4-1.9x faster than an (out, in) one when there is one row (a decode step); the backend
    chooses that layout there and keeps the standard one on the GPU.
    """

    transposed = False

    def __call__(self, x: mx.array) -> mx.array:
        if not self.transposed:
            return super().__call__(x)
        y = x @ self["weight"]
        return y + self["bias"] if "bias" in self else y


class Embedding(nn.Embedding):
    """nn.Embedding (tied to the output head) that may hold its table transposed, (dim, vocab)."""

    transposed = False

    def __call__(self, ids: mx.array) -> mx.array:
        if self.transposed:
            return mx.moveaxis(mx.take(self.weight, ids, axis=1), 0, -1)
        return super().__call__(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        if self.transposed:
            return x @ self.weight
        return super().as_linear(x)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dim, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcapping
        self.rope_theta = config.rope_theta
        self.q_proj = Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, dim, bias=False)

    def __call__(self, x: mx.array, mask: mx.array | None, cache, offset: int | mx.array, last_only: bool = False) -> mx.array:
        """Attention of x's L positions; with last_only, keys and values of all L positions (the cache)
        but the query, the attention and the output of the last position only: (B, 1, D)."""
        B, L, _ = x.shape
        xq, Lq = x, L
        if last_only:
            xq, Lq, mask = x[:, -1:], 1, None if mask is None else mask[:, :, -1:]
        q = self.q_proj(xq).reshape(B, Lq, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, nh, Lq, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, nkv, L, hd)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # positions count from 1, as in transformers (with RoPE only rounding differs from 0)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset + 1 + L - Lq)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset + 1)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v, offset)
        if self.softcap is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, Lq, -1))

    def _softcapped_attention(self, q, k, v, mask):
        B, nh, L, hd = q.shape
        rep, nkv = self.n_heads // self.n_kv_heads, self.n_kv_heads
        S = k.shape[2]
        # the query heads sharing a kv head become rows of one product: no copy of the keys per head
        q = q.reshape(B, nkv, rep * L, hd)
        scores = ((q * self.scale) @ k.swapaxes(-1, -2)).reshape(B, nkv, rep, L, S)
        scores = softcap(scores, mx.array(self.softcap, scores.dtype))
        if mask is not None:
            scores = mx.where(mask[:, :, None], scores, mx.finfo(scores.dtype).min)
        weights = mx.softmax(scores, axis=-1, precise=True).reshape(B, nkv, rep * L, S)
        return (weights @ v).reshape(B, nh, L, hd)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_gate(self.gate_proj(x), self.up_proj(x)))


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

    def __call__(self, x: mx.array, masks: dict, cache, offset: int, last_only: bool = False) -> mx.array:
        mask = masks["sliding" if self.sliding else "full"]
        h = self.self_attn(self.input_layernorm(x), mask, cache, offset, last_only)
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
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        # text embeddings are scaled by sqrt(hidden), the scale cast to the compute dtype first
        h = self.embed_tokens(input_ids)
        return h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)

    def __call__(self, h: mx.array, masks: dict, cache: list | None, offset: int, last_only: bool = False) -> mx.array:
        """Hidden states (B, L, D) after the final norm; with last_only, (B, 1, D) of the last position.

        The last position's state depends on the other positions only through the keys and values,
        so the last layer (once it has cached them) computes its query, attention output and MLP for
        the last position alone: ~1/num_layers of a prefill's products saved.
        """
        last = len(self.layers) - 1 if last_only and h.shape[1] > 1 else None  # a decode step is one position already
        for i, layer in enumerate(self.layers):
            h = layer(h, masks, cache[i] if cache is not None else None, offset, i == last)
        return self.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        # the output head is tied to the embedding; Gemma 2 soft-caps the final logits
        out = self.embed_tokens.as_linear(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = softcap(out, mx.array(cap, out.dtype))
        return out
