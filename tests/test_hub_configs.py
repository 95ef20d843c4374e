"""The hub's config files read as transformers 5.x reads them.

tests/data/hub_configs holds config.json, generation_config.json and preprocessor_config.json
of every released PaliGemma checkpoint, written by scripts/make_hub_configs.py with the
transformers version that wrote the originals (4.41 for PaliGemma 1, 4.47 for PaliGemma 2),
so they omit what the originals omit (PaliGemma 2 3B: head_dim and num_attention_heads).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_paligemma.checkpoint import canonical_name, expected_shapes
from mlx_paligemma.config import PaliGemmaConfig
from mlx_paligemma.errors import CheckpointError

HUB = Path(__file__).parent / "data" / "hub_configs"
VARIANTS = sorted(p.name for p in HUB.iterdir())


def test_every_released_variant_is_there():
    pg2 = {f"paligemma2-{m}-{k}-{s}" for m in ("3b", "10b", "28b") for k in ("pt", "mix") for s in (224, 448, 896)}
    pg1 = {"paligemma-3b-pt-224", "paligemma-3b-pt-448", "paligemma-3b-pt-896", "paligemma-3b-mix-224",
           "paligemma-3b-mix-448"}
    assert set(VARIANTS) == pg1 | pg2
    for name in VARIANTS:
        assert {p.name for p in (HUB / name).iterdir()} == {"config.json", "generation_config.json",
                                                          "preprocessor_config.json"}


def ours(config: PaliGemmaConfig) -> dict:
    """What a model built from the config computes with, field by field."""
    t, v = config.text, config.vision
    return {
        "text.model_type": t.model_type,
        **{f"text.{k}": getattr(t, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "attn_logit_softcapping", "final_logit_softcapping")},
        "text.attn_scale": t.attn_scale,
        "text.window_per_layer": [t.sliding_window if t.is_sliding(i) else None for i in range(t.num_hidden_layers)],
        **{f"vision.{k}": getattr(v, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "layer_norm_eps")},
        "image_token_index": config.image_token_index,
        "projection_dim": config.projection_dim,
        "num_image_tokens": config.num_image_tokens,
        "eos_token_ids": list(config.eos_token_ids),
    }


def theirs(tc, generation) -> dict:
    """The same fields as transformers' PaliGemma reads them from its config objects."""
    t, v = tc.text_config, tc.vision_config
    gemma2 = t.model_type == "gemma2"
    layers = t.num_hidden_layers
    eos = generation.eos_token_id
    return {
        "text.model_type": t.model_type,
        **{f"text.{k}": getattr(t, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings")},
        "text.rope_theta": t.rope_parameters["rope_theta"],
        # GemmaAttention scales by head_dim ** -0.5; Gemma2Attention by query_pre_attn_scalar ** -0.5
        "text.attn_logit_softcapping": t.attn_logit_softcapping if gemma2 else None,
        "text.final_logit_softcapping": t.final_logit_softcapping if gemma2 else None,
        "text.attn_scale": float(t.query_pre_attn_scalar if gemma2 else t.head_dim) ** -0.5,
        # Gemma2Attention: sliding_window on the layers whose layer_types entry is sliding_attention
        "text.window_per_layer": [t.sliding_window if gemma2 and t.layer_types[i] == "sliding_attention" else None
                                  for i in range(layers)],
        **{f"vision.{k}": getattr(v, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "layer_norm_eps")},
        "image_token_index": tc.image_token_index,
        "projection_dim": tc.projection_dim,
        "num_image_tokens": t.num_image_tokens,
        "eos_token_ids": [] if eos is None else list(dict.fromkeys(eos if isinstance(eos, list) else [eos])),
    }


def generation_config_of(folder: Path):
    """The GenerationConfig from_pretrained gives a model (GenerationMixin.adjust_generation_fn)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_hub_config_reads_as_transformers_reads_it(name):
    from transformers import PaliGemmaConfig as HFConfig

    folder = HUB / name
    mine = PaliGemmaConfig.from_file(folder / "config.json")
    assert ours(mine) == theirs(HFConfig.from_pretrained(folder), generation_config_of(folder))


@pytest.mark.parametrize("name", VARIANTS)
def test_hub_config_shapes_match_a_transformers_model(name):
    """Every tensor a transformers model built from the config has, with its shape (meta device: no memory)."""
    import torch
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    folder = HUB / name
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(HFConfig.from_pretrained(folder))
    shapes = {}
    for key, tensor in model.state_dict().items():
        canonical = canonical_name(key)
        if canonical is not None:
            shapes[canonical] = tuple(tensor.shape)
    assert shapes == expected_shapes(PaliGemmaConfig.from_file(folder / "config.json"))


def test_the_10b_config_states_heads_but_not_head_dim():
    """The case that failed: head_dim is Gemma2Config's 256, not hidden / heads = 224."""
    d = json.loads((HUB / "paligemma2-10b-pt-448" / "config.json").read_text())
    assert "head_dim" not in d["text_config"] and d["text_config"]["num_attention_heads"] == 16
    t = PaliGemmaConfig.from_dict(d).text
    assert (t.hidden_size, t.num_attention_heads, t.head_dim) == (3584, 16, 256)


# A config.json that states every field we read, each with a value other than its default (so that
# dropping it changes the reading), and the fields a hypothesis draw may drop.
FULL_GEMMA2 = {
    "model_type": "paligemma", "image_token_index": 1000, "projection_dim": 96, "eos_token_id": [1, 107],
    "pad_token_id": 0, "bos_token_id": 2,
    "text_config": dict(model_type="gemma2", vocab_size=1088, hidden_size=96, intermediate_size=160,
                        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=20,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=20000.0, query_pre_attn_scalar=144,
                        sliding_window=64, final_logit_softcapping=20.0, attn_logit_softcapping=40.0,
                        layer_types=["full_attention", "sliding_attention", "full_attention"],
                        eos_token_id=[1, 7], pad_token_id=0, bos_token_id=2),
    "vision_config": dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=4, num_channels=3, image_size=56, patch_size=14, layer_norm_eps=1e-5),
}
FULL_GEMMA = copy.deepcopy(FULL_GEMMA2)
FULL_GEMMA["text_config"] = dict(model_type="gemma", vocab_size=1088, hidden_size=96, intermediate_size=160,
                                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=20000.0, eos_token_id=5)


def _paths(d: dict, top: bool = True) -> list[tuple[str, ...]]:
    """Every field that may be dropped: all but the top-level model_type (no paligemma without it)."""
    out = []
    for k, v in d.items():
        if not (top and k == "model_type"):
            out.append((k,))
        if isinstance(v, dict):
            out += [(k, *p) for p in _paths(v, top=False)]
    return out


def _drop(d: dict, paths) -> dict:
    d = copy.deepcopy(d)
    for path in sorted(paths, key=len, reverse=True):
        node = d
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return d


def _read_both(d: dict, generation: dict | None, tmp: Path):
    from transformers import PaliGemmaConfig as HFConfig

    (tmp / "config.json").write_text(json.dumps(d))
    gen = tmp / "generation_config.json"
    if generation is None:
        gen.unlink(missing_ok=True)
    else:
        gen.write_text(json.dumps(generation))
    try:
        mine = ours(PaliGemmaConfig.from_file(tmp / "config.json"))
    except CheckpointError:
        mine = "refused"
    try:
        other = theirs(HFConfig.from_pretrained(tmp), generation_config_of(tmp))
    except Exception:  # transformers refuses a config with any of several error classes
        other = "refused"
    return mine, other


@pytest.mark.parametrize("full", [FULL_GEMMA2, FULL_GEMMA], ids=["gemma2", "gemma"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_omitted_fields_read_as_transformers_reads_them(full, data, tmp_path):
    paths = _paths(full)
    dropped = data.draw(st.sets(st.sampled_from(paths)), label="dropped")
    generation = data.draw(st.sampled_from([None, {}, {"eos_token_id": 1}, {"eos_token_id": [1, 107]}]),
                           label="generation_config.json")
    d = _drop(full, dropped)
    mine, other = _read_both(d, generation, tmp_path)
    assert mine == other, sorted(dropped)


def test_a_config_without_any_sub_config_reads_as_transformers_reads_it(tmp_path):
    """No text_config / vision_config at all: PaliGemmaConfig's own sub-config defaults (not the classes')."""
    for d in ({"model_type": "paligemma"}, {"model_type": "paligemma", "text_config": {}, "vision_config": {}}):
        mine, other = _read_both(d, None, tmp_path)
        assert mine == other != "refused"
