"""Bad input, faults and untrusted files: clear errors, nothing lost, nothing executed.

One test (or one parametrized family) per item of the robustness issue: prompts, settings,
checkpoints, interruption, and generation always stopping. Everything runs on the demo
checkpoint or corrupt copies of it, on both backends where a backend is involved; the command
line runs as a subprocess and must answer a bad input with exit code 2 and one `error:` line.

Prompt behaviours chosen (transformers' PaliGemmaProcessor is the reference where it is sound):
- "" and "   " are valid prompts (PaliGemma's prefix may be empty): `<image>`xN `<bos>` `\\n`.
- A prompt is text: `<image>`, `<bos>`, `<eos>`, `<pad>` typed in it are encoded as characters,
  so the image-token count never changes and `<eos>` never ends the prompt (transformers turns a
  typed `<eos>` into the eos id and refuses a second `<image>`; we do neither).
- `<loc0001>` and `<seg001>` typed in a prompt stay single tokens, as in transformers.
- Text that is not valid Unicode (a lone surrogate) is a PromptError.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma import cli
from mlx_paligemma.config import PaliGemmaConfig
from mlx_paligemma.demo import demo_checkpoint
from mlx_paligemma.tokenizer import Tokenizer

from .conftest import interruptible

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["mlx", "torch"]
SMALL_CONTEXT = 300  # 256 image tokens + a short prompt fit; a long one does not
IMAGE = np.asarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3)), dtype=np.uint8)


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))  # MLX_PALIGEMMA_CACHE: conftest
    return subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(IMAGE).save(path)
    return path


@pytest.fixture(scope="module")
def models():
    return {b: pg.load("demo", backend=b) for b in BACKENDS}


@pytest.fixture(scope="module")
def small_context_folder(tmp_path_factory) -> Path:
    """The demo checkpoint with a context of SMALL_CONTEXT tokens."""
    folder = tmp_path_factory.mktemp("ckpt") / "small-context"
    shutil.copytree(demo_checkpoint(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = SMALL_CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def demo_copy(small_context_folder: Path) -> Path:
    """The demo checkpoint under another name, with its full context (the CLI prints no demo note for it)."""
    folder = small_context_folder.parent / "demo-copy"
    if not folder.exists():
        shutil.copytree(demo_checkpoint(), folder)
    return folder


@pytest.fixture(scope="module")
def small_models(small_context_folder):
    return {b: pg.load(small_context_folder, backend=b) for b in BACKENDS}


def forbid_compute(monkeypatch, model):
    def fail(*args, **kwargs):
        raise AssertionError("the model ran although the input was refused")

    for name in ("image_features", "prefill", "decode", "forward_logits"):
        monkeypatch.setattr(model.backend, name, fail)


# ---- prompts ----


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_blank_prompts_are_answered(models, backend):
    model = models[backend]
    n, image, bos = model.config.num_image_tokens, model.config.image_token_index, model.tokenizer.bos_id
    newline = model.tokenizer.encode("\n")
    assert model.prompt_ids("") == [image] * n + [bos] + newline
    assert model.prompt_ids("   ") == [image] * n + [bos] + model.tokenizer.encode("   ") + newline
    for prompt in ("", "   "):
        g = model.generate(IMAGE, prompt, max_tokens=4)
        assert len(g.token_ids) == 4 if g.finished_by == "max_tokens" else g.finished_by == "eos"


@pytest.fixture(scope="module")
def json_tokenizer_folder(tmp_path_factory) -> Path:
    """The demo tokenizer as transformers saves it (tokenizer.json only, `<image>` an added special token)."""
    from transformers import AutoTokenizer

    src = tmp_path_factory.mktemp("sp")
    shutil.copy(demo_checkpoint() / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<image>"], special_tokens=True)
    out = tmp_path_factory.mktemp("json")
    tok.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    assert (out / "tokenizer.json").exists()
    return out


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
def test_special_token_text_stays_text(json_tokenizer_folder, source):
    config = PaliGemmaConfig.from_file(demo_checkpoint() / "config.json")
    folder = demo_checkpoint() if source == "tokenizer.model" else json_tokenizer_folder
    tok = Tokenizer(folder)
    n, image = config.num_image_tokens, config.image_token_index
    for text in ("<image>", "look <image><image> here", "<eos>", "a<eos>b", "<bos>", "<pad>"):
        ids = tok.prompt_ids(text, n, image)
        assert ids.count(image) == n, text  # no extra image slot
        assert ids[n] == tok.bos_id and ids.count(tok.bos_id) == 1, text
        assert tok.eos_id not in ids and tok.pad_id not in ids, text
        assert tok.decode(ids[n + 1:]) == text + "\n", text
    ids = tok.prompt_ids("detect <loc0001><seg002>", n, image)
    assert [tok.piece(i) for i in ids[-3:-1]] == ["<loc0001>", "<seg002>"]  # as transformers does


def test_tokenizer_json_matches_sentencepiece_and_transformers(json_tokenizer_folder):
    """Ordinary prompts (empty, blank, non-ASCII) give transformers' ids through either tokenizer file."""
    from transformers import AutoTokenizer

    sp, hf = Tokenizer(demo_checkpoint()), Tokenizer(json_tokenizer_folder)
    oracle = AutoTokenizer.from_pretrained(json_tokenizer_folder)
    image = oracle.convert_tokens_to_ids("<image>")
    for text in ("", "   ", "caption en", "Ünïcödé 中文 😀 e\u0301 \u200b\x00", "detect <loc0001>"):
        want = [image] * 3 + [oracle.bos_token_id] + oracle(text + "\n", add_special_tokens=False)["input_ids"]
        assert sp.prompt_ids(text, 3, image) == hf.prompt_ids(text, 3, image) == want, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_and_non_ascii_prompts_generate(models, backend):
    model = models[backend]
    for prompt in ("<image> what is this <eos> <bos>", "detect <loc0001> cat", "Ünïcödé 中文 😀\x00\t"):
        g = model.generate(IMAGE, prompt, max_tokens=3)
        assert len(g.token_ids) <= 3 and g.finished_by in ("eos", "max_tokens")
    with pytest.raises(pg.PromptError, match="not valid Unicode"):
        model.generate(IMAGE, "bad \ud800 surrogate", max_tokens=3)
    with pytest.raises(pg.PromptError, match="prompt must be text"):
        model.generate(IMAGE, b"bytes", max_tokens=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_past_the_context_fails_before_any_compute(small_models, backend, monkeypatch):
    model = small_models[backend]
    forbid_compute(monkeypatch, model)
    long_prompt = "the quick brown fox " * 20
    for call in (
        lambda: model.generate(IMAGE, long_prompt, max_tokens=1),
        lambda: list(model.stream(IMAGE, long_prompt, max_tokens=1)),
        lambda: model.generate_batch([IMAGE, IMAGE], ["caption en", long_prompt], max_tokens=1),
        lambda: model.logits(IMAGE, long_prompt),
        lambda: model.check(long_prompt),
    ):
        with pytest.raises(pg.PromptError, match=f"context is {SMALL_CONTEXT}"):
            call()


# ---- settings ----

BAD_SAMPLING = [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), ">= 0"), ("temperature", float("inf"), ">= 0"),
    ("temperature", "hot", ">= 0"), ("temperature", True, ">= 0"), ("temperature", None, ">= 0"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", -1, "(0, 1]"), ("top_p", float("nan"), "(0, 1]"),
    ("top_p", "0.5", "(0, 1]"),
    ("top_k", -1, ">= 0"), ("top_k", 2.5, ">= 0"), ("top_k", True, ">= 0"), ("top_k", "3", ">= 0"),
    ("max_tokens", 0, "[1, 8192]"), ("max_tokens", -5, "[1, 8192]"), ("max_tokens", 8193, "[1, 8192]"),
    ("max_tokens", 2.0, "[1, 8192]"), ("max_tokens", True, "[1, 8192]"), ("max_tokens", None, "[1, 8192]"),
    ("max_tokens", float("inf"), "[1, 8192]"),
    ("seed", -1, ">= 0"), ("seed", 1.5, ">= 0"), ("min_tokens", -1, ">= 0"),
    ("repetition_penalty", 0, "> 0"), ("repetition_penalty", -1.2, "> 0"), ("repetition_penalty", float("nan"), "> 0"),
    ("repetition_penalty", "1.2", "> 0"), ("stop", [""], "non-empty strings"), ("stop", [3], "non-empty strings"),
    ("stop", 3, "non-empty strings"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_generation_settings_name_the_setting_and_range(models, backend, monkeypatch):
    model = models[backend]
    forbid_compute(monkeypatch, model)
    for name, value, allowed in BAD_SAMPLING:
        stream = lambda *a, **k: list(model.stream(*a, **k))  # noqa: E731
        check = lambda image, prompt, **k: model.check(prompt, **k)  # noqa: E731
        for call in (model.generate, stream, check):
            with pytest.raises(pg.SettingError) as info:
                call(IMAGE, "caption en", **{name: value})
            assert isinstance(info.value, ValueError) and isinstance(info.value, pg.PaliGemmaError)
            message = str(info.value)
            assert name in message and allowed in message and "\n" not in message, (name, value, message)


def test_bad_load_settings_fail_before_the_checkpoint_is_read():
    missing = "/no/such/checkpoint"
    for kwargs, needle in (
        (dict(backend="tpu"), "backend must be one of auto, mlx, torch"),
        (dict(backend="torch", dtype="float8"), "dtype must be one of float32, bfloat16, float16"),
        (dict(backend="mlx", dtype="fp32"), "dtype must be one of"),
        (dict(backend="mlx", device="cuda"), "device for the mlx backend must be cpu or gpu"),
        (dict(backend="torch", quantize=3), "quantize must be 4 or 8"),
        (dict(backend="mlx", quantize=True), "quantize must be 4 or 8"),
        (dict(backend="mlx", quantize=4, group_size=0), "group_size for the mlx backend must be one of 32, 64, 128"),
    ):
        with pytest.raises(pg.SettingError, match=needle.replace("(", r"\(")):
            pg.load(missing, **kwargs)


@pytest.mark.parametrize("device", ["tpu", "cuda:past-the-last", "bogus:x"])
def test_unknown_torch_device_is_a_setting_error(device):
    import torch

    if device == "cuda:past-the-last":
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last device: absent on every machine
    with pytest.raises(pg.SettingError, match="device"):
        pg.load("demo", backend="torch", device=device)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--temperature", "inf"], "temperature must be a number >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-1"], "top_k must be a whole number >= 0"),
        (["--max-tokens", "0"], "max_tokens must be a whole number >= 1"),
        (["--max-tokens", "9000", "--model", "{copy}", "--backend", "mlx"], "max_tokens must be a whole number in [1, 8192]"),
        (["--dtype", "float8"], "--dtype: invalid choice"),
        (["--backend", "tpu"], "--backend: invalid choice"),
    ],
)
def test_cli_bad_setting_is_one_line_and_exit_2(photo, small_context_folder, args, needle):
    line = one_error_line(run_cli("caption", photo, *[a.format(copy=demo_copy(small_context_folder)) for a in args]))
    assert needle in line


