"""The PyTorch backend: loads a checkpoint into `PaliGemma` and runs the backend interface."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..backend import Backend, State, attention_masks
from ..checkpoint import Checkpoint, TensorInfo
from ..errors import CheckpointError, SettingError
from ..hardware import cpu_info
from . import cpu_kernels, lora, siglip
from .cache import make_cache
from .gemma import MLP, Attention, RMSNorm
from .paligemma import PaliGemma
from .quantize import DENSE_ROWS, QuantizedEmbedding, QuantizedLinear, check_int4, int4_groups, int8_per_channel, mlx_dequantize, mlx_unpack

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    """None: cuda, then mps, then cpu. An explicit device is honoured or refused."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if d.type == "cpu":
        return d
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"device {device!r}: CUDA is not available in this PyTorch build or machine")
        index = torch.cuda.current_device() if d.index is None else d.index
        if index >= torch.cuda.device_count():
            raise SettingError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if d.type == "mps":
        if not torch.backends.mps.is_available():
            raise SettingError(f"device {device!r}: MPS is not available (it needs Apple silicon and macOS 12.3+)")
        return d
    raise SettingError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")


# glibc's mallopt parameters (malloc.h) and its ceiling on the mmap threshold on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory() -> bool:
    """Have glibc serve blocks up to 32 MB from its heap and keep freed heap memory for the next tensor.

    A CPU generation allocates and frees activation-sized tensors (1 to 20 MB) hundreds of times. By
    default glibc maps a block that size fresh from the kernel and unmaps it when it is freed (its
    adaptive threshold only rises as such blocks are freed), so the first generations after loading
    fault in and zero their pages again and again: on a Zen 3 VM the first timed 3B-224 generation
    took ~200,000 page faults and ~0.8 s more time to first token than the next one. With the blocks
    kept in the heap it takes none. The heap then stays at a generation's working set (the bench's
    per-generation peak is unchanged). Not done where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ (theirs stands), nor off glibc. True when set."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators are left alone
        return False


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); else it is emulated,
    slower than float32. Unknown flags (macOS, Windows) count as emulated: float32 is the safe choice."""
    cpu = cpu_info()
    if not torch.backends.mkldnn.is_available():
        return False
    if cpu.arm:
        return "bf16" in cpu.flags
    return bool({"avx512_bf16", "amx_bf16"} & cpu.flags)


def cpu_kernels_unwanted() -> str | None:
    """Why our AVX2 kernels are not for this machine, or None: an x86 CPU with AVX2 and FMA, and
    MLX_PALIGEMMA_NO_KERNELS not set."""
    cpu = cpu_info()
    if os.environ.get("MLX_PALIGEMMA_NO_KERNELS"):
        return "the kernels are turned off by MLX_PALIGEMMA_NO_KERNELS"
    if not cpu.x86 or not {"avx2", "fma"} <= cpu.flags:
        return "the kernels are for x86 CPUs with AVX2 and FMA"
    return None


def cpu_kernels_available() -> bool:
    """Whether our decode kernels run here: a machine they are for (cpu_kernels_unwanted) where they build."""
    return cpu_kernels_unwanted() is None and cpu_kernels.build() is not None


def pick_dtype(dtype: str | None, device: torch.device) -> str:
    """None: bfloat16 on CUDA with bf16, on CPUs with bf16 instructions and on x86 CPUs with our AVX2 kernels; else float32.

    float16 is never the default: Gemma 2's activations overflow it.
    """
    if dtype is None:
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        if device.type == "cpu" and (cpu_has_fast_bf16() or cpu_kernels_available()):
            return "bfloat16"
        return "float32"
    if dtype not in DTYPES:
        raise SettingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise SettingError("float16 is not supported on the CPU; use bfloat16 or float32")
    return dtype


