"""Real widths end to end: the hub's configs at reduced depth, against transformers.

Each checkpoint is the hub's config.json of a released variant (as scripts/make_hub_configs.py
wrote it: no head_dim, 3B without num_attention_heads) cut to 2 text layers (one sliding, one
full) and 1 vision layer, with a tiny vocabulary, random weights made by transformers, stored in
bf16 in the hub layout and sharded, as the hub ships them. Computation is float32 on both sides:
the logits of the prefix and of a causal suffix must be within 1e-4 of the range of transformers'.
Each model is freed after use: the 28B widths at 2 layers are 1.1 G parameters (4.5 GB in
float32), and their 896 px prefix is 4096 image tokens + bos + prompt + newline, past the
4096-token window of the sliding layer. transformers' logits are computed once per variant.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx_paligemma as pg

from .conftest import _randomize, _write_hub_layout, make_image

HUB = Path(__file__).parent / "data" / "hub_configs"
VARIANTS = {"3b-224": "paligemma2-3b-pt-224", "10b-448": "paligemma2-10b-pt-448", "28b-896": "paligemma2-28b-pt-896"}
PROMPT = "caption en"
SUFFIX_LEN = 6


def build(name: str, folder: Path) -> dict:
    """The folder of a reduced-depth checkpoint; returns transformers' logits for it, the model freed."""
    import sentencepiece as spm
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers import PaliGemmaProcessor
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # where it lived before
        from transformers.modeling_utils import no_init_weights

    from mlx_paligemma.demo import build_tokenizer

    hub = HUB / VARIANTS[name]
    folder.mkdir(parents=True)
    build_tokenizer(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    real_vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    config = json.loads((hub / "config.json").read_text())
    config["num_hidden_layers"] = config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 1
    config["text_config"]["vocab_size"] = (real_vocab + 1 + 63) // 64 * 64
    config["image_token_index"] = real_vocab
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("generation_config.json", "preprocessor_config.json"):
        shutil.copy(hub / f, folder / f)

    # transformers' own init would be overwritten (and takes minutes at these widths on 2 cores);
    # buffers (positions, embedding scale, rope frequencies) are still made by the constructor
    with no_init_weights():
        model = PaliGemmaForConditionalGeneration._from_config(
            PaliGemmaConfig.from_pretrained(folder), attn_implementation="eager", dtype=torch.float32).eval()
    model.tie_weights()  # done by the init skipped above: the output head is the embedding
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    _randomize(model, seed=0, round_to=torch.bfloat16)  # the weights the bf16 files hold, computed in float32
    _write_hub_layout(model, folder, "bfloat16", shards=2)

    processor = PaliGemmaProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                   tokenizer=AutoTokenizer.from_pretrained(folder))
    image = make_image(11, 300, 200)
    inputs = processor(images=image, text="<image>" + PROMPT, return_tensors="pt")
    suffix = np.random.default_rng(5).integers(4, real_vocab, SUFFIX_LEN).tolist()
    ids = torch.cat([inputs["input_ids"], torch.tensor([suffix])], dim=1)
    types = torch.zeros_like(ids)
    types[:, -SUFFIX_LEN:] = 1  # the suffix attends causally, as generated tokens do
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], token_type_ids=types,
                       attention_mask=torch.ones_like(ids)).logits[0].numpy()
    window = model.config.text_config.sliding_window
    del model
    gc.collect()
    return {"folder": folder, "image": image, "suffix": suffix, "logits": logits,
            "prefix_len": inputs["input_ids"].shape[1], "window": window}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> the variant's folder and transformers' logits, built once (one variant on disk at a time)."""
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in built:
            for ref in built.values():
                shutil.rmtree(ref["folder"])
            built.clear()
            built[name] = build(name, tmp_path_factory.mktemp("realwidth") / name)
        return built[name]

    yield get
    for ref in built.values():
        shutil.rmtree(ref["folder"])


# MLX runs on the CPU here, slowly: it is held to transformers at real widths on 3B only. 28B-896
# is the costliest case of the suite (two 4106-token forwards of 1.1 G parameters, peak RSS ~12 GB)
CASES = [("3b-224", "torch"), ("3b-224", "mlx"), ("10b-448", "torch"), ("28b-896", "torch")]


@pytest.mark.parametrize("name, backend", CASES)
def test_real_widths_logits_match_transformers(name, backend, references):
    ref = references(name)
    model = pg.load(ref["folder"], backend=backend, dtype="float32")
    head_dim = model.config.text.head_dim
    assert len(model.prompt_ids(PROMPT)) == ref["prefix_len"]
    if name == "28b-896":
        # 4096 image tokens + bos + prompt + newline: in the sliding layer each suffix token drops the
        # first keys of the prefix. That is measurable: with the window off in our masks the suffix
        # logits were 0.7e-3 to 3.2e-3 of the range from transformers' (2026-12-03), so a window
        # applied wrongly fails the tolerance below
        assert ref["prefix_len"] > ref["window"] == 4096
    ours = model.logits(ref["image"], PROMPT, suffix=ref["suffix"])
    del model
    gc.collect()
    theirs = ref["logits"]
    assert ours.shape == theirs.shape
    P, span = ref["prefix_len"], theirs.max() - theirs.min()
    prefix, suffix = (float(np.abs(ours[rows] - theirs[rows]).max() / span) for rows in (slice(None, P), slice(P, None)))
    print(f"\n{name} {backend}: worst logits diff of the range: prefix {prefix:.2e}, suffix {suffix:.2e} "
          f"(head_dim {head_dim}, prefix {P} tokens, window {ref['window']})")
    assert max(prefix, suffix) <= 1e-4
