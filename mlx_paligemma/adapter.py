"""LoRA adapters in PEFT's layout for transformers' PaliGemma, and merging one into a checkpoint.

A LoRA adapter adds `scaling * B @ A` to chosen linear layers of the text decoder, A (r, in) and
B (out, r), scaling = alpha / r (alpha / sqrt(r) with rsLoRA). On disk it is what PEFT's
`save_pretrained` writes for `PaliGemmaForConditionalGeneration` (transformers 5.x module paths):

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_rslora, ...
    adapter_model.safetensors    base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight

so an adapter trained here loads with `PeftModel.from_pretrained` and one trained with PEFT loads
here. Reading also accepts transformers 4.x paths (`base_model.model.language_model.model.layers...`)
and PEFT's adapter-named keys (`lora_A.default.weight`). Inside the package the names are canonical:
`text.layers.N.self_attn.q_proj.lora_A.weight`.

This module is framework-free: weights cross it as float32 numpy arrays.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import (
    COPIED_FILES, bf16_bytes, bf16_values, canonical_name, expected_shapes, open_checkpoint, read_header, write_header,
)
from .errors import CheckpointError, OutputError, SettingError
from .files import atomic_folder

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# the --targets short names and the module each one is, inside text.layers.N
TARGETS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
DEFAULT_TARGETS = tuple(TARGETS)
_LAYER = re.compile(r"^text\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.(lora_[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # short names, keys of TARGETS
    dropout: float = 0.0
    rslora: bool = False
    base_model: str = ""
    extra: dict = field(default_factory=dict)  # other adapter_config.json fields, kept when we rewrite it

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self) -> "LoraConfig":
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SettingError(f"rank must be a whole number >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise SettingError(f"alpha must be a number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise SettingError(f"dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise SettingError(f"targets must be some of {','.join(TARGETS)}, got {','.join(self.targets) or 'none'}")
        return self

    def module_paths(self, num_layers: int) -> list[str]:
        """Canonical paths of the adapted layers, in layer order."""
        return [f"text.layers.{i}.{TARGETS[t]}" for i in range(num_layers) for t in self.targets]

    def peft_json(self) -> dict:
        names = "|".join(TARGETS[t].split(".")[1] for t in self.targets)
        out = dict(self.extra)
        out.update({
            "peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "use_rslora": self.rslora, "use_dora": False, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": self.base_model,
            # a regex, fully matched by PEFT: a list of names would also match SigLIP's q/k/v_proj
            "target_modules": rf".*language_model.*\.({names})",
            "auto_mapping": {"base_model_class": "PaliGemmaForConditionalGeneration",
                             "parent_library": "transformers.models.paligemma.modeling_paligemma"},
        })
        return out


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    LoraConfig(targets=targets).validate()
    return targets


def init_weights(config: LoraConfig, shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    shapes: module path -> (out, in). Drawn here once, so both backends start from the same numbers.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for path, (n_out, n_in) in shapes.items():
        bound = 1.0 / math.sqrt(n_in)
        weights[f"{path}.lora_A.weight"] = rng.uniform(-bound, bound, (config.r, n_in)).astype(np.float32)
        weights[f"{path}.lora_B.weight"] = np.zeros((n_out, config.r), np.float32)
    return weights


def peft_key(name: str) -> str:
    """Canonical `text.layers.0.self_attn.q_proj.lora_A.weight` -> PEFT's key for transformers 5.x."""
    return "base_model.model.model.language_model." + name[len("text."):]


def canonical_key(key: str) -> str | None:
    """A PEFT key (4.x or 5.x paths, with or without an adapter name) -> canonical, or None if not LoRA."""
    m = _KEY.match(key)
    if m is None:
        return None
    module = canonical_name(m.group(1) + ".weight")
    module = module[: -len(".weight")] if module else m.group(1)
    return f"{module}.{m.group(2)}.weight"


