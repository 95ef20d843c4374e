"""A checkpoint folder as the hub ships it, read as transformers reads it.

Beyond config.json (tests/test_hub_configs.py): generation_config.json and the eos ids that
stop generation, preprocessor_config.json (or 5.x's processor_config.json), and the tokenizer
files (tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json), written here with transformers' own tokenizer and processor classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma.processor import pixel_values, read_image_settings
from mlx_paligemma.tokenizer import Tokenizer

from .conftest import IMAGE_SIZE, make_image

HUB = Path(__file__).parent / "data" / "hub_configs"
TOKENS = (IMAGE_SIZE // 14) ** 2
PROMPTS = ["caption en", "", "  spaced  out ", "Ünïcödé 中文 😀", "detect cat ; dog", "where is <loc0012> ?",
           "two\nlines", "tabs\tand <seg012> too", "ocr"]


def hub_preprocessor_config(size: int = IMAGE_SIZE, tokens: int = TOKENS) -> dict:
    """The hub's preprocessor_config.json of paligemma2-3b-pt-224, at the fixtures' size."""
    d = json.loads((HUB / "paligemma2-3b-pt-224" / "preprocessor_config.json").read_text())
    return {**d, "size": {"height": size, "width": size}, "image_seq_length": tokens}


def write_hub_tokenizer(folder: Path) -> None:
    """The tokenizer files as convert_paligemma*_weights_to_hf.py leaves them: the sentencepiece model,
    a Gemma tokenizer with `<image>` added as a special token, saved through PaliGemmaProcessor."""
    from transformers import AutoTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.tokenization_utils_base import AddedToken

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = TOKENS
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    # transformers 4.x also wrote these two files, which the hub's folders still carry
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": [{"content": "<image>", **token}],
        **{f"{k}_token": {"content": f"<{k}>", **token} for k in ("bos", "eos", "pad", "unk")},
    }, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": tokenizer.convert_tokens_to_ids("<image>")}))
    # the hub keeps the image settings in preprocessor_config.json (4.x), not in processor_config.json
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "PaliGemmaProcessor"}))
    (folder / "preprocessor_config.json").write_text(json.dumps(hub_preprocessor_config(), indent=2))


@pytest.fixture(scope="module")
def hub_folder(checkpoints, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "pg2"
    shutil.copytree(checkpoints["pg2_window"].folder, folder)
    write_hub_tokenizer(folder)
    return folder


@pytest.mark.parametrize("files", ["as shipped", "tokenizer.json only", "tokenizer.model only"])
def test_hub_tokenizer_files_encode_as_transformers(hub_folder, files, tmp_path):
    from transformers import PaliGemmaProcessor

    folder = tmp_path / "f"
    shutil.copytree(hub_folder, folder)
    if files == "tokenizer.json only":
        (folder / "tokenizer.model").unlink()
    elif files == "tokenizer.model only":
        (folder / "tokenizer.json").unlink()
    processor = PaliGemmaProcessor.from_pretrained(folder)
    hf = processor.tokenizer
    ours = Tokenizer(folder)
    image_token = hf.convert_tokens_to_ids("<image>")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == image_token  # the real vocabulary ends where the added `<image>` starts
    image = make_image(0)
    for prompt in PROMPTS:
        ref = processor(images=image, text="<image>" + prompt, return_tensors="np")["input_ids"][0].tolist()
        assert ours.prompt_ids(prompt, TOKENS, image_token) == ref, prompt
        text_ids = ref[TOKENS + 1:]
        assert ours.decode(text_ids) == hf.decode(text_ids), prompt


def write_settings(folder: Path, name: str, settings: dict) -> None:
    body = {"image_processor": settings, "processor_class": "PaliGemmaProcessor"} if name == "processor_config.json" \
        else settings
    (folder / name).write_text(json.dumps(body))


PREPROCESSOR_CASES = {
    "hub": {},
    "bilinear": {"resample": 2},
    "nearest": {"resample": 0},
    "lanczos": {"resample": 1},
    "imagenet mean and std": {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "one mean for all channels": {"image_mean": 0.25, "image_std": 0.75},
    "no normalize": {"do_normalize": False},
    "no rescale": {"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3},
    "other rescale factor": {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3},
    "defaults left out": {"resample": None, "image_mean": None, "image_std": None, "rescale_factor": None},
}


@pytest.mark.parametrize("case", list(PREPROCESSOR_CASES))
@pytest.mark.parametrize("name", ["preprocessor_config.json", "processor_config.json"])
def test_preprocessor_config_reads_as_transformers(case, name, tmp_path):
    from transformers import AutoImageProcessor

    settings = {k: v for k, v in {**hub_preprocessor_config(), **PREPROCESSOR_CASES[case]}.items() if v is not None}
    write_settings(tmp_path, name, settings)
    if name == "processor_config.json":
        # transformers takes the nested one first: a contradicting legacy file must lose
        write_settings(tmp_path, "preprocessor_config.json", {**settings, "resample": 4, "image_mean": [0.1] * 3})
    hf = AutoImageProcessor.from_pretrained(tmp_path)
    ours_settings = read_image_settings(tmp_path, IMAGE_SIZE, TOKENS)
    images = [make_image(1), make_image(2, 13, 200), make_image(3, 300, 41)]
    ours, _ = pixel_values(images, ours_settings)
    theirs = hf(images, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert np.abs(ours - theirs).max() <= 1e-6, case


@pytest.mark.parametrize("change, needle", [
    ({"size": {"height": 224, "width": 224}}, "is not the model's image size"),
    ({"image_seq_length": 256}, "is not the model's 16 image tokens"),
    ({"resample": 9}, "is not a PIL resampling filter"),
    ({"image_mean": [0.5, 0.5]}, "one value per RGB channel"),
])
def test_preprocessor_config_that_cannot_fit_the_model_is_refused(hub_folder, tmp_path, change, needle):
    folder = tmp_path / "f"
    shutil.copytree(hub_folder, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({**hub_preprocessor_config(), **change}))
    with pytest.raises(pg.CheckpointError, match="preprocessor_config.json") as info:
        pg.load(folder, backend="torch")
    assert needle in str(info.value) and "\n" not in str(info.value)


def _hf_greedy(folder: Path, image, prompt: str, n: int, block_eos: bool = False) -> list[int]:
    """transformers' generate on the folder as loaded from it (its generation config included)."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    processor = PaliGemmaProcessor.from_pretrained(folder)
    inputs = processor(images=image, text="<image>" + prompt, return_tensors="pt")
    real_vocab = processor.tokenizer.convert_tokens_to_ids("<image>")
    pad_rows = list(range(real_vocab, model.config.text_config.vocab_size))
    extra = dict(min_new_tokens=n) if block_eos else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=pad_rows, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("where, stops", [
    ("generation_config.json lists it", True),
    ("text_config lists it, no top-level eos, no generation_config.json", True),
    ("text_config lists it, top-level eos 1, no generation_config.json", False),  # from_model_config: top level wins
    ("text_config lists it, generation_config.json says 1", False),
])
def test_every_declared_eos_id_stops_generation_as_in_transformers(hub_folder, tmp_path, where, stops):
    folder = tmp_path / "f"
    shutil.copytree(hub_folder, folder)
    prompt, n = "caption en", 12
    for seed in range(4, 12):  # an image whose answer has a new id after its first (the id made an eos)
        image = make_image(seed)
        ids = _hf_greedy(folder, image, prompt, n, block_eos=True)
        k = next((i for i in range(1, n) if ids[i] not in ids[:i]), None)
        if k is not None:
            break
    assert k is not None, "the fixture repeats one id for every image"
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = [1, ids[k]]
    (folder / "generation_config.json").unlink(missing_ok=True)
    if where.startswith("generation_config.json"):
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, ids[k]]}))
    elif "no top-level eos" in where:
        config.pop("eos_token_id", None)
    elif "top-level eos 1" in where:
        config["eos_token_id"] = 1
    else:
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1}))
    (folder / "config.json").write_text(json.dumps(config))

    theirs = _hf_greedy(folder, image, prompt, n)
    ours = pg.load(folder, backend="torch", dtype="float32").generate(image, prompt, max_tokens=n)
    if stops:
        assert theirs == ids[:k + 1]  # transformers keeps the eos it stopped at
        assert ours.token_ids == ids[:k] and ours.finished_by == "eos"
    else:
        ended = theirs[-1] in (1,) and len(theirs) < n
        assert ours.token_ids == (theirs[:-1] if ended else theirs)
        assert ids[k] in ours.token_ids
