"""Full-size random-weight PaliGemma checkpoints with the real shapes, for parity runs and benchmarks.

Written tensor by tensor in the hub layout, stored bfloat16 as Google ships them, with the real
tokenizer ids (`<loc0000>` at 256000, `<image>` at 257152, 257216 embedding rows). numpy only:
a 3B checkpoint never exists whole in memory while it is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..demo import build_tokenizer, hub_name, init_rule
from ..files import atomic_folder, cache_root

# the real shapes (config.json of google/paligemma2-*-pt-* and google/paligemma-3b-pt-*)
TEXT_SHAPES = {
    "3b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "10b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "28b": dict(model_type="gemma2", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "pg1-3b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                   num_attention_heads=8, num_key_value_heads=1, head_dim=256),
}
RESOLUTIONS = (224, 448, 896)
SHARD_BYTES = 2 * 1024**3


def full_config(name: str = "3b-224", layers: int | None = None) -> dict:
    """config.json for e.g. `3b-224`, `10b-448`, `pg1-3b-224`; `layers` cuts the text depth (benchmarks)."""
    size, _, res = name.rpartition("-")
    if size not in TEXT_SHAPES or not res.isdigit() or int(res) not in RESOLUTIONS:
        choices = ", ".join(f"{s}-{r}" for s in TEXT_SHAPES for r in RESOLUTIONS)
        raise ValueError(f"unknown configuration {name!r}; choose from {choices}")
    text = dict(TEXT_SHAPES[size], vocab_size=257216, rms_norm_eps=1e-6, max_position_embeddings=8192,
                hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
                rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    if layers:
        text["num_hidden_layers"] = layers
    if text["model_type"] == "gemma2":
        text.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(text["num_hidden_layers"])])
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, patch_size=14, image_size=int(res), layer_norm_eps=1e-6,
                  projection_dim=text["hidden_size"], vision_use_head=False)
    # the real configs carry a top-level hidden_size of 2048 that is NOT the text width (a known trap)
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "image_token_index": 257152, "projection_dim": text["hidden_size"], "hidden_size": 2048,
            "vocab_size": 257216, "text_config": text, "vision_config": vision, "torch_dtype": "bfloat16"}


def write_random_checkpoint(folder: Path, config: dict, seed: int = 0, progress=None) -> Path:
    """Tokenizer, config and bf16 safetensors shards (hub layout, with an index) in `folder`."""
    from ..checkpoint import bf16_bytes, expected_shapes, plan_shards, shard_files, write_header
    from ..config import PaliGemmaConfig

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder / "tokenizer.model", text_pieces=256000)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = expected_shapes(PaliGemmaConfig.from_dict(config))
    shards = plan_shards({name: math.prod(shape) * 2 for name, shape in shapes.items()}, SHARD_BYTES)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for fname, names in zip(shard_files(len(shards)), shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = int(np.prod(shapes[name])) * 2
            header[hub_name(name)] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[hub_name(name)] = fname
        with open(folder / fname, "wb") as f:
            write_header(f, header)
            for name in names:
                f.write(bf16_bytes(rng.normal(*init_rule(name, shapes[name], gain=1.0), shapes[name]).astype(np.float32)))
                if progress:
                    progress(name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def full_size_checkpoint(name: str = "3b-224", layers: int | None = None, seed: int = 0, progress=None) -> Path:
    """The cached folder for a configuration, written (atomically) the first time it is asked for."""
    tag = f"random-{name}" + (f"-{layers}l" if layers else "")
    folder = cache_root() / tag
    if (folder / "model.safetensors.index.json").exists():
        return folder
    with atomic_folder(folder, replace=False) as tmp:
        write_random_checkpoint(tmp, full_config(name, layers), seed, progress)
    return folder
