"""Weight-only int8 and int4 layers for the text decoder, on the matmul kernels torch ships.

int8: symmetric, one scale per output channel, `aten._weight_int8pack_mm` (CPU, CUDA, MPS).
int4: asymmetric, one scale and zero per `group_size` inputs of each output channel, in the tiled
layout of `aten._weight_int4pack_mm_for_cpu` (CPU) and `aten._weight_int4pack_mm` (CUDA, bfloat16
only). Dequantized, w = (q - 8) * scale + zero with q in 0..15.
The tied embedding (also the output head) is int8 per row in both modes: its rows are gathered
to embed tokens, which the tiled int4 layout does not allow.
MLX-quantized folders (written by the converter) store w = scales * q + biases per group, q packed
little-endian in uint32; they are unpacked here and requantized (4 bits: exactly, same groups).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SettingError

INT4_GROUP_SIZES = (32, 64, 128, 256)
ROWS = 4096  # quantize this many output channels at a time: one float32 copy of a chunk, never of a whole matrix
DENSE_ROWS = 16  # int8 inputs of this many rows go through the dense product where it is fast (int8_dense_rows)
WIDEN_BYTES = 2 << 20  # int8_dense widens ~2 MB of weights at a time: cache-resident while the product reads them


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weights -> int8 (N, K) and float32 scales (N,), w ~ q * scale."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], ROWS):
        chunk = w[i : i + ROWS].float()
        s = chunk.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[i : i + ROWS] = torch.round(chunk / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[i : i + ROWS] = s
    return q, scales


def int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weights -> int32 q (N, K) in 0..15, float32 scales and zeros (N, K / group_size)."""
    N, K = w.shape
    q = torch.empty((N, K), dtype=torch.int32, device=w.device)
    scales = torch.empty((N, K // group_size), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for i in range(0, N, ROWS):
        chunk = w[i : i + ROWS].float().reshape(-1, K // group_size, group_size)
        lo, hi = chunk.amin(dim=-1), chunk.amax(dim=-1)
        s = ((hi - lo) / 15).clamp(min=1e-6)
        q[i : i + ROWS] = torch.round((chunk - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).reshape(-1, K)
        scales[i : i + ROWS], zeros[i : i + ROWS] = s, lo + 8 * s
    return q, scales, zeros


def mlx_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX's packing: uint32 words (N, K * bits / 32), the first value in the lowest bits -> int32 (N, K)."""
    per_word = 32 // bits
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # uint32 as stored, without sign
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    q = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1).to(torch.int32)


def mlx_dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """w = scales * q + biases per group, in float32."""
    q = mlx_unpack(packed, bits).float()
    N, K = q.shape
    groups = scales.shape[1]
    w = q.reshape(N, groups, K // groups) * scales.float()[..., None] + biases.float()[..., None]
    return w.reshape(N, K)


def int8_dense(flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """flat @ (weight * scales).T through the dense product of flat's dtype: the int8 rows widened a
    cache-sized chunk at a time (exactly: |q| <= 127 is a bf16 too), the scales applied to the outputs.

    torch's int8 kernel multiplies 4 input rows at a time, widening the whole weight again for each 4
    (a prefill of 261 rows: 66 passes over it), and on x86 it is scalar code for float32 inputs; the
    dense products (oneDNN's bf16 on CPUs with native bf16, the BLAS sgemm in float32) widen it once.
    """
    M, K = flat.shape
    N = weight.shape[0]
    rows = max(16, WIDEN_BYTES // (K * flat.element_size()))
    out = torch.empty(M, N, dtype=flat.dtype, device=flat.device)
    buf = torch.empty(min(rows, N), K, dtype=flat.dtype, device=flat.device)
    for i in range(0, N, rows):
        w = buf[: min(rows, N - i)]
        w.copy_(weight[i : i + rows])
        torch.mul(F.linear(flat, w), scales[i : i + rows], out=out[:, i : i + rows])
    return out


def int8_forward(flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dense_rows: int) -> torch.Tensor:
    if dense_rows and flat.shape[0] >= dense_rows:
        return int8_dense(flat, weight, scales)
    return torch.ops.aten._weight_int8pack_mm(flat, weight, scales)


class Int8Product(torch.autograd.Function):
    """x @ (q * scales).T with torch's int8 kernel, and a backward pass for x (LoRA training over int8).

    The kernel has no derivative; the backward dequantizes the weight again, one layer at a time,
    rather than keeping a float copy.
    """

    @staticmethod
    def forward(ctx, flat, weight, scales, dense_rows):
        ctx.save_for_backward(weight, scales)
        return int8_forward(flat, weight, scales, dense_rows)

    @staticmethod
    def backward(ctx, grad):
        weight, scales = ctx.saved_tensors
        return grad @ (weight.to(grad.dtype) * scales.to(grad.dtype)[:, None]), None, None, None


def int8_product(flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dense_rows: int = 0) -> torch.Tensor:
    """dense_rows: from how many rows of flat the dense product takes over (0: never; int8_dense_rows)."""
    if torch.is_grad_enabled() and flat.requires_grad:
        return Int8Product.apply(flat, weight, scales, dense_rows)
    return int8_forward(flat, weight, scales, dense_rows)


class QuantizedLinear(nn.Module):
    """A bias-free nn.Linear with int8 or int4 weights."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.dense_rows = 0  # int8: inputs of this many rows take the dense product (the torch backend sets it)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype, name: str) -> "QuantizedLinear":
        N, K = w.shape
        if bits == 8:
            q, scales = int8_per_channel(w)
            return cls.from_int8(q, scales, dtype)
        check_int4(name, N, K, group_size, w.device)
        q, scales, zeros = int4_groups(w, group_size)
        return cls.from_int4(q, scales, zeros, group_size, dtype)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> "QuantizedLinear":
        layer = cls(q.shape[1], q.shape[0], 8, q.shape[1])
        layer.register_buffer("weight", q)
        layer.register_buffer("scales", scales.to(dtype))  # the kernel takes scales in the activations' dtype
        return layer

    @classmethod
    def from_int4(cls, q, scales, zeros, group_size: int, dtype: torch.dtype) -> "QuantizedLinear":
        N, K = q.shape
        layer = cls(K, N, 4, group_size)
        if q.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            # the CUDA kernel takes two values a byte, high nibble first, and runs in bfloat16
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(K))
            dtype = torch.bfloat16
        layer.register_buffer("weight", packed)
        # (K / group_size, N, 2): scale and zero of each group, the layout both kernels take, in the dtype the
        # kernel runs in (dtype; bf16 on CUDA)
        layer.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.bits == 8:
            y = int8_product(flat, self.weight, self.scales, self.dense_rows)
        elif torch.is_grad_enabled() and flat.requires_grad:
            # the int4 kernels have no derivative, and their tiled layout cannot be dequantized back
            raise SettingError("training over a 4-bit base runs on the mlx backend, or on torch where our CPU "
                              "kernels run (x86 with AVX2, no native bf16); here use quantize=8")
        else:
            # in the dtype of the scales (from_int4's: the activations' own, or bf16 where the backend asked)
            sz = self.scales_and_zeros
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu if flat.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
            y = kernel(flat.to(sz.dtype), self.weight, self.group_size, sz).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """The tied embedding and output head with int8 rows and one scale per row."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.dense_rows = 0  # as QuantizedLinear's, for the output head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return int8_product(flat, self.weight, self.scales, self.dense_rows).reshape(*x.shape[:-1], -1)


def inner_k_tiles(K: int) -> int:
    return 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2


def check_int4(name: str, N: int, K: int, group_size: int, device: torch.device) -> None:
    """The int4 kernels' shape rules, checked before packing so that the error names the layer."""
    if device.type not in ("cpu", "cuda"):
        raise SettingError(f"quantize=4 runs on the CPU or CUDA only, not on {device.type}; use quantize=8")
    if group_size not in INT4_GROUP_SIZES:
        raise SettingError(f"group_size for 4-bit must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    rows = 16 if device.type == "cpu" else 8
    if K % group_size or N % rows or (device.type == "cuda" and K % 32):
        raise SettingError(
            f"quantize=4: {name} is {N}x{K}; the int4 kernels need inputs a multiple of the group size "
            f"{group_size} and outputs a multiple of {rows}"
        )

