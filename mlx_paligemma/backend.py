"""The backend interface: what the one generation loop needs from a framework.

A backend owns the model weights on its device and runs forwards; it never samples, tokenizes
or reads images. Inputs and outputs cross the boundary as numpy arrays (token ids in, float32
logits of the last position out), except image features, which stay on the device.
"""

from __future__ import annotations

import platform
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import PaliGemmaConfig
from .errors import SettingError

BACKENDS = ("auto", "mlx", "torch")
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes; each backend picks its default (pick_dtype)


@dataclass
class State:
    """What a backend keeps between decode steps: its KV cache and the batch's layout."""

    cache: list
    offset: int  # positions already in the cache
    pad: np.ndarray  # left padding of each row
    prefix_len: int  # the bidirectional prefix ends here


class Backend(ABC):
    name: str  # "mlx" or "torch"
    device: str  # "cpu", "gpu", "cuda:0", "mps", ...
    dtype: str  # "float32", "bfloat16", "float16"
    config: PaliGemmaConfig
    quantize: int | None = None

    @classmethod
    def check_settings(cls, dtype: str | None = None, device: str | None = None, quantize: int | None = None,
                       group_size: int = 64) -> None:
        """Raise the SettingError of a setting this backend cannot take, before any file is read.

        Each backend adds its own rules (devices, group sizes) to these shared ones; None means the
        backend's default (its pick_device and pick_dtype).
        """
        if dtype is not None and dtype not in DTYPES:
            raise SettingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if quantize is not None and (isinstance(quantize, bool) or quantize not in (4, 8)):
            raise SettingError(f"quantize must be 4 or 8 (bits), got {quantize!r}")

    @abstractmethod
    def image_features(self, pixel_values: np.ndarray) -> Any:
        """(B, 3, S, S) float32 pixels -> device features (B, N, text hidden)."""

    # True where the device runs ahead of the host: the loop then queues the next decode step
    # before it waits for the ids of the current one
    pipelined: bool = False

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, features: Any, pad: np.ndarray, prefix_len: int) -> tuple[Any, Any]:
        """Run a left-padded prefix (B, T) through a fresh KV cache.

        pad[b] is the number of padding tokens at the start of row b; every row's prefix ends at
        prefix_len == T. Returns (state, logits of the last position (B, vocab) on the device).
        """

    @abstractmethod
    def decode(self, state: Any, token_ids: Any) -> Any:
        """One token per row through the cache -> logits (B, vocab) on the device.

        token_ids: (B,) numpy ids, or a handle from `greedy` (the ids never leave the device).
        """

    @abstractmethod
    def greedy(self, logits: Any, vocab_limit: int, banned: list[int] | None) -> Any:
        """Argmax over ids < vocab_limit (never one of `banned`) on the device -> a handle for decode/host_ids."""

    @abstractmethod
    def host_ids(self, handle: Any) -> np.ndarray:
        """The (B,) ids of a `greedy` handle on the host: the only transfer of a greedy step."""

    @abstractmethod
    def to_numpy(self, logits: Any) -> np.ndarray:
        """Device logits -> float32 numpy (for sampling on the host, and for tests)."""

    @abstractmethod
    def forward_logits(self, input_ids: np.ndarray, features: Any, prefix_len: int) -> np.ndarray:
        """One full forward of one row (1, T) with no cache -> float32 logits (T, vocab).

        Tokens before prefix_len form the bidirectional prefix; the rest attend causally.
        """

    def slice_features(self, features: Any, index: int) -> Any:
        """Row `index` of a batch of features, kept on the device."""
        return features[index : index + 1]

    @abstractmethod
    def stack_features(self, rows: list) -> Any:
        """Rows of features (each (1, N, D)) -> one batch (B, N, D) on the device."""

    def peak_memory(self) -> int:
        """Peak bytes in use since the last reset (device memory, or resident memory on CPU)."""
        return peak_rss_bytes()

    def reset_peak_memory(self) -> None:
        reset_peak_rss()

    # fine-tuning: LoRA layers on the text decoder (adapter.py), the loss and a trainer (training.py)

    @abstractmethod
    def add_lora(self, config, weights: dict[str, np.ndarray]) -> None:
        """Wrap the layers config.targets names with LoRA layers holding `weights` (canonical names)."""

    @abstractmethod
    def lora_weights(self) -> dict[str, np.ndarray]:
        """The LoRA weights as float32 numpy, by canonical name."""

    @abstractmethod
    def loss_sums(self, batch) -> tuple[float, int]:
        """(sum of the cross-entropy over the batch's target tokens, their count), no gradients."""

    @abstractmethod
    def trainer(self, lr: float, weight_decay: float = 0.0) -> "Trainer":
        """An AdamW trainer of the LoRA weights (add_lora first)."""


