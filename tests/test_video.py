"""`paligemma video`: frames sampled at the right times, rows equal to `generate` on each frame
alone (detect held to its grammar, as the command does by default), and an annotated clip with
the same frame count and size showing the boxes."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as pg
from mlx_paligemma import cli
from mlx_paligemma.video import parse_every


FPS, COUNT, SIZE = 10, 20, (64, 48)
PROMPT = "detect cat ; dog"


def frame_array(i: int) -> np.ndarray:
    a = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    a[:, :, 0] = i * 12
    a[10:30, 3 * i:3 * i + 10, 1] = 255  # a bar moving right
    return a


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = *SIZE, "yuv420p"
        for i in range(COUNT):
            f = av.VideoFrame.from_ndarray(frame_array(i), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def decoded(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as c:
        return [f.to_image() for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def model():
    return pg.load("demo", backend="mlx")


@pytest.fixture(scope="module")
def seed(model, clip):
    """A sampling seed for which the demo model finds boxes in the first frame (constrained, as
    `paligemma video` runs detect by default)."""
    first = decoded(clip)[0]
    for seed in range(100):
        g = model.generate(first, PROMPT, max_tokens=12, temperature=1.5, seed=seed, constrain=True)
        if pg.parse_detections(g.text, g.image_size):
            return seed
    raise AssertionError("no seed in 0..99 gives a box on the demo model")


def test_rows_at_the_sampled_times_and_the_annotated_clip(model, clip, seed, tmp_path):
    out, saved = tmp_path / "frames.jsonl", tmp_path / "annotated.mp4"
    args = ["video", clip, "--task", "detect", "--prompt", "cat;dog", "--every", "0.5s", "-o", out, "--save", saved,
            "--model", "demo", "--backend", "mlx", "--max-tokens", 12, "--temperature", 1.5, "--seed", seed,
            "--batch-size", 3, "--quiet"]
    assert cli.main([str(a) for a in args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 5, 10, 15]
    assert [r["time_s"] for r in rows] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-6)
    originals = decoded(clip)
    assert len(originals) == COUNT
    boxes = {}
    for r in rows:
        alone = model.generate(originals[r["frame"]], PROMPT, max_tokens=12, temperature=1.5, seed=seed, constrain=True)
        assert r["prompt"] == PROMPT and r["token_ids"] == alone.token_ids and r["image_size"] == list(SIZE)
        boxes[r["frame"]] = pg.parse_detections(alone.text, alone.image_size)
    assert boxes[0]

    annotated = decoded(saved)
    assert len(annotated) == COUNT and all(f.size == SIZE for f in annotated)
    with av.open(str(saved)) as c:
        assert c.streams.video[0].average_rate == FPS
    for i, (got, original) in enumerate(zip(annotated, originals)):
        dets = boxes[max(k for k in boxes if k <= i)]  # the latest sampled frame's boxes
        expected = np.asarray(pg.draw_detections(original, dets), dtype=np.float32)
        got, original = np.asarray(got, dtype=np.float32), np.asarray(original, dtype=np.float32)
        drawn = np.abs(expected - original).sum(-1) > 60  # the box outlines and labels
        if drawn.any():
            assert np.abs(got - expected)[drawn].mean() < 0.5 * np.abs(got - original)[drawn].mean(), i
        else:
            assert np.abs(got - original).mean() < 8, i  # only the codec's loss

    # the same command again finds every frame done
    assert cli.main([str(a) for a in args]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_every_nth_frame_to_stdout(clip, capsys):
    assert cli.main(["video", str(clip), "--task", "caption", "--every", "3f", "--model", "demo", "--backend", "mlx",
                     "--max-tokens", "2", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in rows] == [0, 3, 6, 9, 12, 15, 18]
    assert [r["time_s"] for r in rows] == pytest.approx([i / FPS for i in range(0, COUNT, 3)], abs=1e-6)


def test_parse_every():
    assert parse_every("1s") == (1.0, "s") and parse_every("250ms") == (0.25, "s") and parse_every("10f") == (10, "f")
    for bad in ["", "1", "0s", "-1s", "1.5f", "0f", "soon"]:
        with pytest.raises(pg.SettingError):
            parse_every(bad)


@pytest.mark.parametrize("make, extra, needle", [
    (lambda p: p.write_bytes(b"not a video at all"), [], "not a video FFmpeg can read"),
    (lambda p: None, [], "no such video file"),
    (lambda p: p.write_bytes(b"x"), ["--every", "often"], "--every must be"),
    (lambda p: p.write_bytes(b"x"), ["--save", "{tmp}/out.gif"], "unknown video suffix"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, extra, needle):
    clip = tmp_path / "clip.mp4"
    make(clip)
    args = ["video", str(clip), "--task", "caption", "--model", "demo", *[a.format(tmp=tmp_path) for a in extra]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
