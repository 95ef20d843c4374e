"""Checkpoint discovery: a local folder or a Hugging Face repo id, safetensors only.

This module knows file names and tensor names, never tensor values: each backend reads the
tensors itself (memory-mapped, straight into its dtype). What it guarantees to a backend:
the list of safetensors files, every tensor's canonical name, dtype and shape, checked against
the config before a byte of weights is read. The folders we write ourselves (merge, full-size
random checkpoints) share its safetensors header writer and bfloat16 rounding.
"""

from __future__ import annotations

import json
from collections import Counter
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PaliGemmaConfig
from .errors import CheckpointError

DEFAULT_MODEL = "google/paligemma2-3b-mix-224"
WEIGHT_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors name -> ours
# the small files a loader reads next to the weights, copied with them into a converted or merged folder
COPIED_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
)
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str  # canonical name (see canonical_name)
    stored_name: str  # name in the file
    file: Path
    dtype: str  # safetensors dtype string: F32, BF16, F16, U32, ...
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in the file
    nbytes: int = 0


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a repo id fetched (or found in the cache) with huggingface_hub."""
    p = Path(os.path.expanduser(str(path_or_repo)))
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: a checkpoint is a folder, not a file")
        return p
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such checkpoint folder (and not a Hugging Face repo id like owner/name)")
    return _download(name)


def _download(repo_id: str) -> Path:
    """The repo's snapshot folder, fetched or from the cache; never waits on the network for long.

    The repo's current commit is asked first, with a timeout (HF_HUB_ETAG_TIMEOUT, 10 s unless
    set): snapshot_download asks without one, and on a network that drops packets it would wait
    for minutes. Given the commit, snapshot_download skips that call; without one (offline, or the
    hub unreachable) only the cache is used.
    """
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{repo_id}: huggingface_hub is not installed, so repo ids cannot be fetched") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    revision, error = None, None
    if not offline:
        try:
            # HF_TOKEN and HF_HOME are read by huggingface_hub itself
            revision = HfApi().repo_info(repo_id, timeout=timeout).sha
        except Exception as e:  # kept: reported only if the cache does not have the repo either
            error = e
    try:
        return Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=list(WEIGHT_PATTERNS),
            local_files_only=revision is None, etag_timeout=timeout,
        ))
    except LocalEntryNotFoundError as e:
        error = error or e
    except Exception as e:
        error = e
    how = (
        f"download it on a connected machine with `hf download {repo_id}` (accept the licence on the hub and "
        "set HF_TOKEN first), then copy the folder here and pass its path"
    )
    if isinstance(error, GatedRepoError):
        raise CheckpointError(f"{repo_id}: gated repo; accept its licence on the hub and set HF_TOKEN") from None
    if isinstance(error, RepositoryNotFoundError):
        raise CheckpointError(f"{repo_id}: no such repo on the hub (or it is private and HF_TOKEN is not set)") from None
    if offline:
        raise CheckpointError(f"{repo_id}: not in the local cache and HF_HUB_OFFLINE is set; {how}") from None
    if revision is None:  # network errors come in many classes
        raise CheckpointError(f"{repo_id}: not in the local cache and the hub cannot be reached; {how}") from None
    raise CheckpointError(f"{repo_id}: could not fetch from the hub ({type(error).__name__}); {how}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: from the shard index when there is one, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} named in the index is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle weights ({pickles[0]}); pickle files are never loaded, convert to safetensors"
            )
        raise CheckpointError(f"{folder}: no *.safetensors weight files")
    return files


def write_header(f, header: dict) -> None:
    """A safetensors header at f's position: its length (8 bytes, little-endian), then the JSON
    padded with spaces to a multiple of 8 bytes (so that the tensors after it stay aligned)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)


