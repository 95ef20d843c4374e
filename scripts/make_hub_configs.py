"""Write the config files of every released PaliGemma checkpoint the way the hub has them.

The hub's files were written by transformers' conversion scripts
(`models/paligemma/convert_paligemma_weights_to_hf.py` for PaliGemma 1,
`convert_paligemma2_weights_to_hf.py` for PaliGemma 2), run with the transformers of the day:
4.41 for PaliGemma 1, 4.47 for PaliGemma 2. Those versions serialize a config as its difference
from the class defaults, so what a config.json omits depends on the version that saved it (4.47
drops every text_config field equal to PaliGemmaConfig's default Gemma 1 text config: the
PaliGemma 2 3B configs have no head_dim and no num_attention_heads). This script repeats the
scripts' config steps with the same transformers version, without the weights:

    python3 -m venv /tmp/tf441 && /tmp/tf441/bin/pip install transformers==4.41.0 pillow
    python3 -m venv /tmp/tf447 && /tmp/tf447/bin/pip install transformers==4.47.0 pillow
    /tmp/tf441/bin/python scripts/make_hub_configs.py pg1 tests/data/hub_configs
    /tmp/tf447/bin/python scripts/make_hub_configs.py pg2 tests/data/hub_configs

Configs need no torch (pillow for the image processor). What the scripts do with a model that touches the config is done here by
hand, each step marked: `del config.hidden_size` (PaliGemma 2), the vocabulary grown to 257216
by `resize_token_embeddings(257154, pad_to_multiple_of=64)`, and save_pretrained's
`architectures`, `torch_dtype` and generation_config.json (GenerationConfig.from_model_config
of the config the model was built with, before the resize). The preprocessor config is
SiglipImageProcessor's (the hub's PaliGemma and SigLIP preprocessor configs hold its defaults:
bicubic, 1/255, mean and std 0.5) with the size and image_seq_length the scripts set, saved
through PaliGemmaProcessor (which stamps processor_class).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

# google/gemma-2-2b-it's config.json, which convert_paligemma2_weights_to_hf.py loads with
# Gemma2Config.from_pretrained and then overrides per variant (no download here, so it is inlined)
GEMMA_2_2B_IT = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}

# convert_paligemma2_weights_to_hf.py's VARIANT_CONFIGS (its 2b/9b/27b are the released 3B/10B/28B)
PG2_VARIANTS = {
    "3b": dict(num_positions=256, hidden_size=2304, num_hidden_layers=26, intermediate_size=9216,
               num_key_value_heads=4, num_attention_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "10b": dict(num_positions=1024, hidden_size=3584, num_hidden_layers=42, intermediate_size=14336,
                num_key_value_heads=8, num_attention_heads=16, head_dim=256, query_pre_attn_scalar=256),
    "28b": dict(num_positions=4096, hidden_size=4608, num_hidden_layers=46, intermediate_size=36864,
                num_key_value_heads=16, num_attention_heads=32, head_dim=128, query_pre_attn_scalar=4608 // 32),
}
SIZES = (224, 448, 896)
# the released repos: PaliGemma 1 had pt at all three sizes and mix at 224 and 448
PG1_REPOS = ["paligemma-3b-pt-224", "paligemma-3b-pt-448", "paligemma-3b-pt-896",
             "paligemma-3b-mix-224", "paligemma-3b-mix-448"]
PG2_REPOS = [f"paligemma2-{m}-{kind}-{s}" for m in PG2_VARIANTS for kind in ("pt", "mix") for s in SIZES]
PATCH = 14
VERSIONS = {"pg1": "4.41.", "pg2": "4.47."}


def _ids():
    return {"image_token_index": None, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}


def paligemma1_config(image_size: int):
    """get_paligemma_config of convert_paligemma_weights_to_hf.py (precision float32, as released)."""
    from transformers import PaliGemmaConfig

    config = _ids()
    config["image_token_index"] = 257152
    text_config = {
        "vocab_size": 257152, "num_hidden_layers": 18, "num_key_value_heads": 1, "head_dim": 256,
        "torch_dtype": "float32", "hidden_size": 2048, "hidden_activation": "gelu_pytorch_tanh",
        "num_attention_heads": 8, "intermediate_size": 16384, "is_encoder_decoder": False,
    }
    vision_config = {
        "torch_dtype": "float32", "image_size": image_size, "patch_size": PATCH,
        "num_image_tokens": image_size**2 // PATCH**2, "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    }
    return PaliGemmaConfig(text_config=text_config, vision_config=vision_config, **config)


def paligemma2_config(model: str, image_size: int):
    """get_paligemma2_config of convert_paligemma2_weights_to_hf.py (precision bfloat16, as released)."""
    from transformers import Gemma2Config, PaliGemmaConfig

    v = PG2_VARIANTS[model]
    config = _ids()
    config["projection_dim"] = v["hidden_size"]
    config["image_token_index"] = 257152
    config["num_hidden_layers"] = v["num_hidden_layers"]  # "For generate", says the script
    text_config = Gemma2Config.from_dict(copy.deepcopy(GEMMA_2_2B_IT)).to_dict()
    text_config.update({
        "model_type": "gemma2", "vocab_size": 257152, "num_hidden_layers": v["num_hidden_layers"],
        "num_key_value_heads": v["num_key_value_heads"], "head_dim": v["head_dim"], "torch_dtype": "bfloat16",
        "hidden_size": v["hidden_size"], "hidden_activation": "gelu_pytorch_tanh",
        "num_attention_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
        "is_encoder_decoder": False, "query_pre_attn_scalar": v["query_pre_attn_scalar"],
    })
    vision_config = {
        "num_positions": v["num_positions"], "torch_dtype": "bfloat16", "image_size": image_size,
        "patch_size": PATCH, "num_image_tokens": image_size**2 // PATCH**2, "hidden_size": 1152,
        "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "projection_dim": v["hidden_size"], "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
    }
    return PaliGemmaConfig(text_config=text_config, vision_config=vision_config, **config)


def write(folder: Path, config, family: str, dtype: str) -> None:
    from transformers import GenerationConfig, PaliGemmaProcessor, SiglipImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    if family == "pg2":
        del config.hidden_size  # the script: "this key is unused"
    # PaliGemmaForConditionalGeneration(config) makes its generation config at construction
    generation = GenerationConfig.from_model_config(config)
    # model.resize_token_embeddings(257152 + 2, 64): 257154 rows padded to a multiple of 64
    vocab = -(-(config.text_config.vocab_size + 2) // 64) * 64
    config.text_config.vocab_size = vocab
    if family == "pg1":
        config.vocab_size = vocab  # 4.41's PaliGemma resize_token_embeddings also sets the top-level field
    # save_pretrained stamps the class and the dtype of the weights
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config.torch_dtype = dtype
    config.save_pretrained(folder)
    # what GenerationConfig.save_pretrained writes; its validation step needs torch to know the
    # cache_implementation "hybrid" that PaliGemma 2 inherits from gemma-2-2b-it's text config
    generation.to_json_file(folder / "generation_config.json", use_diff=True)

    size = config.vision_config.image_size
    processor = SiglipImageProcessor()
    processor.size = {"width": size, "height": size}
    processor.image_seq_length = config.vision_config.num_image_tokens
    processor._set_processor_class(PaliGemmaProcessor.__name__)  # what PaliGemmaProcessor.save_pretrained does
    processor.save_pretrained(folder)


def main(argv=None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=("pg1", "pg2"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    want = VERSIONS[args.family]
    if not transformers.__version__.startswith(want):
        print(f"error: {args.family} configs were written by transformers {want}x; this is {transformers.__version__}",
              file=sys.stderr)
        return 2
    if args.family == "pg1":
        for repo in PG1_REPOS:
            write(args.out / repo, paligemma1_config(int(repo.rsplit("-", 1)[1])), "pg1", "float32")
    else:
        for repo in PG2_REPOS:
            model, _, size = repo.split("-")[1:]
            write(args.out / repo, paligemma2_config(model, int(size)), "pg2", "bfloat16")
    names = PG1_REPOS if args.family == "pg1" else PG2_REPOS
    print(json.dumps({"written": names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