class Trainer(ABC):
    """Gradients of the summed loss, accumulated over micro-batches, then one AdamW step on their mean."""

    @abstractmethod
    def accumulate(self, batch) -> tuple[float, int]:
        """Add the gradient of the batch's summed loss; return (loss sum, target tokens)."""

    @abstractmethod
    def update(self, count: int) -> None:
        """One optimizer step with the accumulated gradient divided by `count`; clears the gradient."""

    @abstractmethod
    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradient by canonical name (float32), for tests."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's moments and step, as numpy, to resume from."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


def attention_masks(
    pad: np.ndarray, start: int, length: int, total: int, prefix_len: int, window: int | None
) -> dict[str, np.ndarray | None]:
    """Boolean masks (B, 1, length, total), True where a query may attend to a key; None when all True.

    Queries are positions start..start+length of the left-padded rows, keys 0..total. The whole
    prefix (image tokens, bos, prompt, newline) attends bidirectionally; later tokens attend
    causally. Sliding layers (Gemma 2) also drop keys `window` or more positions back, except
    inside the prefix block, as transformers does. Padding keys are never attended; a padding
    query attends to itself only, so that its (unused) row stays finite.
    """
    q = np.arange(start, start + length)[:, None]
    k = np.arange(total)[None, :]
    block = (q < prefix_len) & (k < prefix_len)
    causal = k <= q
    valid = k[None] >= pad[:, None, None]  # (B, 1, total)
    is_pad_q = q[None] < pad[:, None, None]  # (B, length, 1)
    own = is_pad_q & (k == q)[None]

    def finish(allowed: np.ndarray) -> np.ndarray | None:
        m = (allowed[None] & valid & ~is_pad_q) | own
        return None if m.all() else m[:, None]

    masks = {"full": finish(causal | block), "sliding": None}
    if window is not None:
        masks["sliding"] = finish((causal & (q - k < window)) | block)
    else:
        masks["sliding"] = masks["full"]
    return masks


def training_masks(prefix_lens: np.ndarray, lengths: np.ndarray, total: int, window: int | None) -> dict[str, np.ndarray]:
    """Boolean masks (B, 1, total, total) of right-padded training rows, True where a query may attend.

    Row b holds prefix_lens[b] prefix tokens (bidirectional, as in `attention_masks`), then its
    suffix (causal), then padding from lengths[b]: padding keys are never attended, and a padding
    query attends to itself only.
    """
    q = np.arange(total)[:, None]
    k = np.arange(total)[None, :]
    P, L = prefix_lens[:, None, None], lengths[:, None, None]
    block = (q[None] < P) & (k[None] < P)
    causal = (k <= q)[None]
    is_pad_q = q[None] >= L
    keep = (k[None] < L) & ~is_pad_q
    own = is_pad_q & (k == q)[None]
    masks = {"full": ((causal | block) & keep) | own}
    masks["sliding"] = masks["full"] if window is None else (((causal & (q - k < window)[None]) | block) & keep) | own
    return {name: m[:, None] for name, m in masks.items()}


def pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise SettingError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    # MLX on Apple silicon; elsewhere torch (the Linux mlx wheel multiplies with a reference BLAS)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch"


def peak_rss_bytes() -> int:
    """Peak resident bytes of this process since `reset_peak_rss` (Linux: VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0


def reset_peak_rss() -> bool:
    """Start a new peak at the current resident size (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM), so that a generation's peak is its own and not the load's; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
