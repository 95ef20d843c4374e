"""Segmentation answers -> masks, placed as big_vision's evaluator places them; RLE and drawing.

The expected placement is big_vision's arithmetic (evaluators/proj/paligemma/transfers/
segmentation.py), transcribed here step by step: tokens / 1023, `map(int, (y1 * h, x1 * w, ...))`,
PIL `Image.fromarray(m64).resize([x2 - x1, y2 - y1], BILINEAR)`, `> 0.0`, pasted at [y1:y2, x1:x2].
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings, strategies as st
from pycocotools import mask as coco_mask

from mlx_paligemma.segmentation import draw_segments, mask_to_rle, parse_segments, segments_json


class FakeVae:
    """Known 64x64 maps: a smooth random field per code sequence (seeded by the codes)."""

    def __init__(self):
        self.calls = 0

    def decode(self, codes):
        self.calls += 1
        out = []
        for row in np.asarray(codes):
            rng = np.random.default_rng(int(sum(int(c) * 131**i for i, c in enumerate(row)) % 2**32))
            coarse = rng.normal(0, 1, (8, 8)).astype(np.float32)
            out.append(np.asarray(PIL.Image.fromarray(coarse).resize((64, 64), PIL.Image.BILINEAR)))
        return np.stack(out).astype(np.float32)


def big_vision_mask(tokens, m64, w, h):
    """big_vision's evaluator on one valid prediction: (pixel box, full-image mask) or None."""
    bb = np.asarray(tokens[:4]) / 1023
    y1, x1, y2, x2 = bb
    y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))
    if x2 <= x1 or y2 <= y1:
        return None
    mi = np.asarray(PIL.Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=PIL.Image.BILINEAR)) > 0.0
    full = np.zeros((h, w), bool)
    full[y1:y2, x1:x2] = mi
    return (x1, y1, x2, y2), full


def obj(box, codes, label):
    return "".join(f"<loc{b:04d}>" for b in box) + "".join(f"<seg{c:03d}>" for c in codes) + (f" {label}" if label else "")


CODES = [list(np.random.default_rng(i).integers(0, 128, 16)) for i in range(4)]


@pytest.mark.parametrize("size", [(640, 480), (37, 101), (1, 1), (1024, 3)])
@pytest.mark.parametrize("box", [
    (0, 0, 1023, 1023),  # the whole image, to its last pixel
    (0, 900, 1023, 1023),  # a strip at the right edge
    (1000, 0, 1023, 40),  # bottom-left corner
    (500, 500, 501, 501),  # one bin: empty on small images after int()
    (100, 10, 900, 13),  # thin in x
    (3, 3, 1020, 1021),
])
def test_masks_land_where_big_vision_puts_them(size, box):
    vae = FakeVae()
    w, h = size
    segs = parse_segments(obj(box, CODES[0], "thing"), (w, h), vae)
    m64 = vae.decode(np.array([CODES[0]]))[0]
    expected = big_vision_mask(box, m64, w, h)
    if expected is None:
        assert segs == [] and segs.invalid == 1
        return
    assert len(segs) == 1 and segs.invalid == 0
    (x1, y1, x2, y2), full = expected
    seg = segs[0]
    assert seg.box == (x1, y1, x2, y2) and seg.label == "thing"
    assert seg.mask.dtype == bool and seg.mask.shape == (h, w)
    np.testing.assert_array_equal(seg.mask, full)


def test_several_objects_mix_with_detections_and_invalid_groups_are_counted():
    vae = FakeVae()
    text = (
        obj((100, 50, 700, 500), CODES[0], "cat") + " ; "
        + obj((10, 10, 200, 300), [], "sign") + " ; "  # a box without codes: a detection
        + obj((300, 400, 1000, 1023), CODES[1], "big dog") + " ; "
        + obj((300, 400, 1000), CODES[2], "three locs") + " ; "
        + obj((300, 400, 1000, 1020), CODES[2][:15], "fifteen codes") + " ; "
        + obj((700, 400, 300, 1020), CODES[2], "upside down") + " ; "
        + obj((300, 400, 300, 1020), CODES[2], "empty") + " ; "
        + "<loc1500><loc0000><loc0100><loc0100>" + "".join(f"<seg{c:03d}>" for c in CODES[3]) + " out of range ; "
        + obj((0, 0, 100, 100), [200] + CODES[3][1:], "code 200") + " ; "
        + "".join(f"<seg{c:03d}>" for c in CODES[3]) + " codes alone ; "
        + obj((1, 2, 300, 400), CODES[3], "") + obj((5, 6, 700, 800), CODES[2], "after no label")
    )
    segs = parse_segments(text, (320, 240), vae)
    assert [s.label for s in segs] == ["cat", "big dog", "", "after no label"]
    assert segs.invalid == 7
    assert [d.label for d in segs.detections] == ["sign"]
    assert vae.calls == 1  # all masks of an answer in one batch
    m64 = vae.decode(np.array([CODES[1]]))[0]
    np.testing.assert_array_equal(segs[1].mask, big_vision_mask((300, 400, 1000, 1023), m64, 320, 240)[1])


