"""The detect/segment grammar: any walk through its allowed tokens decodes to well-formed objects."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_paligemma.demo import demo_checkpoint
from mlx_paligemma.detection import parse_detections
from mlx_paligemma.grammar import GrammarProcessor, ObjectGrammar
from mlx_paligemma.segmentation import parse_segments
from mlx_paligemma.tokenizer import Tokenizer


class FlatVae:
    def decode(self, codes):
        return np.ones((len(codes), 64, 64), np.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_checkpoint())


def walk(grammar, rng, max_tokens, bias=None, image_size=None):
    """Sample uniformly (or with `bias` towards some ids) among the allowed tokens, as a random model would."""
    ids = []
    for step in range(max_tokens):
        allowed = np.flatnonzero(grammar.allowed(ids, remaining=max_tokens - step - 1, image_size=image_size))
        assert len(allowed), f"no token allowed after {ids}"
        weights = np.ones(len(allowed)) if bias is None else np.where(np.isin(allowed, bias), 50.0, 1.0)
        t = int(rng.choice(allowed, p=weights / weights.sum()))
        if t == grammar.eos:
            break
        ids.append(t)
    return ids


@pytest.mark.parametrize("segment", [True, False])
def test_every_walk_decodes_to_well_formed_objects(tokenizer, segment):
    grammar = ObjectGrammar(tokenizer, segment=segment, vocab_size=tokenizer.vocab_size)
    rng = np.random.default_rng(0)
    # the separator and eos made likely, so that walks hold several objects and end on their own
    sep = [i for i, t in enumerate(grammar.texts) if t.strip() == ";"] + [tokenizer.eos_id]
    lengths = []
    for trial in range(60):
        max_tokens = int(rng.integers(1, 90))
        ids = walk(grammar, rng, max_tokens, bias=sep if trial % 2 else None)
        text = tokenizer.decode(ids)
        objects = text.count("<loc") // 4
        lengths.append(objects)
        if segment:
            # on an image of 1023 x 1023 pixels every valid box is at least a pixel wide
            segs = parse_segments(text, (1023, 1023), FlatVae())
            assert len(segs) == objects and segs.invalid == 0 and not segs.detections, text
            assert text.count("<seg") == 16 * objects
            for s in segs:
                assert s.label and ";" not in s.label
        else:
            dets = parse_detections(text, (64, 48))
            assert len(dets) == objects and all(d.label for d in dets), text
            assert all(d.box[2] > d.box[0] and d.box[3] > d.box[1] for d in dets), text
            assert "<seg" not in text
        if max_tokens < 4 + grammar.codes + 1:
            assert ids == []  # no room for one object: the empty answer
        if objects:
            pieces = text.split(" ;")
            assert all(p.lstrip().startswith("<loc") for p in pieces), text
    assert max(lengths) >= 2  # walks do produce several objects


@pytest.mark.parametrize("size", [(7, 3), (1, 1), (64, 48)])
def test_segment_boxes_stay_whole_pixels_on_small_images(tokenizer, size):
    """Given the image size, a segment box is never empty once cut at whole pixels (big_vision's
    arithmetic, where a thin box makes the object invalid); without it, small images get such boxes."""
    grammar = ObjectGrammar(tokenizer, segment=True, vocab_size=tokenizer.vocab_size)
    sep = [i for i, t in enumerate(grammar.texts) if t.strip() == ";"]
    rng = np.random.default_rng(1)
    objects, blind_invalid = 0, 0
    for trial in range(20):
        n = int(rng.integers(21, 70))
        text = tokenizer.decode(walk(grammar, rng, n, bias=sep, image_size=size))
        segs = parse_segments(text, size, FlatVae())
        assert segs.invalid == 0 and len(segs) == text.count("<loc") // 4, text
        objects += len(segs)
        blind = parse_segments(tokenizer.decode(walk(grammar, rng, n, bias=sep)), size, FlatVae())
        blind_invalid += blind.invalid
    assert objects >= 20
    if size != (64, 48):
        assert blind_invalid > 0  # the pixel rule is what keeps these boxes whole


def test_states_follow_the_answer(tokenizer):
    g = ObjectGrammar(tokenizer, segment=True, vocab_size=tokenizer.vocab_size)
    loc = tokenizer.encode("<loc0001>")
    seg = tokenizer.encode("<seg001>")
    assert len(loc) == 1 and len(seg) == 1
    cat = tokenizer.encode(" cat")
    semi = [i for i, t in enumerate(g.texts) if t == " ;"]
    space = [i for i, t in enumerate(g.texts) if t == " "]
    assert g.state([]) == "first" and g.allowed([])[tokenizer.eos_id]
    assert g.state(loc * 3) == "loc" and not g.allowed(loc * 3)[tokenizer.eos_id]
    assert g.state(loc * 4) == "seg" and g.allowed(loc * 4)[seg[0]] and not g.allowed(loc * 4)[loc[0]]
    assert g.state(loc * 4 + seg * 16) == "label_start"
    done = loc * 4 + seg * 16 + cat
    assert g.state(done) == "label"
    assert g.allowed(done, remaining=100)[semi].all() and g.allowed(done)[tokenizer.eos_id]
    assert not g.allowed(done, remaining=5)[semi].any()  # no room for another object
    assert g.state(done + semi) == "after_semicolon"
    assert g.state(done + semi + space) == "loc" and not g.allowed(done + semi + space)[tokenizer.eos_id]
    assert g.state(done + semi + loc) == "loc"
    y1 = tokenizer.encode("<loc0700>")
    box = g.allowed(y1 + loc + y1)  # the fourth token: x_max > x_min = 1
    assert not box[loc].any() and box[tokenizer.encode("<loc0002>")].all() and not box[seg].any()
    assert not g.allowed(y1 + loc)[tokenizer.encode("<loc0700>")].any()  # y_max > y_min = 700
    assert not g.allowed([])[tokenizer.encode("<loc1023>")].any()  # no room above 1023
    assert not g.allowed([], remaining=5)[loc].any() and g.allowed([], remaining=5)[tokenizer.eos_id]
    d = ObjectGrammar(tokenizer, segment=False, vocab_size=tokenizer.vocab_size)
    assert d.state(loc * 4) == "label_start" and not d.allowed(loc * 4)[seg].any()


def test_processor_masks_rows_with_a_grammar_only(tokenizer):
    g = ObjectGrammar(tokenizer, segment=True, vocab_size=tokenizer.vocab_size)
    process = GrammarProcessor([g, None], max_tokens=40, eos_id=tokenizer.eos_id)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, tokenizer.vocab_size)).astype(np.float32)
    original = logits.copy()
    generated = np.array([tokenizer.encode("<loc0001><loc0002>"), [5, 6]])
    out = process(generated, logits)
    np.testing.assert_array_equal(out[1], original[1])
    allowed = g.allowed(generated[0], remaining=37)
    assert np.isneginf(out[0][~allowed]).all() and (out[0][allowed] == original[0][allowed]).all()
    # eos banned (min_tokens) where only eos is allowed: the grammar's choice survives
    banned = rng.normal(size=(1, tokenizer.vocab_size)).astype(np.float32)
    banned[0, tokenizer.eos_id] = -np.inf
    out = GrammarProcessor([g], max_tokens=3, eos_id=tokenizer.eos_id)(np.zeros((1, 0), np.int64), banned)
    assert int(out[0].argmax()) == tokenizer.eos_id
