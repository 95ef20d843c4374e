"""Sampling settings as one object, the logits-processor hook of the loop, and stop strings in a stream."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma.sampling import RepetitionPenalty
from mlx_paligemma.tokenizer import StreamDecoder

IMAGE = np.asarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3)), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return pg.load("demo", backend="torch", dtype="float32")


class Pieces:
    """A tokenizer whose ids stand for fixed pieces of text (all StreamDecoder asks of one)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def stream(pieces, stop, ids=None):
    decoder = StreamDecoder(Pieces(pieces), tuple(stop))
    shown = [decoder.push(i) for i in (ids if ids is not None else range(len(pieces)))]
    return shown, decoder.flush(), decoder


def test_a_possible_start_of_a_stop_string_is_held_back_then_given_out():
    shown, rest, d = stream(["a c", "ar", " and"], ["cat"])
    assert shown == ["a ", "car", " and"] and rest == "" and d.text == "a car and" and not d.stopped


def test_the_text_ends_right_before_the_first_stop_string():
    shown, rest, d = stream(["the ", "ca", "t sat", " on"], ["sat", "cat"])
    assert shown == ["the ", "", "", ""] and d.stopped and d.text == "the " and rest == ""
    shown, rest, d = stream(["one\n", "two"], ["\n"])
    assert shown == ["one", ""] and d.text == "one"


def test_held_back_text_comes_at_the_end():
    shown, rest, d = stream(["x", "ca"], ["cat"])
    assert shown == ["x", ""] and rest == "ca" and d.text == "xca"
    _, _, d = stream(["\ufffd"], [])  # an incomplete character at the very end is still part of the answer
    assert d.text == "\ufffd"


def test_repetition_penalty_equals_transformers_processor():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 50)).astype(np.float32)
    prompts = [[3, 7, 60, 7], [1]]  # 60: past the host logits (like `<image>`), ignored
    generated = np.array([[9, 3], [4, 4]])
    ours = RepetitionPenalty(1.7, prompts)(generated, logits.copy())
    for b in range(2):
        seq = torch.tensor([[i for i in prompts[b] if i < 50] + generated[b].tolist()])
        ref = RepetitionPenaltyLogitsProcessor(1.7)(seq, torch.from_numpy(logits[b : b + 1].copy()))
        np.testing.assert_array_equal(ours[b], ref[0].numpy())
    assert not np.array_equal(ours, logits)


def test_settings_as_an_object_or_keywords(model):
    params = pg.SamplingParams(max_tokens=6, temperature=1.3, top_k=20, seed=4, repetition_penalty=1.2)
    a = model.generate(IMAGE, "caption en", params)
    b = model.generate(IMAGE, "caption en", max_tokens=6, temperature=1.3, top_k=20, seed=4, repetition_penalty=1.2)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    # keywords replace the object's fields
    c = model.generate(IMAGE, "caption en", params, seed=5)
    d = model.generate(IMAGE, "caption en", max_tokens=6, temperature=1.3, top_k=20, seed=5, repetition_penalty=1.2)
    assert c.token_ids == d.token_ids != a.token_ids
    batch = model.generate_batch([IMAGE, IMAGE], ["caption en", "ocr"], params)
    assert batch[0].token_ids == a.token_ids
    with pytest.raises(pg.SettingError, match="unknown setting 'temprature'"):
        model.generate(IMAGE, "caption en", temprature=1.0)
    with pytest.raises(pg.SettingError, match="a SamplingParams or keywords"):
        model.generate(IMAGE, "caption en", 32)


def test_logits_processors_see_the_ids_so_far_and_their_choice_holds(model, monkeypatch):
    seen = []
    banned = model.generate(IMAGE, "caption en", max_tokens=8, min_tokens=8).token_ids[3]

    def ban(generated, logits):
        seen.append(generated.copy())
        logits[:, banned] = -np.inf
        return logits

    out = model.generate(IMAGE, "caption en", max_tokens=8, min_tokens=8, logits_processors=[ban])
    assert banned not in out.token_ids and len(seen) == 8
    assert all(s.shape == (1, t) and s[0].tolist() == out.token_ids[:t] for t, s in enumerate(seen))


