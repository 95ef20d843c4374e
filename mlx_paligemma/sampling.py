"""Sampling: a pure function of float32 logits and an explicit numpy RNG.

Sampling on the host from the last position's logits keeps every backend's choices identical
for the same seed: both hand the same numbers to the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SettingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def validate(self) -> "SamplingParams":
        t, p, k = self.temperature, self.top_p, self.top_k
        if not _finite_number(t) or t < 0:
            raise SettingError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}")
        if not _finite_number(p) or not 0 < p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {p!r}")
        if not _whole(k) or k < 0:
            raise SettingError(f"top_k must be a whole number >= 0 (0 means no limit), got {k!r}")
        if not _whole(self.seed) or self.seed < 0:
            raise SettingError(f"seed must be a whole number >= 0, got {self.seed!r}")
        return self


def _finite_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def sample(logits: np.ndarray, params: SamplingParams, rngs: list[np.random.Generator], vocab_limit: int) -> np.ndarray:
    """(B, V) float32 logits -> (B,) token ids, never an id >= vocab_limit (the padded rows).

    One generator per row, so a row samples the same ids alone or in a batch.
    """
    logits = np.asarray(logits, dtype=np.float64)[:, :vocab_limit]
    if params.temperature == 0:
        return logits.argmax(axis=-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits):
        row = row / params.temperature
        if 0 < params.top_k < row.size:
            kth = np.partition(row, -params.top_k)[-params.top_k]
            row = np.where(row < kth, -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        if params.top_p < 1.0:
            # keep the smallest set of most likely tokens whose mass reaches top_p
            keep = np.searchsorted(np.cumsum(sorted_p), params.top_p) + 1
            order, sorted_p = order[:keep], sorted_p[:keep]
        cdf = np.cumsum(sorted_p)
        u = rngs[b].random() * cdf[-1]
        out[b] = order[min(np.searchsorted(cdf, u, side="right"), len(order) - 1)]
    return out
