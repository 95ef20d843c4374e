"""PaliGemma configuration read from a checkpoint's config.json.

Each dataclass keeps only the fields it declares; everything derived is computed in one place
(`PaliGemmaConfig.from_dict`). The text model family (Gemma 1 or Gemma 2) is decided here, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

SUPPORTED_TEXT_TYPES = ("gemma", "gemma2")


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    model_type: str = "gemma2"
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 257216
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    # Gemma 2 only; None for Gemma 1
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        # Gemma 2 scales by query_pre_attn_scalar ** -0.5, which is not always head_dim (28B: 144)
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(scalar) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"


@dataclass
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 257152
    projection_dim: int = 2304
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    quantization: dict | None = None
    demo: bool = False  # the built-in random-weight checkpoint (mlx_paligemma.demo)

    MLX_GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports

    def check_group_size(self, group_size: int) -> None:
        """Each quantized text matrix is cut into groups along its input width: the widths must divide."""
        from .errors import SettingError

        if isinstance(group_size, bool) or group_size not in self.MLX_GROUP_SIZES:
            raise SettingError(f"group size must be one of 32, 64, 128, got {group_size!r}")
        t = self.text
        for what, width in (("hidden", t.hidden_size), ("intermediate", t.intermediate_size),
                            ("attention", t.num_attention_heads * t.head_dim)):
            if width % group_size:
                raise SettingError(f"group size {group_size} does not divide the text model's {what} width {width}; try 32 or 64")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @classmethod
    def from_dict(cls, d: dict) -> "PaliGemmaConfig":
        if d.get("model_type") != "paligemma":
            raise CheckpointError(
                f"unsupported model type {d.get('model_type')!r} in config.json: only 'paligemma' checkpoints load"
            )
        vd = dict(d.get("vision_config") or {})
        td = dict(d.get("text_config") or {})
        text_type = td.get("model_type", "gemma")
        if text_type not in SUPPORTED_TEXT_TYPES:
            raise CheckpointError(
                f"unsupported text model type {text_type!r}: expected one of {', '.join(SUPPORTED_TEXT_TYPES)}"
            )
        # Defaults for fields that some checkpoints leave out follow transformers' PaliGemma 1 defaults.
        vision = VisionConfig(**_known_fields(VisionConfig, vd))
        td.setdefault("model_type", text_type)
        td.setdefault("vocab_size", d.get("vocab_size", 257216))
        if "head_dim" not in td and "hidden_size" in td and "num_attention_heads" in td:
            td["head_dim"] = td["hidden_size"] // td["num_attention_heads"]
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
        if "rope_theta" in rope and "rope_theta" not in td:
            td["rope_theta"] = rope["rope_theta"]
        text = TextConfig(**_known_fields(TextConfig, td))
        if text_type == "gemma":
            # Gemma 1 has no softcaps and no sliding window, and scales attention by head_dim ** -0.5
            text.query_pre_attn_scalar = None
            text.attn_logit_softcapping = None
            text.final_logit_softcapping = None
            text.sliding_window = None
            text.layer_types = ["full_attention"] * text.num_hidden_layers
        else:
            if text.query_pre_attn_scalar is None:
                text.query_pre_attn_scalar = text.head_dim
            if not text.layer_types:
                # Gemma 2 alternates, starting with a sliding layer (transformers' default layer_types)
                text.layer_types = [
                    "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(text.num_hidden_layers)
                ]
        if len(text.layer_types) != text.num_hidden_layers:
            raise CheckpointError("config.json: text_config.layer_types does not have one entry per layer")
        image_token = d.get("image_token_index", d.get("image_token_id", 256000))
        return cls(
            vision=vision,
            text=text,
            image_token_index=int(image_token),
            projection_dim=int(d.get("projection_dim", vd.get("projection_dim", text.hidden_size))),
            pad_token_id=int(td.get("pad_token_id", d.get("pad_token_id", 0)) or 0),
            eos_token_id=_first(td.get("eos_token_id", d.get("eos_token_id", 1))),
            bos_token_id=_first(td.get("bos_token_id", d.get("bos_token_id", 2))),
            quantization=d.get("quantization"),
            demo=bool(d.get("demo", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "PaliGemmaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no config.json in the checkpoint folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{path}: unexpected value in config ({e})") from None


def _first(v) -> int:
    if isinstance(v, list):
        v = v[0]
    return int(v)
