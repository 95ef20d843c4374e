"""The MLX backend: loads a checkpoint into `PaliGemma` and runs the backend interface."""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import Backend, State, attention_masks
from ..checkpoint import Checkpoint
from ..errors import CheckpointError, SettingError
from .cache import make_cache
from .paligemma import PaliGemma

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def sanitize(name: str, w: mx.array, dtype) -> mx.array:
    """Every layout change and cast between a stored tensor and our parameter, with its reason."""
    if name == "vision.embeddings.patch_embedding.weight" and w.ndim == 4 and w.shape[1] != w.shape[2]:
        # PyTorch conv2d weights are O,I,H,W; MLX's are O,H,W,I (our converted folders store O,H,W,I)
        w = w.transpose(0, 2, 3, 1)
    if w.dtype in (mx.uint32, mx.int32, mx.uint8):
        return w  # packed quantized weights keep their integer type
    return w.astype(dtype)


def quantizable(path: str, module: nn.Module) -> bool:
    """Quantize the text decoder's linear layers and the tied embedding; keep SigLIP and the projector exact."""
    return path.startswith("text.") and isinstance(module, (nn.Linear, nn.Embedding))


class MLXBackend(Backend):
    name = "mlx"
    pipelined = True  # lazy graphs: the next step is queued before the host reads an id

    def __init__(self, checkpoint: Checkpoint, dtype: str = "float32", device: str | None = None,
                 quantize: int | None = None, group_size: int = 64):
        if dtype not in DTYPES:
            raise SettingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device is not None:
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.config = checkpoint.config
        self.dtype = dtype
        self._dtype = DTYPES[dtype]
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.model = PaliGemma(self.config)
        stored_q = self.config.quantization
        if stored_q:
            # a folder written by convert --quantize: build quantized layers, then load into them
            nn.quantize(self.model, group_size=stored_q["group_size"], bits=stored_q["bits"], class_predicate=quantizable)
            self.quantize = stored_q["bits"]
        self._load(checkpoint)
        if quantize and not stored_q:
            nn.quantize(self.model, group_size=group_size, bits=quantize, class_predicate=quantizable)
            mx.eval(self.model.parameters())
            self.quantize = quantize
        self.model.eval()

    def _load(self, checkpoint: Checkpoint) -> None:
        expected = dict(nn.utils.tree_flatten(self.model.parameters()))
        loaded: set[str] = set()
        for file in checkpoint.files:
            try:
                arrays = mx.load(str(file))  # memory-mapped, read as each tensor is evaluated
            except Exception as e:
                raise CheckpointError(f"{file.name}: cannot be read as safetensors ({e})") from None
            weights = []
            for info in (t for t in checkpoint.tensors.values() if t.file == file):
                w = sanitize(info.name, arrays.pop(info.stored_name), self._dtype)
                target = expected.get(info.name)
                if target is None:
                    raise CheckpointError(f"unexpected tensor {info.stored_name} in {file.name}")
                if tuple(w.shape) != tuple(target.shape):
                    raise CheckpointError(f"tensor {info.stored_name} has shape {list(w.shape)}, expected {list(target.shape)}")
                weights.append((info.name, w))
                loaded.add(info.name)
            del arrays
            self.model.load_weights(weights, strict=False)
            # evaluate file by file: a bf16 file cast to float32 never exists twice in memory
            mx.eval(self.model.parameters())
        missing = sorted(set(expected) - loaded)
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]} in the checkpoint")

    def image_features(self, pixel_values: np.ndarray) -> mx.array:
        pixels = mx.array(pixel_values.transpose(0, 2, 3, 1)).astype(self._dtype)  # NCHW -> NHWC
        features = self.model.image_features(pixels)
        mx.eval(features)
        return features

    def stack_features(self, rows: list) -> mx.array:
        return mx.concatenate(rows, axis=0)

    def _masks(self, pad, start, length, total, prefix_len) -> dict:
        masks = attention_masks(pad, start, length, total, prefix_len, self.config.text.sliding_window)
        return {k: (None if m is None else mx.array(m)) for k, m in masks.items()}

    def _forward(self, input_ids, features, pad, prefix_len, cache, last_only) -> mx.array:
        B, T = input_ids.shape
        h = self.model.embed(mx.array(input_ids), features, mx.array(pad))
        masks = self._masks(pad, 0, T, T, prefix_len)
        return self.model(h, masks, cache, 0, last_only)

    def prefill(self, input_ids, features, pad, prefix_len):
        cache = make_cache(self.config.text.num_hidden_layers)
        logits = self._forward(input_ids, features, pad, prefix_len, cache, last_only=True)[:, -1, :]
        mx.async_eval(logits)
        return State(cache, input_ids.shape[1], pad, prefix_len), logits

    def decode(self, state: State, token_ids) -> mx.array:
        ids = token_ids if isinstance(token_ids, mx.array) else mx.array(np.asarray(token_ids))
        h = self.model.embed(ids[:, None], None, None)
        masks = self._masks(state.pad, state.offset, 1, state.offset + 1, state.prefix_len)
        logits = self.model(h, masks, state.cache, state.offset, last_only=True)[:, -1, :]
        state.offset += 1
        mx.async_eval(logits)  # the device starts now; the host syncs only on the ids it reads
        return logits

    def greedy(self, logits: mx.array, vocab_limit: int, banned: int | None) -> mx.array:
        logits = logits[:, :vocab_limit]
        if banned is not None:
            logits = mx.where(mx.arange(vocab_limit) == banned, -mx.inf, logits)
        ids = mx.argmax(logits, axis=-1)
        mx.async_eval(ids)
        return ids

    def host_ids(self, handle: mx.array) -> np.ndarray:
        return np.array(handle).astype(np.int64)

    def to_numpy(self, logits) -> np.ndarray:
        return _to_numpy(logits) if isinstance(logits, mx.array) else np.asarray(logits, dtype=np.float32)

    def forward_logits(self, input_ids, features, prefix_len):
        pad = np.zeros(input_ids.shape[0], dtype=np.int64)
        return _to_numpy(self._forward(input_ids, features, pad, prefix_len, None, last_only=False)[0])

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()


def _to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))
