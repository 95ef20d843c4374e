"""PaliGemma configuration read from a checkpoint's config.json (and generation_config.json).

A field config.json leaves out gets the value transformers gives it, from one table
(CLASS_DEFAULTS, per class transformers builds); nothing is derived from other fields. Each
dataclass keeps only the fields it declares; everything derived is computed in one place
(`PaliGemmaConfig.from_dict`). The text model family (Gemma 1 or Gemma 2) is decided here, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

SUPPORTED_TEXT_TYPES = ("gemma", "gemma2")

# big_vision's VQ-VAE mask decoder (vae-oid.npz), the same for every PaliGemma: what both backends build
GRID = 4  # an object's 16 <seg> codes are a 4x4 grid
HIDDEN = 128  # channels of the first conv and the residual blocks
UP_CHANNELS = (128, 64, 32, 16)  # output channels of the four stride-2 transposed convs
MASK_SIZE = 64  # 4 * 2**4
NUM_CODES = 128

# The value transformers (5.x) gives each field a config.json leaves out: the defaults of the class
# that `model_type` names (transformers' GemmaConfig, Gemma2Config, SiglipVisionConfig), and
# PaliGemmaConfig's own. Nothing is derived from other fields: Gemma's head_dim is not hidden / heads
# (PaliGemma 2 10B: 3584 / 16 = 224, but head_dim 256), and the hub's PaliGemma 2 configs omit it.
CLASS_DEFAULTS: dict[str, dict] = {
    "gemma": dict(  # GemmaConfig
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=10000.0,  # RotaryEmbeddingConfigMixin.default_theta
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    "gemma2": dict(  # Gemma2Config
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        layer_types=None,  # None: alternating, a sliding layer first (Gemma2Config.__post_init__)
    ),
    "siglip_vision_model": dict(  # SiglipVisionConfig
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
    ),
    "paligemma": dict(image_token_index=256000, projection_dim=2048),  # PaliGemmaConfig
}

# PaliGemmaConfig.sub_configs_defaults: what it builds when config.json has no text_config or no
# vision_config at all (an empty {} gets the plain class defaults above instead)
MISSING_SUBCONFIG: dict[str, dict] = {
    "text_config": dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                        num_attention_heads=8, num_key_value_heads=1, vocab_size=257152),
    "vision_config": dict(model_type="siglip_vision_model", intermediate_size=4096, hidden_size=1152,
                          patch_size=14, image_size=224, num_hidden_layers=27, num_attention_heads=16),
}


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _sub_config(d: dict, key: str, default_type: str) -> dict:
    """A sub-config's fields with every omitted one filled as transformers fills it."""
    given = d.get(key)
    if given is None:
        given = MISSING_SUBCONFIG[key]
    if not isinstance(given, dict):
        raise CheckpointError(f"config.json: {key} must be an object")
    model_type = given.get("model_type", default_type)
    if key == "text_config" and model_type not in SUPPORTED_TEXT_TYPES:
        raise CheckpointError(
            f"unsupported text model type {model_type!r}: expected one of {', '.join(SUPPORTED_TEXT_TYPES)}"
        )
    if key == "vision_config" and model_type != "siglip_vision_model":
        raise CheckpointError(f"unsupported vision model type {model_type!r}: expected siglip_vision_model")
    return {**CLASS_DEFAULTS[model_type], **given, "model_type": model_type}


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
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
    image_token_index: int
    projection_dim: int
    pad_token_id: int = 0
    # every id that ends generation, as transformers' generate takes them (see eos_ids)
    eos_token_ids: tuple[int, ...] = (1,)
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
    def from_dict(cls, d: dict, generation: dict | None = None) -> "PaliGemmaConfig":
        """config.json (and generation_config.json when the folder has one) -> the config transformers reads."""
        if d.get("model_type") != "paligemma":
            raise CheckpointError(
                f"unsupported model type {d.get('model_type')!r} in config.json: only 'paligemma' checkpoints load"
            )
        td = _sub_config(d, "text_config", "gemma")
        vd = _sub_config(d, "vision_config", "siglip_vision_model")
        top = {**CLASS_DEFAULTS["paligemma"], **d}
        # transformers moves rope_theta into rope_parameters, where a value already there wins
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            td["rope_theta"] = rope["rope_theta"]
        vision = VisionConfig(**_known_fields(VisionConfig, vd))
        text = TextConfig(**_known_fields(TextConfig, td))
        # transformers refuses these configs (validate_layer_type, Gemma2Config.validate_architecture)
        if td.get("layer_types") is not None and len(td["layer_types"]) != text.num_hidden_layers:
            raise CheckpointError("config.json: text_config.layer_types does not have one entry per layer")
        if text.is_gemma2 and text.hidden_size % text.num_attention_heads:
            raise CheckpointError(
                f"config.json: the text hidden size {text.hidden_size} is not a multiple of the "
                f"{text.num_attention_heads} attention heads"
            )
        if not text.is_gemma2:
            # Gemma 1 has no softcaps and no sliding window, and scales attention by head_dim ** -0.5
            text.query_pre_attn_scalar = None
            text.attn_logit_softcapping = None
            text.final_logit_softcapping = None
            text.sliding_window = None
            text.layer_types = ["full_attention"] * text.num_hidden_layers
        elif text.layer_types is None:
            text.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(text.num_hidden_layers)
            ]
        return cls(
            vision=vision,
            text=text,
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", top["image_token_index"]))),
            projection_dim=int(top["projection_dim"]),
            pad_token_id=int(td["pad_token_id"] if td.get("pad_token_id") is not None else d.get("pad_token_id") or 0),
            eos_token_ids=eos_ids(d, generation),
            quantization=d.get("quantization"),
            demo=bool(d.get("demo", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "PaliGemmaConfig":
        """A folder's config.json, with its generation_config.json beside it when there is one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no config.json in the checkpoint folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        generation = None
        gen_path = path.parent / "generation_config.json"
        if gen_path.exists():
            try:
                generation = json.loads(gen_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{gen_path}: not valid JSON ({e})") from None
            if not isinstance(generation, dict):
                raise CheckpointError(f"{gen_path}: expected a JSON object")
        try:
            return cls.from_dict(d, generation)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{path}: unexpected value in config ({e})") from None


def eos_ids(config: dict, generation: dict | None) -> tuple[int, ...]:
    """The ids that end generation, found where transformers' generate finds them.

    from_pretrained takes generation_config.json when the folder has one (its eos_token_id alone,
    absent meaning none); otherwise GenerationConfig.from_model_config of config.json: the top-level
    eos_token_id, or, when that is unset, text_config's. A value may be one id or a list
    (gemma-2-2b-it's text config, which PaliGemma 2's inherits, lists [1, 107]).
    """
    if generation is not None:
        value = generation.get("eos_token_id")
    else:
        value = config.get("eos_token_id")
        if value is None:
            value = (config.get("text_config") or {}).get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise CheckpointError(f"eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(dict.fromkeys(values))
