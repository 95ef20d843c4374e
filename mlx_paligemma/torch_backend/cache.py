"""Per-layer KV cache: preallocated buffers grown in steps, filled in place."""

from __future__ import annotations

import torch


class KVCache:
    step = 256

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype  # None: the dtype of the keys; the torch backend keeps float32 on CPUs without bf16
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, n_kv, T, hd) keys and values; return everything cached so far."""
        prev, T = self.offset, keys.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            B, n_kv, _, hd = keys.shape
            capacity = (prev + T + self.step - 1) // self.step * self.step
            new_k = keys.new_zeros((B, n_kv, capacity, hd), dtype=self.dtype or keys.dtype)
            new_v = values.new_zeros((B, n_kv, capacity, hd), dtype=self.dtype or values.dtype)
            if self.keys is not None:
                new_k[:, :, :prev, :] = self.keys[:, :, :prev, :]
                new_v[:, :, :prev, :] = self.values[:, :, :prev, :]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, prev : prev + T, :] = keys
        self.values[:, :, prev : prev + T, :] = values
        self.offset = prev + T
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]


def make_cache(num_layers: int, dtype: torch.dtype | None = None) -> list[KVCache]:
    return [KVCache(dtype) for _ in range(num_layers)]
