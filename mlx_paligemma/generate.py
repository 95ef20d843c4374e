"""The one generation loop, over the backend interface: prefill, then one decode step a token.

It knows token ids and logits, not images or text: stop conditions (eos, max tokens, context
limit), the logits processors and sampling, per-row finishing in a batch, and the timing
figures live here. Conditions on the text (stop strings) are the caller's: it ends rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backend import Backend
from .sampling import LogitsProcessor, SamplingParams, per_row, sample_rows


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    backend: str = ""
    device: str = ""
    dtype: str = ""
    vision_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """`117 tokens in 18.6 s (6.3 tokens/s), first token 2.1 s, peak memory 6.2 GB`"""
        return (
            f"{self.generated_tokens} tokens in {self.total_s:.1f} s ({self.decode_tokens_per_s:.1f} tokens/s), "
            f"first token {self.ttft_s:.1f} s, peak memory {self.peak_memory_bytes / 1e9:.1f} GB"
        )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (B, T) left-padded ids and the pad count of each row."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    pad = np.array([T - len(r) for r in rows], dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, pad[b]:] = r
    return ids, pad


def generate_steps(
    backend: Backend,
    input_ids: np.ndarray,
    pad: np.ndarray,
    features: Callable[[], Any],
    params: SamplingParams | Sequence[SamplingParams],
    eos_ids: Sequence[int],
    vocab_limit: int,
    context_len: int,
    stats: Stats | None = None,
    processors: Sequence[LogitsProcessor] = (),
    ended: list[str] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (B,), kept (B,) bool) per step; kept[b]: the id is part of row b's answer.

    `params` is one SamplingParams for every row or one per row (a server batches requests with
    different settings); a row's ids depend only on its own settings and seed.
    `features` is called once, inside the timing, to get the image features on the device.
    `ended[b]` says why row b ended, "" while it runs. The loop ends a row at any of the eos ids
    (allowed after its min_tokens; the eos id is not kept), after its max_tokens ("max_tokens") or at the
    context limit ("context"). Between steps the caller may end a row with a reason of its own
    (a stop string, a client gone); generation stops when every row has ended.
    Logits processors (see sampling) run on the host before the choice of each id.
    """
    stats = stats if stats is not None else Stats()
    ended = ended if ended is not None else [""] * input_ids.shape[0]
    B, T = input_ids.shape
    rows = per_row(params, B)
    stats.prompt_tokens = int(T - pad.min())
    stats.backend, stats.device, stats.dtype = backend.name, backend.device, backend.dtype
    limits = [min(p.max_tokens, context_len - T) for p in rows]
    max_tokens = max(limits)
    rngs = [np.random.default_rng(p.seed) for p in rows]
    generated = np.zeros((B, max_tokens), dtype=np.int64)
    min_tokens = [p.min_tokens for p in rows]
    # greedy without processors chooses on the device: only the ids come to the host (eos can be
    # banned there for every row at once, not row by row)
    on_host = any(p.temperature > 0 for p in rows) or bool(processors) or len(set(min_tokens)) > 1
    stops = set(int(i) for i in eos_ids)
    # an eos id past the vocabulary limit can never be drawn, so there is nothing to ban
    bannable = [i for i in stops if 0 <= i < vocab_limit]
    backend.reset_peak_memory()
    start = time.perf_counter()
    feats = features()
    stats.vision_s = time.perf_counter() - start
    state, logits = backend.prefill(input_ids, feats, pad, prefix_len=T)
    first = None
    for step in range(max_tokens):
        last = step + 1 == max_tokens
        following = None
        if on_host:
            host = backend.to_numpy(logits)[:, :vocab_limit]
            if bannable:
                for b in range(B):
                    if step < min_tokens[b]:
                        host[b, bannable] = -np.inf
            for process in processors:
                host = process(generated[:, :step], host)
            tokens = sample_rows(host, rows, rngs, vocab_limit)
        else:
            banned = bannable if step < min_tokens[0] and bannable else None
            handle = backend.greedy(logits, vocab_limit, banned)
            if backend.pipelined and step > 0 and not last:
                # queued before the host waits for the ids (not on the first step, whose id is the
                # time to first token: building the first decode step may take the host a while)
                following = backend.decode(state, handle)
            tokens = backend.host_ids(handle)
        if first is None:
            first = time.perf_counter()
            stats.ttft_s = first - start
        generated[:, step] = tokens
        kept = np.array([not ended[b] and int(tokens[b]) not in stops for b in range(B)])
        for b in range(B):
            if not ended[b] and int(tokens[b]) in stops:
                ended[b] = "eos"
        if kept.any():
            stats.generated_tokens = step + 1
        yield tokens, kept
        for b in range(B):
            if not ended[b] and step + 1 >= limits[b]:
                ended[b] = "context" if limits[b] < rows[b].max_tokens else "max_tokens"
        if all(ended) or last:
            break
        # ended rows keep decoding (their outputs are ignored): rows never interact
        logits = following if following is not None else backend.decode(state, tokens)
    end = time.perf_counter()
    stats.total_s = end - start
    decoded = max(stats.generated_tokens - 1, 0)
    stats.decode_tokens_per_s = decoded / (end - first) if first is not None and end > first and decoded else 0.0
    stats.peak_memory_bytes = backend.peak_memory()
