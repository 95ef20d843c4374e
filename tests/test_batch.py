"""`paligemma batch`: folder, glob and manifest inputs, resume after a kill, parquet, error rows.

Each row is checked against `Model.generate` on that image and prompt alone (the token ids),
with sampling on so that the demo model's random answers differ from image to image. float32:
in bf16 a left-padded row's logits differ from the row alone by a rounding step (about 0.01 on
a range of 2 on the demo), enough to change a token sampled from the demo's flat distributions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as pg
from mlx_paligemma import batch, cli

from .conftest import interruptible

REPO = Path(__file__).resolve().parents[1]
SAMPLING = dict(max_tokens=6, temperature=1.0, seed=3)
SAMPLING_ARGS = ["--max-tokens", "6", "--temperature", "1.0", "--seed", "3", "--dtype", "float32"]


def picture(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five distinct photos (one in a subfolder, two sizes), a copy of one under another name,
    a corrupt file, and files the folder scan must ignore."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / ".hidden").mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "c.png", "sub/d.jpg", "sub/e.webp"]):
        picture(i, (64, 48) if i % 2 else (40, 72)).save(root / name)
    (root / "b_copy.png").write_bytes((root / "b.png").read_bytes())
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    picture(9).save(root / ".hidden" / "x.png")
    picture(9).save(root / "._a.jpg")
    return root


@pytest.fixture(scope="module", params=["torch", "mlx"])
def model(request):
    return pg.load("demo", backend=request.param, dtype="float32")


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rows_match_generate(model, rows, files: dict[str, Path]):
    """Every row has the ids `generate` gives on its image alone, or an error naming its file
    (detect/segment held to their grammar, as batch does by default; other prompts are untouched)."""
    for row in rows:
        path = files[row["input"]]
        if row["error"]:
            with pytest.raises(pg.ImageError):
                model.generate(path, row["prompt"], **SAMPLING, constrain=True)
            assert str(path) in row["error"]
            continue
        alone = model.generate(path, row["prompt"], **SAMPLING, constrain=True)
        assert row["token_ids"] == alone.token_ids, row["input"]
        assert row["text"] == alone.text
        with Image.open(path) as im:
            assert row["image_size"] == list(im.size)
        assert row["stats"]["generated_tokens"] == len(alone.token_ids)


def test_folder_rows_equal_generate_alone(model, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    assert run("batch", folder, "--task", "caption", "-o", out, "--batch-size", 3, "--model", "demo",
               "--backend", model.backend.name, *SAMPLING_ARGS, "--quiet") == 0
    rows = read_rows(out)
    expected = ["a.jpg", "b.png", "b_copy.png", "c.png", "sub/broken.jpg", "sub/d.jpg", "sub/e.webp"]
    assert sorted(r["input"] for r in rows) == expected
    assert all(r["prompt"] == "caption en" for r in rows)
    assert [r["input"] for r in rows if r["error"]] == ["sub/broken.jpg"]
    assert_rows_match_generate(model, rows, {name: folder / name for name in expected})
    by_input = {r["input"]: r for r in rows}
    assert by_input["b_copy.png"]["token_ids"] == by_input["b.png"]["token_ids"]


def test_glob_rows_equal_generate_alone(model, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    pattern = str(folder / "**" / "*.png")
    assert run("batch", pattern, "--task", "detect", "--prompt", "cat;dog", "-o", out, "--batch-size", 2,
               "--model", "demo", "--backend", model.backend.name, *SAMPLING_ARGS, "--quiet") == 0
    rows = read_rows(out)
    # glob's own rules: `**` does not descend into hidden folders, `*` does not match dot files
    files = {str(folder / n): folder / n for n in ["b.png", "b_copy.png", "c.png"]}
    assert sorted(r["input"] for r in rows) == sorted(files)
    assert {r["prompt"] for r in rows} == {"detect cat ; dog"}
    assert_rows_match_generate(model, rows, files)
    for r in rows:
        w, h = r["image_size"]
        assert r["detections"] == [
            {"label": d.label, "box": [round(v, 1) for v in d.box]} for d in pg.parse_detections(r["text"], (w, h))
        ]


def test_manifest_jsonl_and_csv_with_prompts_per_row(model, folder, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"image": str(folder / "a.jpg"), "prompt": "what colour is it?"},
        {"image": str(folder / "a.jpg"), "question": "how many things?"},
        {"image": "photos/c.png"},  # relative to the manifest's folder; the --prompt question
        {"image": str(folder / "a.jpg"), "prompt": "what colour is it?"},  # listed twice: two rows
        {"image": str(folder / "missing.jpg")},
        {"prompt": "no image here"},
    ]
    (tmp_path / "photos").symlink_to(folder)
    manifest.write_text("\n".join(json.dumps(x) for x in lines[:3]) + "\n{not json\n"
                        + "\n".join(json.dumps(x) for x in lines[3:]) + "\n")
    out = tmp_path / "answers.jsonl"
    assert run("batch", manifest, "--task", "answer", "--prompt", "what is it?", "-o", out, "--model", "demo",
               "--backend", model.backend.name, *SAMPLING_ARGS, "--quiet") == 0
    rows = read_rows(out)
    assert len(rows) == 7
    good = [r for r in rows if not r["error"]]
    assert sorted((r["input"], r["prompt"]) for r in good) == sorted([
        (str(folder / "a.jpg"), "answer en what colour is it?"),
        (str(folder / "a.jpg"), "answer en what colour is it?"),
        (str(folder / "a.jpg"), "answer en how many things?"),
        ("photos/c.png", "answer en what is it?"),
    ])
    assert_rows_match_generate(model, good, {str(folder / "a.jpg"): folder / "a.jpg", "photos/c.png": folder / "c.png"})
    errors = {r["input"]: r["error"] for r in rows if r["error"]}
    assert errors.keys() == {"m.jsonl:4", "m.jsonl:7", str(folder / "missing.jpg")}
    assert errors["m.jsonl:4"].startswith("m.jsonl:4: not a JSON object")
    assert errors["m.jsonl:7"] == "m.jsonl:7: the row has no `image`"
    assert errors[str(folder / "missing.jpg")] == f"{folder / 'missing.jpg'}: no such image file"

    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text(f"image,prompt\n{folder / 'b.png'},\"cat ; dog\"\n{folder / 'sub/d.jpg'},\n")
    out = tmp_path / "boxes.jsonl"
    assert run("batch", csv_manifest, "--task", "detect", "--prompt", "car", "-o", out, "--model", "demo",
               "--backend", model.backend.name, *SAMPLING_ARGS, "--quiet") == 0
    rows = read_rows(out)
    assert [(r["input"], r["prompt"]) for r in rows] == [
        (str(folder / "b.png"), "detect cat ; dog"), (str(folder / "sub/d.jpg"), "detect car")]
    assert_rows_match_generate(model, rows, {str(folder / "b.png"): folder / "b.png", str(folder / "sub/d.jpg"): folder / "sub/d.jpg"})


def test_identical_images_are_decoded_and_encoded_once(folder, tmp_path, monkeypatch):
    import mlx_paligemma.image as image_module

    model = pg.load("demo", backend="torch")
    decoded, encoded = [], []
    real_load, real_features = image_module.load_image, model.backend.image_features
    monkeypatch.setattr(image_module, "load_image", lambda src, **kw: decoded.append(src) or real_load(src, **kw))
    monkeypatch.setattr(model.backend, "image_features", lambda px: encoded.append(len(px)) or real_features(px))
    items = [batch.Item(n, str(folder / n), p) for n in ["b.png", "a.jpg", "b_copy.png"] for p in ["ocr", "caption en"]]
    out = batch.JsonlOutput(tmp_path / "r.jsonl")
    counts = batch.run_batch(model, batch.group_by_image(items), out, batch_size=4, max_tokens=2)
    assert counts["rows"] == 6 and counts["errors"] == 0
    assert sorted(os.path.basename(str(s)) for s in decoded) == ["a.jpg", "b.png"]  # b_copy.png: same bytes as b.png
    assert sum(encoded) == 2


def test_a_prompt_past_the_context_is_an_error_row_not_a_failed_batch(folder, tmp_path):
    model = pg.load("demo", backend="torch")
    long = "answer en " + "why " * (model.context_len + 10)
    items = [batch.Item("a.jpg", str(folder / "a.jpg"), "ocr"), batch.Item("a.jpg", str(folder / "a.jpg"), long),
             batch.Item("c.png", str(folder / "c.png"), "ocr")]
    out = batch.JsonlOutput(tmp_path / "r.jsonl")
    batch.run_batch(model, items, out, batch_size=3, max_tokens=3)
    rows = read_rows(out.path)
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "context" in rows[1]["error"]
    assert rows[2]["token_ids"] == model.generate(folder / "c.png", "ocr", max_tokens=3).token_ids


def test_resume_after_sigkill_gives_every_row_once(tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(12):
        picture(100 + i).save(photos / f"p{i:02d}.png")
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "mlx_paligemma", "batch", str(photos), "--task", "caption", "-o", str(out),
           "--batch-size", "2", "--model", "demo", "--backend", "mlx", "--max-tokens", "24"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < 12  # the kill landed part-way
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves: a row without its newline
        f.write(b'{"input": "p11.png", "prompt": "capt')
    resumed = subprocess.run(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} of 12 rows already in" in resumed.stderr
    rows = read_rows(out)  # every line parses: the partial one is gone
    assert sorted(r["input"] for r in rows) == [f"p{i:02d}.png" for i in range(12)]
    model = pg.load("demo", backend="mlx")
    for r in rows:
        assert r["token_ids"] == model.generate(photos / r["input"], "caption en", max_tokens=24).token_ids


def test_ctrl_c_keeps_the_rows_written_and_exits_130(tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(12):
        picture(200 + i).save(photos / f"p{i:02d}.png")
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "mlx_paligemma", "batch", str(photos), "--task", "ocr", "-o", str(out),
           "--batch-size", "2", "--model", "demo", "--backend", "mlx", "--max-tokens", "24"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to resume" in err
    data = out.read_bytes()
    assert data.endswith(b"\n") and all(json.loads(line)["error"] is None for line in data.splitlines())


def test_parquet_output_resumes_and_never_counts_a_row_twice(folder, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    args = ["batch", folder, "--task", "caption", "-o", out, "--model", "demo", "--backend", "torch", *SAMPLING_ARGS, "--quiet"]
    assert run(*args) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 7 and not (tmp_path / "r.parquet.partial.jsonl").exists()
    jsonl = tmp_path / "r.jsonl"
    assert run(*args[:5], jsonl, *args[6:]) == 0
    key = lambda r: r["input"]
    timing = ("ttft_s", "decode_tokens_per_s", "peak_memory_bytes", "vision_s", "total_s")
    same = lambda rows: [dict(r, stats=r["stats"] and {k: v for k, v in r["stats"].items() if k not in timing})
                         for r in sorted(rows, key=key)]
    assert same(table) == same(read_rows(jsonl))

    # a kill between the rename of the new parquet file and the removal of its journal
    output = batch.ParquetOutput(tmp_path / "s.parquet")
    rows = sorted(table, key=key)
    for r in rows[:3]:
        output.write(r)
    saved = output.journal.path.read_bytes()
    output.finish()
    output.journal.path.write_bytes(saved)
    assert [r["input"] for r in batch.ParquetOutput(tmp_path / "s.parquet").existing()] == [r["input"] for r in rows[:3]]
    assert not output.journal.path.exists()  # recognised as absorbed, and removed
    # a journal with new rows and a partial last line, beside an earlier parquet file
    output = batch.ParquetOutput(tmp_path / "s.parquet")
    for r in rows[3:5]:
        output.write(r)
    output.close()
    with open(output.journal.path, "ab") as f:
        f.write(b'{"input": "x", "pro')
    assert [r["input"] for r in output.existing()] == [r["input"] for r in rows[:5]]
    output.finish()
    assert sorted(pq.read_table(tmp_path / "s.parquet").to_pylist(), key=key) == rows[:5]
    assert not output.journal.path.exists()


@pytest.mark.parametrize("args, needle", [
    (["--task", "caption", "-o", "{tmp}/r.txt"], "must end in .jsonl or .parquet"),
    (["--task", "caption", "-o", "{tmp}/nowhere/r.jsonl"], "does not exist"),
    (["--task", "answer", "-o", "{tmp}/r.jsonl"], "answer needs some text"),
    (["--task", "detect", "--prompt", " ; ", "-o", "{tmp}/r.jsonl"], "detect needs at least one thing"),
    (["--task", "caption", "-o", "{tmp}/r.jsonl", "--batch-size", "0"], "--batch-size must be"),
    (["--task", "caption", "-o", "{tmp}/r.jsonl", "--max-tokens", "0"], "max_tokens must be"),
    (["--task", "colour", "-o", "{tmp}/r.jsonl"], "invalid choice"),
    (["--task", "caption", "-o", "{tmp}/r.jsonl", "--ray", "--backend", "mlx"], "--ray runs the torch backend"),
])
def test_bad_settings_are_one_line_before_loading(folder, tmp_path, capsys, args, needle):
    assert run("batch", folder, *[a.format(tmp=tmp_path) for a in args], "--model", str(tmp_path / "no-model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_inputs_that_hold_no_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("path,prompt\nx.jpg,hi\n")
    (tmp_path / "r.jsonl").write_text("this is not ours\n")
    for source, needle in [(tmp_path / "empty", "no images in the folder"), (tmp_path / "nothing*.jpg", "no images in files matching"),
                           (tmp_path / "m.csv", "needs a header line with an `image` column"),
                           (tmp_path / "none", "no such folder or manifest")]:
        assert run("batch", source, "--task", "ocr", "-o", tmp_path / "out.jsonl", "--model", "demo") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err, err
    picture(0).save(tmp_path / "empty" / "a.png")
    assert run("batch", tmp_path / "empty", "--task", "ocr", "-o", tmp_path / "r.jsonl", "--model", "demo") == 2
    assert "r.jsonl:1: not a row of a batch run" in capsys.readouterr().err
    assert (tmp_path / "r.jsonl").read_text() == "this is not ours\n"


def test_ray_pipeline_gives_the_rows_of_a_local_run(folder, tmp_path):
    """A local Ray instance with 2 CPUs: one model actor (1 CPU) and the decoding tasks."""
    import ray

    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    args = [folder, "--task", "detect", "--prompt", "cat", "--model", "demo", "--backend", "torch",
            "--batch-size", 3, *SAMPLING_ARGS, "--quiet"]
    assert run("batch", *args, "-o", local) == 0
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run("batch", *args, "-o", distributed, "--ray", "--ray-actors", 1) == 0
    finally:
        ray.shutdown()
    print(f"ray run: {time.perf_counter() - start:.1f} s")
    timing = ("ttft_s", "decode_tokens_per_s", "peak_memory_bytes", "vision_s", "total_s", "batch_size")
    same = lambda rows: sorted(
        (dict(r, stats=r["stats"] and {k: v for k, v in r["stats"].items() if k not in timing}) for r in rows),
        key=lambda r: r["input"])
    rows = same(read_rows(distributed))
    assert rows == same(read_rows(local))
    assert len(rows) == 7 and [r["input"] for r in rows if r["error"]] == ["sub/broken.jpg"]


def test_segment_rows_hold_the_masks_as_coco_rle(folder, tmp_path):
    from pycocotools import mask as coco_mask

    from mlx_paligemma.segmentation import parse_segments

    model = pg.load("demo", backend="torch", dtype="float32")
    vae = model.mask_decoder()
    # an answer with one mask and one bare box (the random demo model rarely writes 16 codes in a row)
    text = ("<loc0100><loc0200><loc0700><loc0900>" + "".join(f"<seg{c:03d}>" for c in range(0, 128, 8))
            + " cat ; <loc0000><loc0000><loc0500><loc0500> dog")
    size = (40, 72)
    row = batch.result_row(batch.Item("a.jpg", "", "segment cat ; dog"), pg.Generation(text, [], pg.Stats(), size), size, 1, vae)
    row = json.loads(json.dumps(row))  # what a reader of the file gets
    expected = parse_segments(text, size, vae)
    assert [s["label"] for s in row["segments"]] == ["cat"] and row["invalid"] == 0
    mask = coco_mask.decode({"size": row["segments"][0]["mask"]["size"], "counts": row["segments"][0]["mask"]["counts"].encode()})
    assert mask.shape == (72, 40) and (mask.astype(bool) == expected[0].mask).all() and mask.any()
    assert row["segments"][0]["box"] == list(expected[0].box) and row["segments"][0]["area"] == int(mask.sum())
    assert row["detections"] == [{"label": "dog", "box": [round(v, 1) for v in expected.detections[0].box]}]

    out = tmp_path / "masks.jsonl"
    assert run("batch", folder, "--task", "segment", "--prompt", "cat", "-o", out, "--model", "demo", "--backend", "torch",
               *SAMPLING_ARGS, "--quiet") == 0
    rows = read_rows(out)
    assert len(rows) == 7
    for r in rows:
        assert r["prompt"] == "segment cat"
        if not r["error"]:
            segments = parse_segments(r["text"], tuple(r["image_size"]), vae)
            assert len(r["segments"]) == len(segments) and r["invalid"] == segments.invalid
            assert len(r["detections"]) == len(segments.detections)


def test_detect_and_segment_rows_follow_the_grammar_unless_told_not_to(folder, tmp_path):
    """batch holds detect/segment rows to the objects' grammar by default (as the CLI does);
    --no-constrain gives the free answers."""
    model = pg.load("demo", backend="mlx", dtype="float32")
    files = {str(folder / name): folder / name for name in ["b.png", "b_copy.png", "c.png"]}
    pattern = str(folder / "*.png")
    for task in ("segment", "detect"):
        held, free = tmp_path / f"{task}.jsonl", tmp_path / f"{task}-free.jsonl"
        args = [pattern, "--task", task, "--prompt", "cat", "--model", "demo", "--backend", "mlx", "--batch-size", 2,
                *SAMPLING_ARGS, "--max-tokens", 30, "--quiet"]
        assert run("batch", *args, "-o", held) == 0
        assert run("batch", *args, "-o", free, "--no-constrain") == 0
        kw = dict(SAMPLING, max_tokens=30)
        loose_rows = {r["input"]: r for r in read_rows(free)}
        rows = read_rows(held)
        assert sorted(r["input"] for r in rows) == sorted(loose_rows) == sorted(files)
        for row in rows:
            path, loose = files[row["input"]], loose_rows[row["input"]]
            assert row["token_ids"] == model.generate(path, f"{task} cat", constrain=True, **kw).token_ids
            assert loose["token_ids"] == model.generate(path, f"{task} cat", **kw).token_ids != row["token_ids"]
            objects = row["text"].count("<loc") // 4
            assert objects >= 1 and row["text"].count("<loc") == 4 * objects
            if task == "segment":
                assert row["invalid"] == 0 and len(row["segments"]) == objects and row["detections"] == []
            else:
                assert len(row["detections"]) == objects
