"""Per-layer KV cache: preallocated buffers grown in steps, filled in place.

The same cache as the MLX backend's, less its compiled decode path: torch steps run eagerly, so a
step writes at its position and attends over the positions filled so far.
"""

from __future__ import annotations

import torch


class KVCache:
    step = 256

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype  # None: the dtype of the keys; the torch backend keeps float32 on CPUs without bf16
        self.keys = None
        self.values = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, size: int) -> None:
        """Grow the buffers (B, n_kv, capacity, hd) to hold at least `size` positions."""
        if size <= self.capacity:
            return
        B, n_kv, _, hd = self.keys.shape
        capacity = (size + self.step - 1) // self.step * self.step
        new_k = self.keys.new_zeros((B, n_kv, capacity, hd))
        new_v = self.values.new_zeros((B, n_kv, capacity, hd))
        new_k[:, :, : self.offset, :] = self.keys[:, :, : self.offset, :]
        new_v[:, :, : self.offset, :] = self.values[:, :, : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv, T, hd) keys and values at `offset`; return the positions filled so far."""
        T = keys.shape[2]
        if self.keys is None:
            B, n_kv, _, hd = keys.shape
            capacity = (offset + T + self.step - 1) // self.step * self.step
            self.keys = keys.new_zeros((B, n_kv, capacity, hd), dtype=self.dtype or keys.dtype)
            self.values = values.new_zeros((B, n_kv, capacity, hd), dtype=self.dtype or values.dtype)
        self.reserve(offset + T)
        self.keys[:, :, offset : offset + T, :] = keys
        self.values[:, :, offset : offset + T, :] = values
        self.offset = offset + T
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]


def make_cache(num_layers: int, dtype: torch.dtype | None = None) -> list[KVCache]:
    return [KVCache(dtype) for _ in range(num_layers)]
