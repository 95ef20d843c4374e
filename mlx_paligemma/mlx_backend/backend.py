"""The MLX backend: loads a checkpoint into `PaliGemma` and runs the backend interface."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import Backend, State, attention_masks
from ..checkpoint import Checkpoint, TensorInfo
from ..config import PaliGemmaConfig
from ..errors import CheckpointError, SettingError
from . import lora
from .cache import KVCache, make_cache
from .gemma import Embedding, Linear
from .paligemma import PaliGemma

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def pick_device(device: str | None) -> mx.Device:
    """None: MLX's default device (the GPU where there is one); cpu or gpu as asked."""
    if device not in (None, "cpu", "gpu"):
        raise SettingError(f"device for the mlx backend must be cpu or gpu, got {device!r}")
    if device is None:
        return mx.default_device()
    return mx.gpu if device == "gpu" else mx.cpu


def pick_dtype(dtype: str | None, stored: str) -> str:
    """None: the dtype the weights are stored in (`stored`), but bfloat16 for float16 weights, since
    Gemma 2's activations overflow float16."""
    if dtype is None:
        return "float32" if stored == "float32" else "bfloat16"
    if dtype not in DTYPES:
        raise SettingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def sanitize(name: str, w: mx.array, dtype) -> mx.array:
    """Every layout change and cast between a stored tensor and our parameter, with its reason."""
    if name == "vision.embeddings.patch_embedding.weight" and w.ndim == 4 and w.shape[1] != w.shape[2]:
        # PyTorch conv2d weights are O,I,H,W; MLX's are O,H,W,I (our converted folders store O,H,W,I)
        w = w.transpose(0, 2, 3, 1)
    if w.dtype in (mx.uint32, mx.int32, mx.uint8):
        return w  # packed quantized weights keep their integer type
    return w.astype(dtype)


# how numpy reads a stored float tensor's bytes, and the mlx dtype those bytes are
STORED = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16)}


def transposed_copy(info: TensorInfo, dtype, rows: int = 512) -> mx.array:
    """A stored (out, in) tensor as a row-major (in, out) array of `dtype`.

    Read from the file through a memory map, a block of rows at a time: numpy transposes each block
    into one reused buffer (mlx's strided copy is several times slower on the CPU) and mlx casts it
    into its columns of the result, so neither the stored tensor nor a cast copy is ever whole in memory.
    """
    np_dtype, stored = STORED[info.dtype]
    n_out, n_in = info.shape
    src = np.memmap(info.file, dtype=np_dtype, mode="r", offset=info.offset, shape=(n_out, n_in))
    out = mx.zeros((n_in, n_out), dtype)
    block = np.empty((n_in, rows), np_dtype)
    for start in range(0, n_out, rows):
        n = min(rows, n_out - start)
        np.copyto(block[:, :n], src[start : start + n].T)
        out[:, start : start + n] = mx.array(block[:, :n]).view(stored).astype(dtype)
        mx.eval(out)  # in place: `out` holds the only reference to its buffer
    del src
    return out


def quantizable(path: str, module: nn.Module) -> bool:
    """Quantize the text decoder's linear layers and the tied embedding; keep SigLIP and the projector exact."""
    return path.startswith("text.") and isinstance(module, (nn.Linear, nn.Embedding))


