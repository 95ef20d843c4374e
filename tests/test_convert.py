"""`paligemma convert`: the written folder loads with pg.load and reproduces the source's logits.

Quantization tolerances. Each weight of a group is rounded to one of 2**bits - 1 steps over the
group's range; for Gaussian weights a group of 32-64 spans about 4.8 standard deviations, so the
rounding error is about 4.8 / 255 / sqrt(12) = 0.5% of a weight's size at 8 bits and
4.8 / 15 / sqrt(12) = 9% at 4 bits. The demo's quantized path (tied embedding used twice, then two
layers of seven matrices) roughly doubles that in the logits: measured 1.2% (8-bit) and 21-24%
(4-bit) relative error. The bounds below are about 2.5x and 1.7x those. The exact check is
the other one: a converted folder gives the very logits of the same quantization done in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as pg
from mlx_paligemma import convert, files
from mlx_paligemma.checkpoint import plan_shards, shard_files
from mlx_paligemma.demo import demo_checkpoint

PROMPT = "caption en"
PATCH = "vision.embeddings.patch_embedding.weight"


@pytest.fixture(scope="module")
def source() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="module")
def image():
    x = Image.linear_gradient("L").resize((160, 120))
    return Image.merge("RGB", (x, x.rotate(90), x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


@pytest.fixture(scope="module")
def source_logits(source, image) -> np.ndarray:
    return pg.load(source, backend="mlx").logits(image, PROMPT)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def stored_tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_float32_conversion_gives_the_same_logits(source, image, source_logits, tmp_path, capsys):
    out = tmp_path / "f32"
    assert convert.main([str(source), str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"{out} (") and "KB)" in printed.out
    assert "writing [" in printed.err and "100%" in printed.err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    tensors = stored_tensors(out)
    assert all(name.split(".")[0] in ("vision", "projector", "text") for name in tensors)
    config = json.loads((out / "config.json").read_text())
    v = config["vision_config"]
    assert tensors[PATCH].shape == (v["hidden_size"], v["patch_size"], v["patch_size"], 3)  # MLX's O,H,W,I
    assert "quantization" not in config
    got = pg.load(out, backend="mlx").logits(image, PROMPT)
    assert np.max(np.abs(got - source_logits)) < 1e-5
    assert leftovers(tmp_path) == []


def test_sharded_output_has_an_index_and_loads(source, image, source_logits, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "SHARD_BYTES", 300_000)
    out = tmp_path / "sharded"
    assert convert.main([str(source), str(out)]) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert set(index["weight_map"]) == set(stored_tensors(out))
    for f in shards:  # at most the limit (plus the header), unless one tensor alone is bigger
        held = [k for k, v in index["weight_map"].items() if v == f.name]
        assert f.stat().st_size < 300_000 + 20_000 or len(held) == 1
    got = pg.load(out, backend="mlx").logits(image, PROMPT)
    assert np.max(np.abs(got - source_logits)) < 1e-5


@pytest.mark.parametrize("bits, group_size, bound", [(8, 64, 0.03), (4, 32, 0.40)])
def test_quantized_conversion(source, image, source_logits, tmp_path, bits, group_size, bound):
    out = tmp_path / f"q{bits}"
    assert convert.main([str(source), str(out), "--quantize", str(bits), "--group-size", str(group_size)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"bits": bits, "group_size": group_size}
    tensors = stored_tensors(out)
    assert tensors["text.layers.0.mlp.up_proj.weight"].dtype == mx.uint32
    assert "text.embed_tokens.scales" in tensors
    assert tensors["vision.encoder.layers.0.mlp.fc1.weight"].dtype == mx.float32  # SigLIP stays exact
    model = pg.load(out, backend="mlx")
    got = model.logits(image, PROMPT)
    in_memory = pg.load(source, backend="mlx", quantize=bits, group_size=group_size).logits(image, PROMPT)
    assert np.array_equal(got, in_memory)
    err = relative_error(got, source_logits)
    assert 0 < err < bound
    assert model.generate(image, PROMPT, max_tokens=3).stats.generated_tokens == 3


def test_bfloat16_conversion_keeps_the_dtype(source, image, tmp_path):
    out = tmp_path / "bf16"
    assert convert.main([str(source), str(out), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in stored_tensors(out).values()} == {mx.bfloat16}
    got = pg.load(out, backend="mlx", dtype="bfloat16").logits(image, PROMPT)
    expected = pg.load(source, backend="mlx", dtype="bfloat16").logits(image, PROMPT)
    assert np.array_equal(got, expected)


def test_refuses_to_overwrite_without_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main([str(source), str(out), "--quantize", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: already exists; pass --force to replace it"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert convert.main([str(source), str(out), "--quantize", "8", "--force"]) == 0
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("module, step", [(convert, "copy_files"), (convert, "check"), (files, "replace_folder")])
def test_interruption_leaves_nothing_behind(source, tmp_path, monkeypatch, capsys, module, step):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, step, interrupt)
    out = tmp_path / "new"
    assert convert.main([str(source), str(out)]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    assert convert.main([str(source), str(old), "--force"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "keep.txt").read_text() == "mine"


def test_unwritable_output_is_one_line_and_loads_nothing(source, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(convert, "_build", lambda *a, **k: pytest.fail("loaded the model for an output it cannot write"))
    assert convert.main([str(source), str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a folder" in err[0]
    assert blocker.read_text() == "not a folder"


def test_full_disk_keeps_the_old_folder(source, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_weights", full)
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    assert convert.main([str(source), str(old), "--force"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # after progress lines
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was changed" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--quantize", "3"], "invalid choice"),
        (["--quantize", "4", "--group-size", "128"], "group size 128"),
        (["--dtype", "float64"], "invalid choice"),
    ],
)
def test_bad_settings_are_one_line(source, tmp_path, capsys, args, needle):
    assert convert.main([str(source), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_source_is_one_line(tmp_path, capsys):
    assert convert.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_paligemma_convert_delegates(source, tmp_path, capsys):
    from mlx_paligemma.cli import main

    out = tmp_path / "via-cli"
    assert main(["convert", str(source), str(out), "--quantize", "8"]) == 0
    assert (out / "config.json").exists()


def test_plan_shards_and_progress():
    sizes = {"a": 5, "b": 5, "c": 12, "d": 1}
    assert plan_shards(sizes, limit=10) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(dict(reversed(sizes.items())), limit=10) == [["d"], ["c"], ["b", "a"]]  # the order given
    assert shard_files(1) == ["model.safetensors"] and shard_files(2)[1] == "model-00002-of-00002.safetensors"
    import io

    stream = io.StringIO()
    bar = convert.Progress("writing", 2000, stream=stream, width=10)
    bar.advance(1000)
    bar.advance(1000)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("writing [----------]   0%")
    assert lines[1].startswith("writing [#####-----]  50%")
    assert lines[-1] == "writing [##########] 100%  2.0 KB / 2.0 KB"


def test_a_quantized_folder_is_not_quantized_again(source, tmp_path, capsys):
    q8 = tmp_path / "q8"
    assert convert.main([str(source), str(q8), "--quantize", "8"]) == 0
    assert convert.main([str(q8), str(tmp_path / "q4"), "--quantize", "4"]) == 2
    assert "already quantized (8 bits, group size 64)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


@pytest.mark.parametrize("name", ["pg2", "pg2_window", "pg1"])
def test_hub_and_transformers_layouts(checkpoints, image, tmp_path, name):
    """transformers-built checkpoints: the 5.x layout, a sharded hub layout, and PaliGemma 1."""
    folder = checkpoints[name].folder
    expected = pg.load(folder, backend="mlx").logits(image, PROMPT)
    out = tmp_path / name
    assert convert.main([str(folder), str(out)]) == 0
    assert (out / "tokenizer_config.json").read_text() == (folder / "tokenizer_config.json").read_text()
    assert np.max(np.abs(pg.load(out, backend="mlx").logits(image, PROMPT) - expected)) < 1e-5
    q4 = tmp_path / f"{name}-q4"
    assert convert.main([str(folder), str(q4), "--quantize", "4", "--group-size", "32"]) == 0
    got = pg.load(q4, backend="mlx").logits(image, PROMPT)
    assert np.array_equal(got, pg.load(folder, backend="mlx", quantize=4, group_size=32).logits(image, PROMPT))