def test_whitespace_between_the_tokens_and_special_tokens_in_labels():
    # big_vision's demo answers put a space between the locations and the codes
    text = "<loc0100><loc0100><loc0800><loc0800> " + "".join(f"<seg{c:03d}>" for c in CODES[0]) + " red <eos>car ;"
    segs = parse_segments(text, (100, 100), FakeVae())
    assert len(segs) == 1 and segs[0].label == "red car"


def test_no_decoder_needed_without_valid_objects():
    segs = parse_segments("a cat <loc0001> ; nothing", (10, 10), vae=object())
    assert segs == [] and segs.invalid == 1
    with pytest.raises(ValueError, match="image_size"):
        parse_segments("", (0, 10), FakeVae())


TOKENS = st.sampled_from(["<loc0000>", "<loc1023>", "<loc0512>", "<loc9999>", "<seg000>", "<seg127>", "<seg999>",
                          "<seg05>", " ; ", ";", " ", "cat", "<eos>", "<", ">", "loc", "<loc", "\n", "é"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.one_of(TOKENS, st.text(max_size=5)), max_size=60),
       size=st.tuples(st.integers(1, 70), st.integers(1, 70)))
def test_any_text_parses_without_an_exception(pieces, size):
    text = "".join(pieces)
    segs = parse_segments(text, size, FakeVae())
    groups = len([p for p in pieces if p.startswith(("<loc", "<seg"))])
    assert len(segs) + segs.invalid + len(segs.detections) <= max(groups, text.count("<"))
    for s in segs:
        x1, y1, x2, y2 = s.box
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
        assert s.mask.shape == (size[1], size[0])
        outside = s.mask.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any()


def test_rle_is_cocos_and_decodes_to_the_same_pixels():
    segs = parse_segments(obj((100, 50, 700, 500), CODES[0], "cat") + " ; " + obj((0, 0, 1023, 1023), CODES[1], "dog"),
                          (123, 77), FakeVae())
    out = json.loads(json.dumps(segments_json(segs)))
    assert out["invalid"] == 0
    for seg, item in zip(segs, out["segments"]):
        assert item["mask"]["size"] == [77, 123] and item["box"] == list(seg.box) and item["area"] == seg.area
        rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), seg.mask)
        assert int(coco_mask.area(rle)) == seg.area > 0
    assert mask_to_rle(np.zeros((3, 4), bool)) == {"size": [3, 4], "counts": "<"}  # 12 zeros


def test_drawing_fills_masks_in_one_colour_per_label_and_leaves_the_rest():
    image = PIL.Image.new("RGB", (200, 100), (128, 128, 128))
    text = " ; ".join([obj((0, 0, 1023, 500), CODES[0], "cat"), obj((0, 520, 1023, 1023), CODES[0], "cat"),
                       obj((100, 100, 300, 300), [], "box")])
    segs = parse_segments(text, image.size, FakeVae())
    drawn = np.asarray(draw_segments(image, segs, segs.detections, line_width=1)).astype(int)
    both = segs[0].mask | segs[1].mask
    assert both.any() and (~both).any()
    far = ~both
    far[:40, :] = False  # labels and the detection box are drawn up there
    assert (drawn[far] == 128).all()
    # the same label: the same colour at the same place of the two (identical) masks
    inner0 = segs[0].mask & np.roll(segs[0].mask, 3, 0) & np.roll(segs[0].mask, -3, 0) & np.roll(segs[0].mask, 3, 1) & np.roll(segs[0].mask, -3, 1)
    ys, xs = np.nonzero(inner0[40:])
    y, x = ys[0] + 40, xs[0]
    shift = segs[1].box[0] - segs[0].box[0]
    assert segs[1].mask[y, x + shift]
    assert (drawn[y, x] == drawn[y, x + shift]).all() and not (drawn[y, x] == 128).all()