class MLXBackend(Backend):
    name = "mlx"
    pipelined = True  # lazy graphs: the next step is queued before the host reads an id

    @classmethod
    def check_settings(cls, dtype: str | None = None, device: str | None = None, quantize: int | None = None,
                       group_size: int = 64) -> None:
        super().check_settings(dtype, device, quantize, group_size)
        pick_device(device)
        if quantize and (isinstance(group_size, bool) or group_size not in PaliGemmaConfig.MLX_GROUP_SIZES):
            raise SettingError(f"group_size for the mlx backend must be one of 32, 64, 128, got {group_size!r}")

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, device: str | None = None,
                 quantize: int | None = None, group_size: int = 64, cpu_layout: bool | None = None):
        """dtype None: pick_dtype's choice for the stored weights; device None: MLX's default.
        cpu_layout: store the text weights transposed (see gemma.Linear); None: when running on the CPU."""
        self.check_settings(dtype, device, quantize, group_size)
        self.config = checkpoint.config
        stored_q = self.config.quantization
        if quantize and not stored_q:
            # a size that does not divide the widths makes mx.quantize fail
            self.config.check_group_size(group_size)
        if device is not None:
            mx.set_default_device(pick_device(device))
        self.dtype = pick_dtype(dtype, checkpoint.stored_dtype)
        self._dtype = DTYPES[self.dtype]
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.model = PaliGemma(self.config)
        # quantized weights keep their layout
        cpu_layout = self.device == "cpu" if cpu_layout is None else cpu_layout
        self._transposed = self._cpu_layout() if cpu_layout and not (stored_q or quantize) else set()
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
        self._decode_step = mx.compile(self._decode_graph)

    def _cpu_layout(self) -> set[str]:
        """Mark the text model's linears and embedding transposed; return their weights' names."""
        names = set()
        for path, module in self.model.named_modules():
            if path.startswith("text.") and isinstance(module, (Linear, Embedding)):
                module.transposed = True
                names.add(f"{path}.weight")
        return names

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
                transpose = info.name in self._transposed
                w = arrays.pop(info.stored_name)  # lazy: a tensor read through transposed_copy is never read here
                w = w if transpose else sanitize(info.name, w, self._dtype)
                target = expected.get(info.name)
                if target is None:
                    raise CheckpointError(f"unexpected tensor {info.stored_name} in {file.name}")
                if tuple(w.shape) != tuple(target.shape):
                    raise CheckpointError(f"tensor {info.stored_name} has shape {list(w.shape)}, expected {list(target.shape)}")
                if transpose:
                    w = transposed_copy(info, self._dtype)
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
        cache = state.cache
        for c in cache:
            c.reserve(state.offset + 1)  # a new capacity retraces the step once
        kv = [(c.keys, c.values) for c in cache]
        logits, kv = self._decode_step(ids, mx.array(state.offset, mx.int32), mx.array(state.pad, mx.int32), kv)
        for c, (k, v) in zip(cache, kv):
            c.keys, c.values, c.offset = k, v, state.offset + 1
        state.offset += 1
        mx.async_eval(logits)  # the device starts now; the host syncs only on the ids it reads
        return logits

    def _decode_graph(self, ids: mx.array, offset: mx.array, pad: mx.array, kv: list) -> tuple[mx.array, list]:
        """One token per row at position `offset` through fixed-capacity caches (compiled as one graph).

        The masks are the decode rows of `attention_masks`, built on the device: a query past the
        prefix attends causally to the non-padding keys, within the window on sliding layers.
        """
        cache = [KVCache(k, v) for k, v in kv]
        keys = mx.arange(kv[0][0].shape[2])
        allowed = (keys[None] >= pad[:, None]) & (keys[None] <= offset)  # (B, capacity)
        window = self.config.text.sliding_window
        sliding = allowed if window is None else allowed & (offset - keys < window)[None]
        masks = {"full": allowed[:, None, None], "sliding": sliding[:, None, None]}
        h = self.model.embed(ids[:, None], None, None)
        logits = self.model(h, masks, cache, offset, last_only=True)[:, -1, :]
        return logits, [(c.keys, c.values) for c in cache]

    def greedy(self, logits: mx.array, vocab_limit: int, banned: list[int] | None) -> mx.array:
        logits = logits[:, :vocab_limit]
        if banned is not None:
            mask = np.zeros(vocab_limit, dtype=bool)
            mask[banned] = True
            logits = mx.where(mx.array(mask), -mx.inf, logits)
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

    def add_lora(self, config, weights) -> None:
        lora.add_lora(self.model, config, weights)
        self.recompile()

    def recompile(self) -> None:
        """A compiled step holds the weights it was traced with: trace it again after they change."""
        self._decode_step = mx.compile(self._decode_graph)

    def lora_weights(self) -> dict[str, np.ndarray]:
        return lora.lora_weights(self.model)

    def loss_sums(self, batch) -> tuple[float, int]:
        self.model.eval()
        loss, n = lora.loss_sums(self, self.model, batch)
        return float(loss), n

    def trainer(self, lr: float, weight_decay: float = 0.0) -> lora.MLXTrainer:
        return lora.MLXTrainer(self, lr, weight_decay)

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()


def _to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))
