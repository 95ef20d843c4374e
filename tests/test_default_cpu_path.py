"""The torch backend's default CPU path held to transformers, not only float32.

On a CPU the default dtype is bfloat16: computed natively where the CPU has bf16 instructions,
else through our AVX2 kernels (torch_backend/cpu_kernels.py) where they build. Both paths are
checked on the tiny fixtures: the default one as this machine picks it, and the kernel one
forced (as on an AVX2 CPU without bf16). And where the kernels can be built they must be:
a kernel that fails to compile would otherwise fall back silently and leave every test green.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma.processor import pixel_values
from mlx_paligemma.torch_backend import backend as torch_backend
from mlx_paligemma.torch_backend import cpu_kernels

from .conftest import IMAGE_SIZE, kernels_absent_reason, make_image, require_kernels

NAMES = ["pg2", "pg2_window", "pg1"]
MODES = ["default", "kernels"]


def test_kernels_build_on_an_avx2_machine_with_a_compiler(monkeypatch):
    reason = kernels_absent_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_module", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = cpu_kernels.build()
    assert module is not None, "the CPU kernels did not build: " + "; ".join(str(w.message) for w in caught)
    assert torch_backend.cpu_kernels_available()


@pytest.fixture(scope="module")
def bf16_models(checkpoints):
    """(mode, name) -> our model in the torch backend's default dtype; `kernels` forces the AVX2 kernels."""
    cache = {}

    def get(mode: str, name: str):
        if (mode, name) not in cache:
            if mode == "kernels":
                require_kernels()
            with pytest.MonkeyPatch.context() as mp:
                if mode == "kernels":
                    mp.setattr(torch_backend, "cpu_has_fast_bf16", lambda: False)  # as on an AVX2 CPU without bf16
                model = pg.load(checkpoints[name].folder, backend="torch")
                default = torch_backend.pick_dtype(None, model.backend._device)
            assert model.backend.dtype == default == "bfloat16"
            assert model.backend.kernels == (mode == "kernels" or not torch_backend.cpu_has_fast_bf16()
                                             and torch_backend.cpu_kernels_available())
            cache[mode, name] = model
        return cache[mode, name]

    return get


@pytest.fixture(scope="module")
def bf16_oracle(checkpoints):
    """transformers in bfloat16 (eager attention), per fixture."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = PaliGemmaForConditionalGeneration.from_pretrained(
                checkpoints[name].folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
        return cache[name]

    return get


def assert_same_ids_but_for_a_tie(ours, ref, truth, bf16_rows, vocab: int) -> None:
    """`ours == ref`, or they part at a step where bfloat16 cannot order the two picks.

    Two correct bf16 implementations round differently, and a near-tie goes either way. So at the
    first step where the ids differ, float32 (transformers, `truth(k)`) must separate the two picks
    by no more than twice the largest error of the bf16 logits there (`bf16_rows(k)`, measured
    against float32); after that step the texts differ and nothing more is compared.
    """
    assert len(ours) == len(ref)
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if k is None:
        return
    f32 = truth(k)[:vocab]
    err = max(float(np.abs(row[:vocab] - f32).max()) for row in bf16_rows(k))
    gap = abs(float(f32[ours[k]] - f32[ref[k]]))
    assert gap <= 2 * err, f"ids part at step {k}: float32 separates {ours[k]} and {ref[k]} by {gap:.4f}, bf16 error {err:.4f}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_default_dtype_greedy_ids_equal_transformers_bf16(mode, name, bf16_models, bf16_oracle, oracles, checkpoints):
    import torch

    model, oracle, hf = bf16_models(mode, name), oracles(name), bf16_oracle(name)
    image, prompt, n, vocab = make_image(4), "caption en", 24, checkpoints[name].real_vocab
    inputs = oracle.inputs(image, prompt)  # the processor is the same in any dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    pad_rows = list(range(vocab, hf.config.text_config.vocab_size))
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=pad_rows,
                          output_scores=True, return_dict_in_generate=True)
    ref = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ours = model.generate(image, prompt, max_tokens=n, min_tokens=n).token_ids
    assert_same_ids_but_for_a_tie(
        ours, ref, lambda k: oracle.logits(image, prompt, ref[:k])[-1],
        lambda k: [out.scores[k][0].float().numpy(), model.logits(image, prompt, suffix=ref[:k])[-1]], vocab)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_default_dtype_cached_decoding_equals_full_forward(mode, name, bf16_models, checkpoints):
    model = bf16_models(mode, name)
    be = model.backend
    ids = model.prompt_ids("caption en")
    pixels, _ = pixel_values([make_image(8)], IMAGE_SIZE)
    feats = be.image_features(pixels)
    steps = np.random.default_rng(0).integers(4, checkpoints[name].real_vocab, 14)  # past the window of 8
    state, first = be.prefill(np.array([ids]), feats, np.zeros(1, dtype=np.int64), len(ids))
    cached = [be.to_numpy(first)[0]]
    for t in steps[:-1]:
        cached.append(be.to_numpy(be.decode(state, np.array([t])))[0])
    cached = np.stack(cached)
    full = be.forward_logits(np.array([ids + steps[:-1].tolist()]), feats, len(ids))[len(ids) - 1:]
    # bfloat16 keeps 8 significant bits: the two paths (a float32 cache with the kernels) round
    # differently, by a few of its steps at the logits' magnitude
    step = 2.0 ** (np.floor(np.log2(np.abs(full).max())) - 7)
    assert np.abs(cached - full).max() <= 4 * step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["pg2_window", "pg1"])
def test_default_dtype_batch_gives_each_rows_own_ids(mode, name, bf16_models, oracles, checkpoints):
    model, oracle = bf16_models(mode, name), oracles(name)
    images = [make_image(5), make_image(6, 30, 90), make_image(7, 64, 64)]
    prompts = ["caption en", "answer en what colour is the sky?", "ocr"]  # different lengths: left padding
    batch = model.generate_batch(images, prompts, max_tokens=16, min_tokens=16)
    for image, prompt, row in zip(images, prompts, batch):
        alone = model.generate(image, prompt, max_tokens=16, min_tokens=16).token_ids
        assert_same_ids_but_for_a_tie(
            row.token_ids, alone, lambda k: oracle.logits(image, prompt, alone[:k])[-1],
            lambda k: [model.logits(image, prompt, suffix=alone[:k])[-1]], checkpoints[name].real_vocab)
    assert len({tuple(b.token_ids) for b in batch}) == 3