def bf16_bytes(x: np.ndarray) -> bytes:
    """float32 values -> their bfloat16 bytes, rounded to nearest even (as torch casts)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def bf16_values(raw: bytes) -> np.ndarray:
    """bfloat16 bytes -> float32 values (exact), flat."""
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path.name}: corrupt safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header") from None
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            ok = isinstance(dtype, str) and all(_count(v) for v in (start, end, *shape)) and start <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path.name}: corrupt entry for tensor {name}")
        if end > data_len:
            raise CheckpointError(f"{path.name}: truncated file, tensor {name} runs past the end")
        itemsize = DTYPE_BYTES.get(dtype)
        if itemsize is not None and end - start != itemsize * math.prod(shape):
            raise CheckpointError(f"{path.name}: corrupt entry for tensor {name} (its size does not match its shape)")
    return header


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def canonical_name(stored: str) -> str | None:
    """Map a stored tensor name to our canonical name, or None for a tensor we drop.

    Canonical names are `vision.<siglip name>`, `projector.<name>` and `text.<gemma name>`.
    Accepted layouts: the hub's (`language_model.model.layers...`, `vision_tower.vision_model...`),
    transformers 5.x save_pretrained's (`vision_tower.encoder...`, `model.language_model...`),
    and our own converted folders (already canonical).
    """
    name = stored
    if name.startswith("model."):
        name = name[len("model."):]
    for prefix, to in (
        ("vision_tower.vision_model.", "vision."),
        ("vision_tower.", "vision."),
        ("multi_modal_projector.linear.", "projector."),
        ("multi_modal_projector.", "projector."),
        ("language_model.model.", "text."),
        ("language_model.", "text."),
    ):
        if name.startswith(prefix):
            name = to + name[len(prefix):]
            break
    if name.startswith("vision.head."):
        return None  # SigLIP's pooling head is not part of PaliGemma (vision_use_head=False)
    if name in ("lm_head.weight", "text.lm_head.weight"):
        return None  # the output head is tied to the embedding
    if name.startswith(("vision.", "projector.", "text.")):
        return name
    return stored  # unknown: kept so that the strict check names it


def scan(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by canonical name; duplicates are an error."""
    tensors: dict[str, TensorInfo] = {}
    for file in safetensors_files(folder):
        header = read_header(file)
        with open(file, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]  # the bytes after the 8-byte length and the header
        for stored, info in header.items():
            if stored == "__metadata__":
                continue
            name = canonical_name(stored)
            if name is None:
                continue
            if name in tensors:
                raise CheckpointError(f"{file.name}: tensor {stored} appears twice in the checkpoint")
            start, end = info["data_offsets"]
            tensors[name] = TensorInfo(name, stored, file, info["dtype"], tuple(info["shape"]), data_start + start, end - start)
    return tensors


def expected_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape as stored (PyTorch layout), for an unquantized checkpoint."""
    v, t = config.vision, config.text
    shapes: dict[str, tuple[int, ...]] = {
        "vision.embeddings.patch_embedding.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
        "vision.embeddings.patch_embedding.bias": (v.hidden_size,),
        "vision.embeddings.position_embedding.weight": (v.num_patches, v.hidden_size),
        "vision.post_layernorm.weight": (v.hidden_size,),
        "vision.post_layernorm.bias": (v.hidden_size,),
        "projector.weight": (config.projection_dim, v.hidden_size),
        "projector.bias": (config.projection_dim,),
        "text.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "text.norm.weight": (t.hidden_size,),
    }
    for i in range(v.num_hidden_layers):
        p = f"vision.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (v.hidden_size, v.hidden_size)
            shapes[p + f"self_attn.{n}.bias"] = (v.hidden_size,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{n}.weight"] = (v.hidden_size,)
            shapes[p + f"{n}.bias"] = (v.hidden_size,)
        shapes[p + "mlp.fc1.weight"] = (v.intermediate_size, v.hidden_size)
        shapes[p + "mlp.fc1.bias"] = (v.intermediate_size,)
        shapes[p + "mlp.fc2.weight"] = (v.hidden_size, v.intermediate_size)
        shapes[p + "mlp.fc2.bias"] = (v.hidden_size,)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.is_gemma2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t.num_hidden_layers):
        p = f"text.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, t.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv, t.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv, t.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (t.hidden_size, q)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, t.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, t.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (t.hidden_size, t.intermediate_size)
        for n in norms:
            shapes[p + f"{n}.weight"] = (t.hidden_size,)
    return shapes


def check_tensors(tensors: dict[str, TensorInfo], config: PaliGemmaConfig) -> None:
    """Strict check of names and shapes; the error names the first tensor at fault."""
    expected = expected_shapes(config)
    if config.quantization:
        return  # quantized folders are written by our converter; the backend checks them when loading
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name} in the checkpoint")
        if info.shape != shape and not (name.endswith("patch_embedding.weight") and info.shape == _ohwi(shape)):
            raise CheckpointError(f"tensor {info.stored_name} has shape {list(info.shape)}, expected {list(shape)}")
    for name, info in tensors.items():
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {info.stored_name} in {info.file.name}")


def _ohwi(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A conv weight's shape in MLX's O,H,W,I layout (what our converted folders store)."""
    return (shape[0], shape[2], shape[3], shape[1])


def plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Names in the order given, cut into groups of at most `limit` bytes (a bigger tensor gets a file alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, size in sizes.items():
        if current and total + size > limit:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    if current:
        shards.append(current)
    return shards


def shard_files(count: int) -> list[str]:
    """The weight files of a checkpoint in `count` shards, named as transformers names them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@dataclass
class Checkpoint:
    folder: Path
    config: PaliGemmaConfig
    tensors: dict[str, TensorInfo]

    @property
    def stored_dtype(self) -> str:
        """The float dtype most tensors are stored in (quantized ints aside): float32, bfloat16 or float16."""
        counts = Counter(FLOAT_DTYPES[t.dtype] for t in self.tensors.values() if t.dtype in FLOAT_DTYPES)
        return counts.most_common(1)[0][0] if counts else "float32"

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def open_checkpoint(path_or_repo: str | os.PathLike) -> Checkpoint:
    """Resolve, read config.json, scan and check every tensor header. Reads no weights."""
    folder = resolve(path_or_repo)
    config = PaliGemmaConfig.from_file(folder / "config.json")
    tensors = scan(folder)
    check_tensors(tensors, config)
    return Checkpoint(folder, config, tensors)