# ---- checkpoints ----


def rewrite_weights(folder: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def corrupt(kind: str, folder: Path) -> str:
    """Damage a copy of the demo checkpoint; returns a phrase the error must contain."""
    weights = folder / "model.safetensors"
    embed = "language_model.model.embed_tokens.weight"
    q_proj = "language_model.model.layers.1.self_attn.q_proj.weight"
    if kind == "missing folder":
        shutil.rmtree(folder)
        return "no such checkpoint folder"
    if kind == "a file, not a folder":
        shutil.rmtree(folder)
        folder.write_text("hello")
        return "a checkpoint is a folder"
    if kind == "no config.json":
        (folder / "config.json").unlink()
        return "no config.json"
    if kind == "no tokenizer":
        (folder / "tokenizer.model").unlink()
        return "no tokenizer.model or tokenizer.json"
    if kind == "corrupt tokenizer":
        (folder / "tokenizer.model").write_bytes(os.urandom(300))
        return "not a valid sentencepiece model"
    if kind == "no weights":
        weights.unlink()
        return "no *.safetensors weight files"
    if kind == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "truncated file, tensor"
    if kind == "corrupt header":
        weights.write_bytes(os.urandom(4096))
        return "corrupt safetensors"
    if kind == "header lies about a size":
        data = bytearray(weights.read_bytes())
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header[q_proj]["shape"] = [1, 1]  # the offsets still span the whole tensor
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        weights.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n :]))
        return f"corrupt entry for tensor {q_proj}"
    if kind == "wrong shape":
        rewrite_weights(folder, lambda t: t.update({q_proj: t[q_proj][:, :-1].copy()}))
        return f"tensor {q_proj} has shape [64, 63], expected [64, 64]"
    if kind == "missing tensor":
        rewrite_weights(folder, lambda t: t.pop(embed))
        return "missing tensor text.embed_tokens.weight"
    if kind == "unexpected tensor":
        rewrite_weights(folder, lambda t: t.update({"language_model.model.layers.9.extra.weight": np.zeros(4, np.float32)}))
        return "unexpected tensor language_model.model.layers.9.extra.weight"
    config = json.loads((folder / "config.json").read_text())
    if kind == "model type llava":
        config["model_type"] = "llava"
        needle = "unsupported model type 'llava'"
    elif kind == "text model type llama":
        config["text_config"]["model_type"] = "llama"
        needle = "unsupported text model type 'llama'"
    elif kind == "config not JSON":
        (folder / "config.json").write_text("{\"model_type\": ")
        return "not valid JSON"
    elif kind == "config bad value":
        config["image_token_index"] = "many"
        needle = "unexpected value in config"
    else:
        raise ValueError(kind)
    (folder / "config.json").write_text(json.dumps(config))
    return needle


