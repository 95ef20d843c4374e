"""Per-layer KV cache: preallocated buffers grown in steps, filled in place.

The prefill appends eagerly. A decode step runs compiled on buffers of fixed capacity: it writes
its key and value at a position given as an array and attends over the whole buffer, the slots
past that position masked, so every step until the buffer grows has the same graph.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self, keys: mx.array | None = None, values: mx.array | None = None, offset: int = 0):
        self.keys = keys
        self.values = values
        self.offset = offset

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, size: int) -> None:
        """Grow the buffers (B, n_kv, capacity, hd) to hold at least `size` positions."""
        if size <= self.capacity:
            return
        B, n_kv, _, hd = self.keys.shape
        capacity = (size + self.step - 1) // self.step * self.step
        new_k = mx.zeros((B, n_kv, capacity, hd), self.keys.dtype)
        new_v = mx.zeros((B, n_kv, capacity, hd), self.values.dtype)
        new_k[:, :, : self.offset, :] = self.keys[:, :, : self.offset, :]
        new_v[:, :, : self.offset, :] = self.values[:, :, : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """Write (B, n_kv, T, hd) keys and values at `offset`.

        With an int offset (eager), returns the positions filled so far. With an array offset
        (inside the compiled decode step), returns the whole buffers; the caller masks the rest.
        """
        if isinstance(offset, mx.array):
            start = offset.reshape(1)
            self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
            self.values = mx.slice_update(self.values, values, start, axes=(2,))
            return self.keys, self.values
        T = keys.shape[2]
        if self.keys is None:
            B, n_kv, _, hd = keys.shape
            capacity = (offset + T + self.step - 1) // self.step * self.step
            self.keys = mx.zeros((B, n_kv, capacity, hd), keys.dtype)
            self.values = mx.zeros((B, n_kv, capacity, hd), values.dtype)
        self.reserve(offset + T)
        self.keys[:, :, offset : offset + T, :] = keys
        self.values[:, :, offset : offset + T, :] = values
        self.offset = offset + T
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
