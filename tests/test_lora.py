"""Fine-tuning: PaliGemma's loss, LoRA gradients and adapters, checked against transformers and PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma.adapter import LoraConfig, read_adapter

from .conftest import make_image

BACKENDS = ["torch", "mlx"]
ROWS = [("caption en", "a red square on grey"), ("answer en what is it?", "a cat"), ("detect cat", "<loc0100><loc0200><loc0900><loc1000> cat")]


def oracle_loss(oracle, images, prompts, suffixes) -> float:
    import torch

    proc = oracle.processor
    proc.tokenizer.padding_side = "right"  # transformers counts positions from the row's start
    inputs = proc(images=list(images), text=["<image>" + p for p in prompts], suffix=list(suffixes),
                  return_tensors="pt", padding="longest")
    with torch.no_grad():
        return float(oracle.model(**inputs).loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["pg2", "pg2_window", "pg1"])
def test_loss_equals_transformers(checkpoints, oracles, backend, name):
    model = pg.load(checkpoints[name].folder, backend=backend, dtype="float32")
    oracle = oracles(name)
    images = [make_image(i) for i in range(len(ROWS))]
    for image, (prompt, suffix) in zip(images, ROWS):
        assert abs(model.loss(image, prompt, suffix) - oracle_loss(oracle, [image], [prompt], [suffix])) < 1e-5
    prompts, suffixes = zip(*ROWS)
    got = model.loss_batch(images, prompts, suffixes)
    want = oracle_loss(oracle, images, prompts, suffixes)
    assert abs(got - want) < 1e-5


TARGET_RE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def nonzero_init(model, config, seed=1):
    """PEFT's initialisation, then B drawn at random too: with B = 0 the gradient of A would be 0."""
    from mlx_paligemma.adapter import init_weights
    from mlx_paligemma.checkpoint import expected_shapes

    shapes = expected_shapes(model.config)
    paths = config.module_paths(model.config.text.num_hidden_layers)
    weights = init_weights(config, {p: shapes[p + ".weight"] for p in paths}, seed)
    rng = np.random.default_rng(seed)
    for k in weights:
        if k.endswith("lora_B.weight"):
            weights[k] = rng.normal(0, 0.1, weights[k].shape).astype(np.float32)
    return weights


def peft_model(oracle_fixture, config, weights=None):
    import torch
    from peft import LoraConfig as PeftConfig, get_peft_model, set_peft_model_state_dict
    from transformers import PaliGemmaForConditionalGeneration

    from mlx_paligemma.adapter import peft_key

    base = PaliGemmaForConditionalGeneration.from_pretrained(oracle_fixture.folder, dtype=torch.float32, attn_implementation="eager")
    pm = get_peft_model(base, PeftConfig(r=config.r, lora_alpha=config.alpha, target_modules=TARGET_RE, lora_dropout=0.0))
    if weights is not None:
        result = set_peft_model_state_dict(pm, {peft_key(k): torch.from_numpy(v) for k, v in weights.items()})
        assert not result.unexpected_keys
    return pm


def peft_key_to_canonical(name: str) -> str:
    from mlx_paligemma.adapter import canonical_key

    return canonical_key(name.replace(".default.", "."))