CORRUPTIONS = [
    "missing folder", "a file, not a folder", "no config.json", "no tokenizer", "corrupt tokenizer", "no weights",
    "truncated safetensors", "corrupt header", "header lies about a size", "wrong shape", "missing tensor",
    "unexpected tensor", "model type llava", "text model type llama", "config not JSON", "config bad value",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_bad_checkpoint_is_a_checkpoint_error_naming_the_fault(tmp_path, kind, backend):
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint(), folder)
    needle = corrupt(kind, folder)
    with pytest.raises(pg.CheckpointError) as info:
        pg.load(folder, backend=backend)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_only_checkpoint_is_refused_unread(tmp_path, backend, monkeypatch):
    import torch

    def never(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, never)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(demo_checkpoint() / "config.json", folder)
    shutil.copy(demo_checkpoint() / "tokenizer.model", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(pg.CheckpointError, match="only pickle weights .*convert to safetensors"):
        pg.load(folder, backend=backend)
    assert not (Path.cwd() / "pwned").exists()


@pytest.mark.parametrize("kind", ["truncated safetensors", "wrong shape"])
def test_cli_bad_checkpoint_is_one_line_and_exit_2(tmp_path, photo, kind):
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint(), folder)
    needle = corrupt(kind, folder)
    assert needle in one_error_line(run_cli("caption", photo, "--model", folder, "--backend", "torch"))


