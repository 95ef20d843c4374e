"""Constrained decoding wired through the one loop: `detect`/`segment` through the API, the CLI,
the shell and batch on the demo checkpoint (random weights, so left free it writes malformed
objects) give only well-formed objects when `constrain` is on, the same ids on both backends,
and the free answer when it is off. Well formed is what the parsers say: no invalid group, and
for segment every box at least a pixel wide on this (non-square) picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as pg
from mlx_paligemma import cli
from mlx_paligemma.detection import format_detections
from mlx_paligemma.segmentation import format_segments, rle_to_mask
from mlx_paligemma.shell import Settings, Shell

SIZE = (300, 200)
SETTINGS = {"greedy": dict(max_tokens=40), "sampled": dict(max_tokens=40, temperature=1.0, seed=3)}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("constrained") / "photo.png"
    small = np.random.default_rng(5).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(small).resize(SIZE, Image.Resampling.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def models():
    # float32 on both: the same logits up to float rounding, so the same choices
    return {b: pg.load("demo", backend=b, dtype="float32") for b in ("torch", "mlx")}


def well_formed_segments(out) -> int:
    """Every object of a segment answer parsed as a mask: none invalid, none a bare box; the count."""
    text = out.text
    assert out.segments.invalid == 0 and not out.detections, text
    assert len(out.segments) == text.count("<loc") // 4 and text.count("<loc") % 4 == 0, text
    assert text.count("<seg") == 16 * len(out.segments), text
    assert all(s.label.strip() and ";" not in s.label and s.mask.any() for s in out.segments), text
    return len(out.segments)


def well_formed_detections(out) -> int:
    text = out.text
    assert "<seg" not in text and text.count("<loc") % 4 == 0, text
    assert len(out.detections) == text.count("<loc") // 4, text
    assert all(d.label.strip() and d.box[2] > d.box[0] and d.box[3] > d.box[1] for d in out.detections), text
    return len(out.detections)


@pytest.mark.parametrize("mode", SETTINGS)
def test_api_objects_are_well_formed_and_the_same_on_both_backends(models, photo, mode):
    kw = SETTINGS[mode]
    found = 0
    segments = {b: m.segment(photo, "cat ; dog", constrain=True, **kw) for b, m in models.items()}
    detections = {b: m.detect(photo, "cat ; dog", constrain=True, **kw) for b, m in models.items()}
    for b in models:
        found += well_formed_segments(segments[b]) + well_formed_detections(detections[b])
    assert segments["torch"].token_ids == segments["mlx"].token_ids
    assert detections["torch"].token_ids == detections["mlx"].token_ids
    assert found >= 4  # objects were written (an empty answer is well formed too, and proves nothing)


def test_free_answer_is_not_forced_and_other_prompts_are_untouched(models, photo):
    model = models["mlx"]
    kw = SETTINGS["greedy"]
    free = model.segment(photo, "cat ; dog", **kw)  # off by default in the API
    held = model.segment(photo, "cat ; dog", constrain=True, **kw)
    assert free.token_ids != held.token_ids
    # the random model left free writes something the parser cannot take whole
    assert free.segments.invalid or free.detections or not free.segments, free.text
    assert model.generate(photo, "segment cat ; dog", constrain=False, **kw).token_ids == free.token_ids
    # streaming takes the option the same way
    assert "".join(model.stream(photo, "segment cat ; dog", constrain=True, **kw)) == held.text
    assert model.last.token_ids == held.token_ids
    # a batch with other prompts: only the detect/segment rows follow the grammar
    prompts = ["segment cat ; dog", "caption en", "detect cat"]
    rows = model.generate_batch([photo] * 3, prompts, constrain=True, **kw)
    assert rows[0].token_ids == held.token_ids
    assert rows[1].token_ids == model.generate(photo, "caption en", **kw).token_ids
    assert rows[2].token_ids == model.generate(photo, "detect cat", constrain=True, **kw).token_ids
    assert rows[2].token_ids != model.generate(photo, "detect cat", **kw).token_ids
    with pytest.raises(pg.SettingError, match="constrain"):
        model.generate(photo, "detect cat", constrain="yes")


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


def test_cli_segment_json_masks_and_saved_picture(models, photo, tmp_path, capsys):
    model = models["mlx"]
    kw = SETTINGS["sampled"]
    flags = ["--model", "demo", "--backend", "mlx", "--dtype", "float32", "--max-tokens", 40, "--temperature", 1.0, "--seed", 3]
    saved = tmp_path / "masks.png"
    out = json.loads(run(capsys, "segment", photo, "cat ; dog", *flags, "--json", "--save", saved).out)
    expected = model.segment(photo, "cat ; dog", constrain=True, **kw)
    assert out["token_ids"] == expected.token_ids and out["invalid"] == 0 and out["detections"] == []
    assert len(out["segments"]) == len(expected.segments) >= 1
    for got, seg in zip(out["segments"], expected.segments):
        mask = rle_to_mask(got["mask"])  # pycocotools reading our JSON back
        assert mask.shape == (SIZE[1], SIZE[0]) and (mask == seg.mask).all()
        assert got["area"] == int(mask.sum()) and got["box"] == list(seg.box) and got["label"] == seg.label
    with Image.open(photo) as im:
        drawn = pg.draw_segments(im, expected.segments, expected.detections)
    with Image.open(saved) as im:
        assert (np.asarray(im.convert("RGB")) == np.asarray(drawn)).all()
    assert [p.name for p in tmp_path.iterdir()] == ["masks.png"]  # no temporary file left

    free = json.loads(run(capsys, "segment", photo, "cat ; dog", *flags, "--json", "--no-constrain").out)
    assert free["token_ids"] == model.segment(photo, "cat ; dog", **kw).token_ids != expected.token_ids

    text = run(capsys, "detect", photo, "cat ; dog", *flags).out
    dets = model.detect(photo, "cat ; dog", constrain=True, **kw)
    assert well_formed_detections(dets) >= 1 and text.endswith(format_detections(dets.detections) + "\n")
    free = json.loads(run(capsys, "detect", photo, "cat ; dog", *flags, "--json", "--no-constrain").out)
    assert free["token_ids"] == model.detect(photo, "cat ; dog", **kw).token_ids != dets.token_ids


class Printed:
    def __init__(self):
        self.text = ""

    def __call__(self, *args, sep=" ", end="\n", flush=False):
        self.text += sep.join(map(str, args)) + end

    def take(self) -> str:
        text, self.text = self.text, ""
        return text


def test_shell_segment_detect_save_and_constrain(models, photo, tmp_path, monkeypatch):
    model = models["mlx"]
    kw = SETTINGS["sampled"]
    printed = Printed()
    shell = Shell(lambda: model, Settings(model="demo", image=str(photo), sampling=pg.SamplingParams(**kw)), printed)
    assert shell.settings.sampling.constrain is False  # given settings are kept as they are
    shell = Shell(lambda: model, Settings(model="demo", image=str(photo)), printed)
    assert shell.settings.sampling.constrain is True  # the shell's default
    shell.load()
    for line in ["/max_tokens 40", "/temperature 1.0", "/seed 3", "/settings"]:
        shell.handle(line)
    assert "constrain    on\n" in printed.take()
    with Image.open(photo) as im:
        picture = im.convert("RGB")

    shell.handle("segment cat;dog")
    said = printed.take()
    expected = model.segment(photo, "cat ; dog", constrain=True, **kw)
    assert well_formed_segments(expected) >= 1
    assert expected.text + "\n" in said and format_segments(expected.segments) in said and "malformed" not in said
    out = tmp_path / "masks.png"
    shell.handle(f"/save {out}")
    assert f"saved {out}" in printed.take()
    with Image.open(out) as im:
        assert (np.asarray(im) == np.asarray(pg.draw_segments(picture, expected.segments))).all()

    # a save that fails half-way leaves the old picture whole and no temporary file
    before = out.read_bytes()

    def broken_save(self, fp, format=None, **params):
        fp.write(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    shell.handle(f"/save {out}")
    monkeypatch.undo()
    assert "error: " in printed.take() and out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["masks.png"]

    shell.handle("detect cat ; dog")
    dets = model.detect(photo, "cat ; dog", constrain=True, **kw)
    assert well_formed_detections(dets) >= 1 and format_detections(dets.detections) in printed.take()
    boxes = tmp_path / "boxes.png"
    shell.handle(f"/save {boxes}")
    with Image.open(boxes) as im:
        assert (np.asarray(im) == np.asarray(pg.draw_detections(picture, dets.detections))).all()

    shell.handle("/constrain maybe")
    assert "expected on or off" in printed.take() and shell.settings.sampling.constrain is True
    shell.handle("/constrain off")
    assert "constrain = off" in printed.take()
    shell.handle("segment cat ; dog")
    free = model.segment(photo, "cat ; dog", **kw)
    assert free.token_ids != expected.token_ids and free.text + "\n" in printed.take()


def test_readme_picture_is_what_its_command_draws(tmp_path, capsys):
    """examples/segment-demo.jpg is the output of the command the README gives beside it."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    command = ('paligemma segment examples/images/astronaut.jpg "person ; flag" --model demo --dtype float32\n'
               '--temperature 1 --seed 3 --save examples/segment-demo.jpg')
    assert command in readme and "](examples/segment-demo.jpg)" in readme
    out = tmp_path / "segment-demo.jpg"
    run(capsys, "segment", repo / "examples/images/astronaut.jpg", "person ; flag", "--model", "demo", "--dtype", "float32",
        "--temperature", 1, "--seed", 3, "--save", out, "--backend", "mlx")
    with Image.open(out) as made, Image.open(repo / "examples/segment-demo.jpg") as shown:
        made, shown = np.asarray(made, np.float32), np.asarray(shown, np.float32)
    with Image.open(repo / "examples/images/astronaut.jpg") as photo:
        original = np.asarray(photo.convert("RGB"), np.float32)
    assert made.shape == shown.shape
    assert np.abs(made - shown).mean() < 1.0  # the same drawing, up to JPEG encoding
    assert np.abs(shown - original).mean() > 10  # and it does draw something


def test_shell_save_after_an_answer_without_objects_saves_nothing(models, photo, tmp_path):
    printed = Printed()
    shell = Shell(lambda: models["mlx"], Settings(model="demo", image=str(photo)), printed)
    shell.load()
    shell.handle("/max_tokens 30")
    shell.handle("detect cat")
    assert "(/save PATH writes the picture with these boxes)" in printed.take()
    shell.handle("/max_tokens 4")  # no room for one object: the grammar's answer is empty
    shell.handle("segment cat")
    assert "(no masks in the answer)" in printed.take()
    shell.handle(f"/save {tmp_path / 'x.png'}")
    assert "no boxes or masks yet" in printed.take() and not list(tmp_path.iterdir())
