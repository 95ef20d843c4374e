import functools
import io
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_paligemma.detection import parse_detections
from mlx_paligemma.errors import ImageError
from mlx_paligemma.image import load_image

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
bins = st.integers(0, 1023)
locs = st.lists(bins, min_size=4, max_size=4)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-'_.éü猫", min_size=1, max_size=8)
labels = st.lists(words, min_size=1, max_size=4).map(" ".join)
objects = st.tuples(locs, st.booleans(), labels)


def _object_text(obj):
    loc_values, segmented, label = obj
    segs = "".join(f"<seg{(7 * i) % 128:03d}>" for i in range(16)) if segmented else ""
    return "".join(f"<loc{v:04d}>" for v in loc_values) + segs + " " + label


token_soup = st.lists(
    st.one_of(
        bins.map(lambda v: f"<loc{v:04d}>"),
        st.integers(0, 9999).map(lambda v: f"<loc{v:04d}>"),
        st.integers(0, 127).map(lambda v: f"<seg{v:03d}>"),
        st.sampled_from([" ; ", ";", " ", "<eos>", "<loc", ">", "<", "\n", "<loc12>"]),
        words,
        st.text(max_size=5),
    ),
    max_size=40,
).map("".join)


def _check_boxes(dets, size):
    width, height = size
    for d in dets:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= width
        assert 0 <= y0 <= y1 <= height
        assert not re.search(r"<[^<>]*>", d.label)
        assert d.label == d.label.strip()


@FAST
@given(st.text(), sizes)
def test_parse_arbitrary_text_never_raises_and_boxes_fit(text, size):
    _check_boxes(parse_detections(text, size), size)


@FAST
@given(token_soup, sizes)
def test_parse_token_soup_never_raises_and_boxes_fit(text, size):
    _check_boxes(parse_detections(text, size), size)


@FAST
@given(st.lists(objects, max_size=6), sizes, st.sampled_from(["", "<eos>", " ", "\n"]))
def test_well_formed_objects_come_back_whole_and_in_order(objs, size, tail):
    text = " ; ".join(_object_text(o) for o in objs) + tail
    dets = parse_detections(text, size)
    _check_boxes(dets, size)
    assert [d.label for d in dets] == [o[2] for o in objs]
    width, height = size
    for d, (loc_values, _, _) in zip(dets, objs):
        y_a, x_a, y_b, x_b = (v / 1024 for v in loc_values)
        expected = (min(x_a, x_b) * width, min(y_a, y_b) * height, max(x_a, x_b) * width, max(y_a, y_b) * height)
        assert d.box == pytest.approx(expected)


@functools.lru_cache(maxsize=None)
def _seeds():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    encoded = []
    for fmt, im, kw in [
        ("PNG", rgb, {}),
        ("PNG", rgb.convert("RGBA"), {}),
        ("JPEG", rgb, {"exif": _rotated_exif()}),
        ("GIF", rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P").rotate(90)]}),
    ]:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        encoded.append(buf.getvalue())
    return tuple(encoded)


def _rotated_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def _load_or_image_error(path, data):
    path.write_bytes(data)
    try:
        out = load_image(path, max_pixels=2_000_000)
    except ImageError as e:
        assert "\n" not in str(e)
        return
    assert out.mode == "RGB"
    out.tobytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input.img"


# Pillow warns about corrupt EXIF or TIFF tags it skips; those inputs still load or fail cleanly
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_random_bytes_give_an_image_or_an_image_error(scratch, data):
    _load_or_image_error(scratch, data)


mutations = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 3), edits=mutations, cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_mutated_images_give_an_image_or_an_image_error(scratch, seed, edits, cut):
    data = bytearray(_seeds()[seed])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _load_or_image_error(scratch, bytes(data))