def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """A PEFT LoRA adapter folder -> (config, canonical name -> float32 array)."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: an adapter is a folder with {CONFIG_FILE} and {ADAPTER_FILE}")
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} (not a PEFT LoRA adapter folder)")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{folder / CONFIG_FILE}: not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder / CONFIG_FILE}: peft_type must be LORA, got {raw.get('peft_type') if isinstance(raw, dict) else raw!r}")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if raw.get(key, ok) not in (ok, None):
            raise CheckpointError(f"{folder / CONFIG_FILE}: {key}={raw[key]!r} is not supported (only plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise CheckpointError(f"{folder / CONFIG_FILE}: {key} is not supported (one rank and alpha for every layer)")
    if raw.get("modules_to_save"):
        raise CheckpointError(f"{folder / CONFIG_FILE}: modules_to_save is not supported (LoRA layers only)")
    weights = _read_safetensors(folder / ADAPTER_FILE)
    canonical: dict[str, np.ndarray] = {}
    for key, w in weights.items():
        name = canonical_key(key)
        if name is None:
            raise CheckpointError(f"{folder / ADAPTER_FILE}: unexpected tensor {key} (only lora_A/lora_B weights)")
        module = name.rsplit(".", 2)[0]
        if not _LAYER.match(module):
            raise CheckpointError(
                f"{folder / ADAPTER_FILE}: {key} adapts {module}; only the text decoder's attention and MLP layers are supported"
            )
        canonical[name] = w.astype(np.float32)
    modules = sorted({n.rsplit(".", 2)[0] for n in canonical})
    ranks = set()
    for m in modules:
        a, b = canonical.get(f"{m}.lora_A.weight"), canonical.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise CheckpointError(f"{folder / ADAPTER_FILE}: {m} has only one of lora_A and lora_B")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{folder / ADAPTER_FILE}: {m} has lora_A {list(a.shape)} and lora_B {list(b.shape)}")
        ranks.add(a.shape[0])
    if not modules:
        raise CheckpointError(f"{folder / ADAPTER_FILE}: no LoRA weights")
    r = raw.get("r", 8)
    if ranks != {r}:
        raise CheckpointError(f"{folder / CONFIG_FILE}: r is {r} but the weights have rank {sorted(ranks)}")
    targets = tuple(t for t in TARGETS if any(_LAYER.match(m).group(2) == TARGETS[t] for m in modules))
    extra = {k: v for k, v in raw.items() if k not in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules")}
    config = LoraConfig(r=r, alpha=float(raw.get("lora_alpha", 8)), targets=targets,
                        dropout=float(raw.get("lora_dropout") or 0.0), rslora=bool(raw.get("use_rslora", False)),
                        base_model=str(raw.get("base_model_name_or_path") or ""), extra=extra)
    return config, canonical


def write_adapter(folder: Path, config: LoraConfig, weights: dict[str, np.ndarray], extra_files: dict[str, bytes] | None = None) -> None:
    """Write an adapter folder in PEFT's layout, atomically (a temporary folder renamed into place)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        save_file({peft_key(k): np.ascontiguousarray(v, np.float32) for k, v in sorted(weights.items())},
                  str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config.peft_json(), indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """float tensors of a small safetensors file as numpy (bf16 widened to float32)."""
    header = read_header(path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    data = path.read_bytes()[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = _decode(data[start:end], info["dtype"], tuple(info["shape"]), f"{path.name}: {name}")
    return out


def _decode(raw: bytes, dtype: str, shape: tuple, what: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_values(raw).reshape(shape)
    if dtype in ("F32", "F16"):
        return np.frombuffer(raw, np.float32 if dtype == "F32" else np.float16).reshape(shape)
    raise CheckpointError(f"{what} is {dtype}; adapters hold float weights")


def _encode(w: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return bf16_bytes(w)
    return np.ascontiguousarray(w, np.float32 if dtype == "F32" else np.float16).tobytes()


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write base + adapter as a plain checkpoint folder: W' = W + scaling * B @ A on each adapted layer.

    Every tensor keeps its stored name, dtype and file; the sum is computed in float32 and rounded
    once to the stored dtype. Config, tokenizer and other small files are copied. Nothing appears
    at `out` until the folder is complete.
    """
    checkpoint = open_checkpoint(base)
    if checkpoint.config.quantization:
        raise SettingError(f"{base}: a quantized checkpoint cannot take a merged adapter; merge into the unquantized one")
    config, weights = read_adapter(adapter)
    check_fits(weights, expected_shapes(checkpoint.config))
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    deltas = {n.rsplit(".", 2)[0] + ".weight" for n in weights}
    with atomic_folder(out) as tmp:
        for file in checkpoint.files:
            infos = sorted((t for t in checkpoint.tensors.values() if t.file == file), key=lambda t: t.offset)
            header_all = read_header(file)
            dropped = {k for k in header_all if k != "__metadata__"} - {t.stored_name for t in infos}
            header, offset = {"__metadata__": header_all.get("__metadata__") or {"format": "pt"}}, 0
            for t in infos:
                header[t.stored_name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            for k in sorted(dropped):  # tensors we ignore on loading (SigLIP's head, lm_head) are kept as they were
                info = header_all[k]
                size = info["data_offsets"][1] - info["data_offsets"][0]
                header[k] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
                offset += size
            with open(file, "rb") as src, open(tmp / file.name, "wb") as dst:
                write_header(dst, header)
                (n,) = struct.unpack("<Q", src.read(8))
                for t in infos:
                    src.seek(t.offset)
                    raw = src.read(t.nbytes)
                    if t.name in deltas:
                        module = t.name[: -len(".weight")]
                        a, b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
                        w = _decode(raw, t.dtype, t.shape, t.stored_name).astype(np.float32)
                        raw = _encode(w + np.float32(config.scaling) * (b @ a), t.dtype)
                    dst.write(raw)
                for k in sorted(dropped):
                    start, end = header_all[k]["data_offsets"]
                    src.seek(8 + n + start)
                    dst.write(src.read(end - start))
        for name in (*COPIED_FILES, "config.json", "model.safetensors.index.json"):
            if (checkpoint.folder / name).is_file():
                shutil.copyfile(checkpoint.folder / name, tmp / name)
    return out


def check_fits(weights: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """Every adapted layer exists in the base with (out, in) = (B rows, A columns); shapes from `expected_shapes`."""
    for name, w in weights.items():
        module, kind = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        base = shapes.get(module + ".weight")
        if base is None:
            raise CheckpointError(f"the adapter adapts {module}, which the base model does not have")
        n_out, n_in = base
        if (kind == "lora_A" and w.shape[1] != n_in) or (kind == "lora_B" and w.shape[0] != n_out):
            raise CheckpointError(
                f"the adapter's {name} is {list(w.shape)}, which does not fit {module} ({n_out}x{n_in}) of the base model"
            )
