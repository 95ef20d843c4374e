"""Sampling: the settings of one generation, the host-side logits processors, and the sampler.

`SamplingParams` is the one object that carries every generation setting from a surface (API
keywords, CLI flags, shell commands) through the loop; a new option is a field here, its
validation, and the code that uses it. The sampler is a pure function of float32 logits and an
explicit numpy RNG: sampling on the host from the last position's logits keeps every backend's
choices identical for the same seed, since both hand the same numbers to the same code.

A logits processor is any callable `processor(generated, logits) -> logits` over a batch:
`generated` (B, t) the ids each row has generated so far, `logits` (B, V) float32 on the host
(V the real vocabulary). The loop applies the processors in order before the greedy choice or
the sampler; with none, a greedy step never brings the logits to the host.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import SettingError

DEFAULT_MAX_TOKENS = 128

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplingParams:
    """Everything one generation is run with (the image and the prompt aside)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0  # eos is not allowed before this many tokens
    repetition_penalty: float = 1.0  # transformers' rule: 1 is none, > 1 penalises ids of the prompt and the answer
    stop: tuple[str, ...] = ()  # the answer ends with the first of these; the text stops before it
    # detect/segment prompts: the answer follows the objects' grammar (grammar.py); other prompts untouched
    constrain: bool = False

    def __post_init__(self):
        # one stop string may be given alone, and a list is taken as the tuple it stands for
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_settings(cls, params: "SamplingParams | None" = None, **settings) -> "SamplingParams":
        """`params` (or the defaults) with keyword settings replacing its fields; not yet validated."""
        if params is None:
            params = cls()
        elif not isinstance(params, SamplingParams):
            raise SettingError(
                f"sampling settings are a SamplingParams or keywords (max_tokens=..., temperature=...), got {params!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise SettingError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(names))}")
        return dataclasses.replace(params, **settings)

    def validate(self, context_len: int | None = None) -> "SamplingParams":
        """Raise a SettingError naming the first setting out of its range; max_tokens within the context when given."""
        t, p, k = self.temperature, self.top_p, self.top_k
        n = self.max_tokens
        if context_len is not None and (not _whole(n) or not 1 <= n <= context_len):
            raise SettingError(f"max_tokens must be a whole number in [1, {context_len}], got {n!r}")
        if not _whole(n) or n < 1:
            raise SettingError(f"max_tokens must be a whole number >= 1, got {n!r}")
        if not _whole(self.min_tokens) or self.min_tokens < 0:
            raise SettingError(f"min_tokens must be a whole number >= 0, got {self.min_tokens!r}")
        if not _finite_number(t) or t < 0:
            raise SettingError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}")
        if not _finite_number(p) or not 0 < p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {p!r}")
        if not _whole(k) or k < 0:
            raise SettingError(f"top_k must be a whole number >= 0 (0 means no limit), got {k!r}")
        if not _whole(self.seed) or self.seed < 0:
            raise SettingError(f"seed must be a whole number >= 0, got {self.seed!r}")
        r = self.repetition_penalty
        if not _finite_number(r) or r <= 0:
            raise SettingError(f"repetition_penalty must be a number > 0 (1 means none), got {r!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SettingError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.constrain, (bool, np.bool_)):
            raise SettingError(f"constrain must be true or false, got {self.constrain!r}")
        return self


def _finite_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class RepetitionPenalty:
    """transformers' RepetitionPenaltyLogitsProcessor: each id already in the row (its prompt included)
    has its logit divided by the penalty when positive, multiplied by it when negative.
    `penalty` is one number for every row, or one per row (1 leaves a row alone)."""

    def __init__(self, penalty: float | Sequence[float], prompts: Sequence[Sequence[int]]):
        self.prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        each = [penalty] * len(self.prompts) if isinstance(penalty, (int, float)) else list(penalty)
        self.penalties = [float(v) for v in each]

    def __call__(self, generated: np.ndarray, logits: np.ndarray) -> np.ndarray:
        V = logits.shape[-1]
        for b, row in enumerate(logits):
            penalty = self.penalties[b]
            if penalty == 1.0:
                continue
            seen = np.unique(np.concatenate([self.prompts[b], generated[b]]))
            seen = seen[seen < V]  # `<image>` and the padding rows are not in the host logits
            x = row[seen]
            row[seen] = np.where(x < 0, x * penalty, x / penalty)
        return logits


def per_row(params: "SamplingParams | Sequence[SamplingParams]", rows: int) -> list[SamplingParams]:
    """One SamplingParams per row: the same object for every row, or the list given (checked for length)."""
    if isinstance(params, SamplingParams):
        return [params] * rows
    params = list(params)
    if len(params) != rows:
        raise SettingError(f"one SamplingParams per row is needed, got {len(params)} for {rows} rows")
    return params


def logits_processors(params: "SamplingParams | Sequence[SamplingParams]", prompts: Sequence[Sequence[int]]) -> list[LogitsProcessor]:
    """The processors the settings ask for, for rows with these prompt ids (one params, or one per row)."""
    rows = per_row(params, len(prompts))
    out: list[LogitsProcessor] = []
    if any(p.repetition_penalty != 1.0 for p in rows):
        out.append(RepetitionPenalty([p.repetition_penalty for p in rows], prompts))
    return out


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


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams], rngs: list[np.random.Generator], vocab_limit: int) -> np.ndarray:
    """`sample` where each row has its own settings: rows that share temperature, top_p and top_k are
    sampled together, each from its own generator, so a row's ids do not depend on its neighbours."""
    out = np.empty(logits.shape[0], dtype=np.int64)
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(b)
    for rows in groups.values():
        out[rows] = sample(logits[rows], params[rows[0]], [rngs[b] for b in rows], vocab_limit)
    return out