def int8_dense_rows(device: torch.device, dtype: torch.dtype) -> int:
    """From how many input rows an int8 layer widens its weights for the dense product (0: never).

    On the CPU where the activations' dtype has a fast dense product: float32 (the BLAS sgemm), bf16
    on CPUs with native bf16 (oneDNN). torch's int8 kernel reads and widens the weight again for every
    4 rows, so it keeps the few-row products (decoding) except on x86 in float32, where it is scalar
    code and even one row goes faster dense (Zen 3: 5.0-6.7 against 17.3 ms for a 9216 x 2304 weight).
    """
    if device.type != "cpu":
        return 0
    if dtype == torch.float32:
        return 1 if cpu_info().x86 else DENSE_ROWS
    return DENSE_ROWS if dtype == torch.bfloat16 and cpu_has_fast_bf16() else 0


def sanitize(name: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every layout change and cast between a stored tensor and our parameter, with its reason."""
    if name == "vision.embeddings.patch_embedding.weight" and w.ndim == 4 and w.shape[2] != w.shape[3]:
        # PyTorch conv2d weights are O,I,H,W; our converted folders store MLX's O,H,W,I
        w = w.permute(0, 3, 1, 2)
    if not w.dtype.is_floating_point:
        return w  # packed quantized weights (MLX uint32) keep their integer type
    return w.to(dtype).contiguous()


def use_cpu_kernels(model: PaliGemma) -> None:
    """Put the CPU kernels' layers in place of bfloat16 nn.Linear, the patch embedding's convolution,
    int8 QuantizedLinear and the tied embedding (explicit module replacement, as gpt-fast's quantize
    does), and turn on float32 attention (SigLIP, text prefill), the attention products that read
    the cache while decoding, the one-pass RMSNorm and GELU-gated product on bf16 rows, and SigLIP's one-pass
    GELU (its activations are float32 here). (int4
    layers are built as the kernels' layers when loading.)"""
    for path, module in list(model.named_modules()):
        if isinstance(module, (Attention, siglip.Attention, MLP, siglip.MLP, RMSNorm)):
            module.kernels = True
            continue
        if isinstance(module, nn.Conv2d) and module.weight.dtype == torch.bfloat16 and module.stride == module.kernel_size \
                and module.padding == (0, 0):
            layer = cpu_kernels.KernelPatchEmbedding(module)
        elif isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16:
            layer = cpu_kernels.KernelLinear(module.weight.data, module.bias)
        elif isinstance(module, QuantizedLinear) and module.bits == 8:
            layer = cpu_kernels.KernelLinear(module.weight, scale=module.scales)
        elif isinstance(module, QuantizedEmbedding):
            layer = cpu_kernels.KernelEmbedding(module.weight, module.scales)
        elif isinstance(module, nn.Embedding) and path == "text.embed_tokens" and module.weight.dtype == torch.bfloat16:
            layer = cpu_kernels.KernelEmbedding(module.weight.data)
        else:
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    # the vision tower runs on float32 activations (its weights stay bf16, widened by the kernels):
    # bf16 layer norms, GELUs and sums are emulated here, slower than float32 ones and as many again
    for module in model.vision.modules():
        if isinstance(module, (nn.LayerNorm, nn.Embedding)):
            module.float()


def quantizable(path: str, module: nn.Module) -> bool:
    """Quantize the text decoder's linear layers and the tied embedding; keep SigLIP and the projector exact."""
    return path.startswith("text.") and isinstance(module, (nn.Linear, nn.Embedding))


@dataclass
class Greedy:
    ids: torch.Tensor  # on the device, fed to the next decode step
    host: torch.Tensor  # the same ids on the host (being copied on CUDA)
    done: object  # CUDA event marking the copy, None elsewhere


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def check_settings(cls, dtype: str | None = None, device: str | None = None, quantize: int | None = None,
                       group_size: int = 64) -> None:
        super().check_settings(dtype, device, quantize, group_size)
        pick_device(device)

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, device: str | None = None,
                 quantize: int | None = None, group_size: int = 64):
        """dtype None: pick_dtype's choice for the device; device None: pick_device's."""
        self.check_settings(dtype, device, quantize, group_size)
        self._device = pick_device(device)
        self.device = str(self._device)
        self.pipelined = self._device.type == "cuda"  # kernels run ahead of the host only on CUDA
        self.dtype = pick_dtype(dtype, self._device)
        self._dtype = DTYPES[self.dtype]
        self.config = checkpoint.config
        stored_q = self.config.quantization
        if stored_q:
            # a folder written by convert --quantize: MLX's packing, requantized for torch's kernels
            quantize, group_size = int(stored_q["bits"]), int(stored_q["group_size"])
            if quantize not in (4, 8):
                raise CheckpointError(f"config.json: quantization bits {quantize} unsupported (4 or 8)")
        self.quantize = quantize
        self._bits, self._group_size = quantize, group_size
        # built on "meta": no memory until each parameter is assigned its loaded tensor
        with torch.device("meta"):
            self.model = PaliGemma(self.config)
        self._quantized = {p for p, m in self.model.named_modules() if quantize and quantizable(p, m)}
        # this CPU emulates bfloat16: bf16, int8 and int4 weights stream through our kernels instead
        self.kernels = self._device.type == "cpu" and not cpu_has_fast_bf16() and cpu_kernels_available()
        if self._device.type == "cpu":
            keep_freed_memory()
        # no_grad, not inference_mode: inference tensors could not be saved for a LoRA backward pass
        with torch.no_grad():
            self._load(checkpoint, bool(stored_q))
        self.model.eval()
        if self.kernels:
            use_cpu_kernels(self.model)
        else:
            # int8 layers off torch's int8 kernel for many rows where a dense product is fast
            rows = int8_dense_rows(self._device, self._dtype)
            for module in self.model.modules():
                if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
                    module.dense_rows = rows

    def _load(self, checkpoint: Checkpoint, stored_q: bool) -> None:
        expected = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        loaded: set[str] = set()
        tensors = checkpoint.tensors
        with contextlib.ExitStack() as stack:
            handles = {}

            def read(info: TensorInfo) -> torch.Tensor:
                if info.file not in handles:
                    try:
                        handles[info.file] = stack.enter_context(open(info.file, "rb"))
                    except OSError as e:
                        raise CheckpointError(f"{info.file.name}: cannot be read ({e.strerror})") from None
                return read_tensor(handles[info.file], info)

            for info in tensors.values():
                module_path, _, attr = info.name.rpartition(".")
                if module_path in self._quantized and stored_q and attr in ("scales", "biases"):
                    continue  # read with their packed weight below
                if info.name not in expected:
                    raise CheckpointError(f"unexpected tensor {info.stored_name} in {info.file.name}")
                if module_path in self._quantized:
                    if stored_q:
                        layer = self._mlx_quantized(module_path, info, read, tensors)
                    else:
                        w = self._checked(info, sanitize(info.name, read(info), self._dtype), expected[info.name])
                        layer = self._quantize_layer(module_path, w.to(self._device))
                        del w
                    parent, _, child = module_path.rpartition(".")
                    setattr(self.model.get_submodule(parent), child, layer)
                else:
                    w = self._checked(info, sanitize(info.name, read(info), self._dtype), expected[info.name])
                    parent, _, _ = info.name.rpartition(".")
                    setattr(self.model.get_submodule(parent), attr, nn.Parameter(w.to(self._device), requires_grad=False))
                loaded.add(info.name)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]} in the checkpoint")

    @staticmethod
    def _checked(info: TensorInfo, w: torch.Tensor, shape: tuple) -> torch.Tensor:
        if tuple(w.shape) != shape:
            raise CheckpointError(f"tensor {info.stored_name} has shape {list(w.shape)}, expected {list(shape)}")
        if not w.dtype.is_floating_point:
            raise CheckpointError(f"tensor {info.stored_name} is {info.dtype}, expected floating point weights")
        return w

    def _quantize_layer(self, path: str, w: torch.Tensor) -> nn.Module:
        if path == "text.embed_tokens":
            return QuantizedEmbedding(*int8_per_channel(w), self._dtype)
        if self.kernels and self._bits == 4:
            # the same groups and rounding as torch's int4 layers, in our kernels' layout: w = q * s + (zero - 8 s)
            check_int4(path, *w.shape, self._group_size, w.device)  # the same shape rules on every CPU
            q, scales, zeros = int4_groups(w, self._group_size)
            return cpu_kernels.KernelLinear.int4(q, scales, zeros - 8 * scales)
        return QuantizedLinear.from_weight(w, self._bits, self._group_size, self._quantized_dtype(), path)

    def _quantized_dtype(self) -> torch.dtype:
        """The dtype torch's int4 and int8 kernels run in: the model's, but bf16 for int4 on an x86 CPU in
        float32, where torch's int4 kernel is scalar code for float32 (one 9216 x 2304 layer on the AMD
        EPYC Zen 3, AVX2, no bf16: 27 against 1.8 ms for one row, 6.05 s against 0.22 s for 261). Rounding
        the inputs to bf16 (2^-9 of each) is far below the 4-bit weights' own error."""
        if self._bits == 4 and self._device.type == "cpu" and self._dtype == torch.float32 and cpu_info().x86:
            return torch.bfloat16
        return self._dtype

    def _mlx_quantized(self, path: str, info: TensorInfo, read, tensors: dict) -> nn.Module:
        """Unpack one MLX-quantized layer (packed weight, scales, biases) and requantize it for torch."""
        shape = dict(self.model.get_submodule(path).named_parameters())["weight"].shape
        N, K = shape
        bits, g = self._bits, self._group_size
        parts = {}
        for attr, want in (("scales", (N, K // g)), ("biases", (N, K // g))):
            aux = tensors.get(f"{path}.{attr}")
            if aux is None:
                raise CheckpointError(f"missing tensor {path}.{attr} in the checkpoint (for {info.stored_name})")
            parts[attr] = self._checked(aux, read(aux), want)
        packed = read(info)
        if info.dtype != "U32" or tuple(packed.shape) != (N, K * bits // 32):
            raise CheckpointError(
                f"tensor {info.stored_name} is {info.dtype} {list(packed.shape)}, expected U32 {[N, K * bits // 32]} "
                f"({bits}-bit MLX packing)"
            )
        packed = packed.to(self._device)
        scales, biases = (parts[a].to(self._device).float() for a in ("scales", "biases"))
        if path != "text.embed_tokens" and bits == 4 and g in (32, 64, 128, 256):
            # same groups: w = s * q + b is tinygemm's (q - 8) * s + (b + 8 s), so no rounding at all
            if self.kernels:
                return cpu_kernels.KernelLinear.int4(mlx_unpack(packed, 4), scales, biases)
            return QuantizedLinear.from_int4(mlx_unpack(packed, 4), scales, biases + 8 * scales, g, self._quantized_dtype())
        w = mlx_dequantize(packed, scales, biases, bits)
        return self._quantize_layer(path, w)

    @torch.inference_mode()
    def image_features(self, pixel_values: np.ndarray) -> torch.Tensor:
        # on CPUs that emulate bf16 the vision tower's activations are float32 (use_cpu_kernels)
        dtype = torch.float32 if self.kernels else self._dtype
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self._device, dtype)
        return self.model.image_features(pixels)

    def stack_features(self, rows: list) -> torch.Tensor:
        return torch.cat(rows, dim=0)

    def _masks(self, pad, start, length, total, prefix_len) -> dict:
        masks = attention_masks(pad, start, length, total, prefix_len, self.config.text.sliding_window)
        return {k: (None if m is None else torch.from_numpy(m).to(self._device)) for k, m in masks.items()}

    def _forward(self, input_ids, features, pad, prefix_len, cache, last_only) -> torch.Tensor:
        B, T = input_ids.shape
        h = self.model.embed(self._ids(input_ids), features, self._ids(pad))
        masks = self._masks(pad, 0, T, T, prefix_len)
        return self.model(h, masks, cache, 0, last_only)

    @torch.inference_mode()
    def prefill(self, input_ids, features, pad, prefix_len):
        # bf16 products are emulated on CPUs without bf16 instructions: keep keys and values in float32 there
        # float32 on every CPU: decoding reads the cache in place, and on the CPU only float32 products
        # take its strided views without copying them (bf16 ones go through oneDNN, which copies them)
        cache = make_cache(self.config.text.num_hidden_layers, torch.float32 if self._device.type == "cpu" else None)
        logits = self._forward(input_ids, features, pad, prefix_len, cache, last_only=True)
        return State(cache, input_ids.shape[1], pad, prefix_len), logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, state: State, token_ids) -> torch.Tensor:
        ids = token_ids.ids if isinstance(token_ids, Greedy) else self._ids(token_ids)
        h = self.model.embed(ids[:, None], None, None)
        masks = self._masks(state.pad, state.offset, 1, state.offset + 1, state.prefix_len)
        logits = self.model(h, masks, state.cache, state.offset, last_only=True)
        state.offset += 1
        return logits[:, -1, :]

    @torch.inference_mode()
    def greedy(self, logits: torch.Tensor, vocab_limit: int, banned: list[int] | None) -> "Greedy":
        logits = logits[:, :vocab_limit]
        if banned is not None:
            logits = logits.clone()
            logits[:, banned] = -torch.inf
        ids = logits.argmax(dim=-1)
        if self._device.type != "cuda":
            return Greedy(ids, ids, None)
        # copy the ids out before the next step is queued, and wait only for that copy
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Greedy(ids, host, done)

    def host_ids(self, handle: "Greedy") -> np.ndarray:
        if handle.done is not None:
            handle.done.synchronize()
        return handle.host.numpy().astype(np.int64)

    def to_numpy(self, logits) -> np.ndarray:
        return _to_numpy(logits) if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float32)

    @torch.inference_mode()
    def forward_logits(self, input_ids, features, prefix_len):
        pad = np.zeros(input_ids.shape[0], dtype=np.int64)
        return _to_numpy(self._forward(input_ids, features, pad, prefix_len, None, last_only=False)[0])

    def _ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self._device)

    def add_lora(self, config, weights) -> None:
        lora.add_lora(self.model, config, weights)

    def lora_weights(self) -> dict[str, np.ndarray]:
        return lora.lora_weights(self.model)

    def loss_sums(self, batch) -> tuple[float, int]:
        self.model.eval()
        with torch.no_grad():
            loss, n = lora.loss_sums(self, batch)
        return float(loss), n

    def trainer(self, lr: float, weight_decay: float = 0.0) -> lora.TorchTrainer:
        if self.quantize == 4 and not self.kernels:
            # torch's int4 kernels have no derivative and their tiled layout cannot be dequantized back;
            # our CPU kernels' int4 layers can (the backward is their transposed product, gemm_t)
            raise SettingError("training over a 4-bit base runs on the mlx backend, or on torch where our CPU "
                               "kernels run (x86 with AVX2, no native bf16); here use quantize=8")
        return lora.TorchTrainer(self, lr, weight_decay)

    def peak_memory(self) -> int:
        if self._device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self._device))
        return super().peak_memory()

    def reset_peak_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)


STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U32": torch.uint32,
                 "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "I64": torch.int64}


def read_tensor(f, info: TensorInfo) -> torch.Tensor:
    """One tensor of a safetensors file, read with plain reads into a fresh CPU tensor.

    Not a memory map: mapped file pages count as resident memory on top of the weights, so a
    mapped bf16 checkpoint would add its whole size to the peak.
    """
    dtype = STORED_DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"tensor {info.stored_name} has unsupported dtype {info.dtype}")
    out = torch.empty(info.shape, dtype=dtype)
    if out.numel() * out.element_size() != info.nbytes:
        raise CheckpointError(f"tensor {info.stored_name}: {info.nbytes} bytes stored for shape {list(info.shape)}")
    f.seek(info.offset)
    if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != info.nbytes:
        raise CheckpointError(f"{info.file.name}: truncated file, tensor {info.stored_name} runs past the end")
    return out


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()
