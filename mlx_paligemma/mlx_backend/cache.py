"""Per-layer KV cache: preallocated buffers grown in steps, filled in place."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_kv, T, hd) keys and values; return everything cached so far."""
        prev, T = self.offset, keys.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            B, n_kv, _, hd = keys.shape
            capacity = (prev + T + self.step - 1) // self.step * self.step
            new_k = mx.zeros((B, n_kv, capacity, hd), keys.dtype)
            new_v = mx.zeros((B, n_kv, capacity, hd), values.dtype)
            if self.keys is not None:
                new_k[:, :, :prev, :] = self.keys[:, :, :prev, :]
                new_v[:, :, :prev, :] = self.values[:, :, :prev, :]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, prev : prev + T, :] = keys
        self.values[:, :, prev : prev + T, :] = values
        self.offset = prev + T
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