@pytest.mark.parametrize("name", ["pg2", "pg1"])
def test_lora_gradients_equal_peft(checkpoints, oracles, name):
    """One batch of two rows, same base, same adapter weights: our gradients (torch, then MLX) are PEFT's."""
    from mlx_paligemma.training import make_batch

    config = LoraConfig(r=4, alpha=8.0)
    images = [make_image(7), make_image(8)]
    prompts, suffixes = ["caption en", "answer en what is it?"], ["a red square on grey", "a cat"]
    oracle = oracles(name)
    grads = {}
    for backend in BACKENDS:
        model = pg.load(checkpoints[name].folder, backend=backend, dtype="float32")
        weights = nonzero_init(model, config)
        model.backend.add_lora(config, weights)
        trainer = model.backend.trainer(lr=1e-3)
        batch = make_batch(model, images, prompts, suffixes)
        _, count = trainer.accumulate(batch)
        grads[backend] = {k: g / count for k, g in trainer.gradients().items()}  # of the mean, as transformers' loss

    pm = peft_model(checkpoints[name], config, weights)
    proc = oracle.processor
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=images, text=["<image>" + p for p in prompts], suffix=suffixes, return_tensors="pt", padding="longest")
    pm(**inputs).loss.backward()
    want = {peft_key_to_canonical(n): p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    assert set(want) == set(grads["torch"]) == set(grads["mlx"]) and len(want) == 3 * 7 * 2
    for k, w in want.items():
        scale = float(np.abs(w).max())
        assert scale > 0, k
        for backend in BACKENDS:
            assert np.abs(grads[backend][k] - w).max() <= 1e-4 * scale + 1e-7, (backend, k)


def peft_logits(pm, oracle, image, prompt, suffix_ids):
    import torch

    inputs = oracle.inputs(image, prompt)
    ids = torch.cat([inputs["input_ids"], torch.tensor([suffix_ids])], dim=1)
    types = torch.cat([torch.zeros_like(inputs["input_ids"]), torch.ones(1, len(suffix_ids), dtype=torch.int64)], dim=1)
    with torch.no_grad():
        out = pm(input_ids=ids, pixel_values=inputs["pixel_values"], token_type_ids=types, attention_mask=torch.ones_like(ids))
    return out.logits[0].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_cross_between_us_and_peft(checkpoints, oracles, tmp_path, backend):
    """Ours -> PEFT, PEFT -> ours, and a merged folder: the same logits each way."""
    import torch
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    from mlx_paligemma.adapter import merge
    from mlx_paligemma.training import Example, TrainSettings, train

    fixture, oracle = checkpoints["pg2"], oracles("pg2")
    image, prompt, suffix = make_image(3), "caption en", "a red square"

    # a few steps of training so that B is no longer zero, written as a checkpoint folder
    model = pg.load(fixture.folder, backend=backend, dtype="float32")
    config = LoraConfig(r=4, alpha=8.0, targets=("q", "v", "down"))
    model.add_lora(config)
    path = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(image).save(path)
    ours = tmp_path / "ours"
    train(model, config, [Example(str(path), prompt, suffix)], ours, TrainSettings(epochs=3, lr=1e-2), progress=False, log=lambda m: None)
    assert json.loads((ours / "adapter_config.json").read_text())["r"] == 4
    suffix_ids = model.tokenizer.encode(suffix)
    got = pg.load(fixture.folder, backend=backend, dtype="float32", adapter=ours).logits(image, prompt, suffix_ids)
    base_logits = pg.load(fixture.folder, backend=backend, dtype="float32").logits(image, prompt, suffix_ids)
    assert np.abs(got - base_logits).max() > 1e-2  # the adapter changes the model

    base = PaliGemmaForConditionalGeneration.from_pretrained(fixture.folder, dtype=torch.float32, attn_implementation="eager")
    theirs = peft_logits(PeftModel.from_pretrained(base, ours), oracle, image, prompt, suffix_ids)
    np.testing.assert_allclose(got, theirs, atol=2e-4, rtol=0)

    # saved by PEFT (random A and B) -> loaded here
    pm = peft_model(fixture, LoraConfig(r=2, alpha=4.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    want = peft_logits(pm, oracle, image, prompt, suffix_ids)
    loaded = pg.load(fixture.folder, backend=backend, dtype="float32", adapter=tmp_path / "peft")
    np.testing.assert_allclose(loaded.logits(image, prompt, suffix_ids), want, atol=2e-4, rtol=0)

    # merged into a plain folder: the adapter's logits without LoRA layers
    merge(fixture.folder, tmp_path / "peft", tmp_path / "merged")
    merged = pg.load(tmp_path / "merged", backend=backend, dtype="float32")
    np.testing.assert_allclose(merged.logits(image, prompt, suffix_ids), want, atol=2e-4, rtol=0)