def test_greedy_without_processors_never_brings_logits_to_the_host(model, monkeypatch):
    calls = []
    to_numpy = model.backend.to_numpy
    monkeypatch.setattr(model.backend, "to_numpy", lambda x: calls.append(1) or to_numpy(x))
    model.generate(IMAGE, "caption en", max_tokens=5, min_tokens=5)
    assert calls == []
    model.generate(IMAGE, "caption en", max_tokens=5, min_tokens=5, repetition_penalty=1.1)
    assert len(calls) == 5


def test_a_batch_with_settings_per_row_gives_each_row_its_own_generate(model):
    images = [IMAGE, IMAGE[::-1].copy(), IMAGE[:, ::-1].copy()]
    prompts = ["caption en", "ocr", "describe en"]
    rows = [
        pg.SamplingParams(max_tokens=5, temperature=0.0),
        pg.SamplingParams(max_tokens=9, temperature=1.1, top_p=0.9, seed=7, min_tokens=9),
        pg.SamplingParams(max_tokens=3, temperature=0.8, top_k=30, seed=2, repetition_penalty=1.3),
    ]
    batch = model.stream_batch(images, prompts, rows)
    pieces = [""] * 3
    for row, piece in batch:
        pieces[row] += piece
    for b, (image, prompt, params) in enumerate(zip(images, prompts, rows)):
        alone = model.generate(image, prompt, params)
        assert batch.results[b].token_ids == alone.token_ids
        assert batch.results[b].finished_by == alone.finished_by
        assert pieces[b] == batch.results[b].text == alone.text
    assert len(batch.results[1].token_ids) == 9 and batch.results[1].finished_by == "max_tokens"


def test_a_cancelled_row_stops_and_the_others_go_on(model):
    batch = model.stream_batch([IMAGE, IMAGE], ["caption en", "ocr"], max_tokens=12, min_tokens=12)
    counts = [0, 0]
    for row, _ in batch:
        counts[row] += 1
        if row == 0 and counts[0] == 2:
            batch.cancel(0)
    first, second = batch.results
    assert first.finished_by == "cancelled" and len(first.token_ids) <= 3
    assert second.finished_by == "max_tokens"
    assert second.token_ids == model.generate(IMAGE, "ocr", max_tokens=12, min_tokens=12).token_ids
    everyone = model.stream_batch([IMAGE, IMAGE], ["caption en", "ocr"], max_tokens=50, min_tokens=50)
    everyone.cancel(0)
    everyone.cancel(1)
    assert list(everyone) == [] and [r.finished_by for r in everyone.results] == ["cancelled"] * 2
    assert all(len(r.token_ids) == 0 for r in everyone.results)


def test_constrained_and_free_rows_of_one_batch_each_follow_their_own_settings(model):
    rows = [
        pg.SamplingParams(max_tokens=10, temperature=1.0, seed=1, constrain=True),
        pg.SamplingParams(max_tokens=4, temperature=1.0, seed=2),
        pg.SamplingParams(max_tokens=27, temperature=1.0, seed=3, constrain=True),
        pg.SamplingParams(max_tokens=7, temperature=1.0, seed=4),
    ]
    prompts = ["detect cat", "caption en", "segment cat ; dog", "detect cat"]
    batch = model.stream_batch([IMAGE] * 4, prompts, rows)
    list(batch)
    for b, (prompt, params) in enumerate(zip(prompts, rows)):
        assert batch.results[b].token_ids == model.generate(IMAGE, prompt, params).token_ids
    # the grammar of each constrained row counted its own max_tokens: whole objects only
    assert len(pg.parse_detections(batch.results[0].text, batch.results[0].image_size)) >= 1
    segments = pg.parse_segments(batch.results[2].text, batch.results[2].image_size, model.mask_decoder())
    assert segments.invalid == 0 and len(segments) == 1