def test_cli_pickle_only_checkpoint(tmp_path, photo):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(demo_checkpoint() / "config.json", folder)
    (folder / "model.pt").write_bytes(b"not really a pickle")
    assert "pickle files are never loaded" in one_error_line(run_cli("caption", photo, "--model", folder))


def hub_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **extra)
    return env


def test_offline_repo_id_not_cached_says_how_to_get_it(tmp_path, photo):
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    line = one_error_line(run_cli("caption", photo, "--model", "google/paligemma2-3b-mix-224", env=env, timeout=60))
    assert time.monotonic() - start < 30
    assert "not in the local cache" in line and "hf download google/paligemma2-3b-mix-224" in line


def test_offline_repo_id_in_the_cache_loads(tmp_path, photo):
    """A repo fetched earlier (here: the demo laid out as huggingface_hub's cache) runs offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--someone--tiny-paligemma"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(demo_checkpoint(), repo / "snapshots" / sha)
    proc = run_cli("-i", photo, "-p", "caption en", "--model", "someone/tiny-paligemma", "--backend", "mlx",
                   "--max-tokens", "2", "--json", env=hub_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) <= 2


def test_unreachable_hub_does_not_hang(tmp_path):
    """A hub that accepts connections and never answers (a network dropping packets) fails within the timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="2",
                  PYTHONPATH=str(REPO))
    code = (
        "import mlx_paligemma as pg\n"
        "try:\n    pg.load('google/paligemma2-3b-mix-224', backend='torch')\n"
        "except pg.CheckpointError as e:\n    print(e)\n"
    )
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    finally:
        server.close()
    assert time.monotonic() - start < 45
    assert "hub cannot be reached" in proc.stdout and "hf download" in proc.stdout, proc.stdout + proc.stderr


# ---- interruption ----


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_in_generation_propagates_and_the_model_stays_usable(models, backend, monkeypatch):
    model = models[backend]
    want = model.generate(IMAGE, "caption en", max_tokens=6, temperature=1.0, seed=3)
    calls = []
    decode = model.backend.decode

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(model.backend, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(IMAGE, "caption en", max_tokens=6, temperature=1.0, seed=3)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        list(model.stream(IMAGE, "caption en", max_tokens=6))
    assert len(calls) == 3
    monkeypatch.undo()
    again = model.generate(IMAGE, "caption en", max_tokens=6, temperature=1.0, seed=3)
    assert again.token_ids == want.token_ids and again.finished_by == want.finished_by


def test_ctrl_c_while_the_demo_checkpoint_is_written_leaves_nothing(tmp_path, monkeypatch):
    from mlx_paligemma import demo

    monkeypatch.setenv("MLX_PALIGEMMA_CACHE", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "random_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pg.load("demo", backend="torch")
    assert list(tmp_path.iterdir()) == []


def test_cli_ctrl_c_in_generation_exits_130(photo):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_paligemma", "-i", str(photo), "-p", "caption en", "--model", "demo",
         "--backend", "torch", "--max-tokens", "7000", "--temperature", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
        preexec_fn=interruptible,
    )
    try:
        assert proc.stdout.read(1)  # the answer has started streaming
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"interrupted" in err


def test_cli_save_into_a_non_folder_keeps_the_file(tmp_path, photo):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    line = one_error_line(run_cli("detect", photo, "cat", "--save", blocker / "boxes.png", "--model", "demo"))
    assert str(blocker) in line
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_disk_full_on_save_keeps_the_old_picture(tmp_path, photo, monkeypatch, capsys):
    out = tmp_path / "boxes.png"
    out.write_bytes(b"old picture")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = cli.main(["detect", str(photo), "cat", "--save", str(out), "--model", "demo", "--backend", "torch",
                     "--max-tokens", "4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "disk full" in err
    assert out.read_bytes() == b"old picture" and [p.name for p in tmp_path.iterdir()] == ["boxes.png"]


# ---- generation always stops ----


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_stops_at_the_context_limit(small_models, backend):
    model = small_models[backend]
    prompt_len = len(model.prompt_ids("caption en"))
    g = model.generate(IMAGE, "caption en", max_tokens=SMALL_CONTEXT, min_tokens=SMALL_CONTEXT)
    assert g.finished_by == "context"
    assert prompt_len + len(g.token_ids) == SMALL_CONTEXT
    streamed = "".join(model.stream(IMAGE, "caption en", max_tokens=SMALL_CONTEXT, min_tokens=SMALL_CONTEXT))
    assert model.last.finished_by == "context" and streamed == model.last.text
    # max_tokens itself may not pass the context
    with pytest.raises(pg.SettingError, match=rf"\[1, {SMALL_CONTEXT}\]"):
        model.generate(IMAGE, "caption en", max_tokens=SMALL_CONTEXT + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_stops_at_eos_and_at_max_tokens(models, backend, monkeypatch):
    model = models[backend]
    kwargs = dict(temperature=2.0, seed=1)
    g = model.generate(IMAGE, "caption en", max_tokens=12, **kwargs)
    assert g.finished_by == "max_tokens" and len(g.token_ids) == 12
    ids = g.token_ids
    # make a token the model is about to sample the eos: generation must end right before it
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    monkeypatch.setattr(model.config, "eos_token_ids", (ids[k],))
    stopped = model.generate(IMAGE, "caption en", max_tokens=12, **kwargs)
    assert stopped.finished_by == "eos" and stopped.token_ids == ids[:k] and ids[k] not in stopped.token_ids
    assert stopped.stats.generated_tokens == k
