"""The `paligemma` command (run as a subprocess) and the interactive shell (driven through a pipe).

Everything runs on the demo checkpoint with the MLX backend and a few tokens, so it is quick.
The demo's weights are random: the tests check the plumbing (what goes where, exit codes, the
numbers agreeing with each other), never the wording of an answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

import mlx_paligemma as pg
from mlx_paligemma import cli
from mlx_paligemma.detection import format_detections
from mlx_paligemma.shell import Settings, _make_completer, run_shell

from .conftest import interruptible

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model", "demo", "--backend", "mlx"]
STATS_LINE = re.compile(
    r"^(\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\), first token [\d.]+ s, peak memory [\d.]+ GB$"
)
WIDTH, HEIGHT = 300, 200  # not square: boxes must come back in the original image's pixels


def run_cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))  # MLX_PALIGEMMA_CACHE comes from conftest
    return subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs,
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    x = Image.linear_gradient("L").resize((WIDTH, HEIGHT))
    Image.merge("RGB", (x, x.transpose(Image.Transpose.FLIP_LEFT_RIGHT), x.rotate(90))).save(path)
    return path


@pytest.fixture(scope="module")
def demo_model():
    return pg.load("demo", backend="mlx")


@pytest.fixture(scope="module")
def detecting_seed(demo_model, photo):
    """A sampling seed for which the random demo model answers with at least one box (constrained,
    as the CLI and the shell run detect by default)."""
    for seed in range(100):
        g = demo_model.generate(photo, "detect cat ; dog", max_tokens=24, temperature=1.5, seed=seed, constrain=True)
        dets = pg.parse_detections(g.text, g.image_size)
        if dets:
            return seed, dets
    raise AssertionError("no seed in 0..99 gives a detection on the demo model")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_caption_streams_text_then_stats_on_stderr(photo, demo_model):
    proc = run_cli("caption", photo, *DEMO, "--max-tokens", 6)
    assert proc.returncode == 0, proc.stderr
    expected = demo_model.generate(photo, "caption en", max_tokens=6)
    assert proc.stdout == expected.text + "\n"
    err = proc.stderr.strip().splitlines()
    assert any("random weights" in line for line in err)  # the demo is flagged as such
    m = STATS_LINE.match(err[-1])
    assert m and int(m.group(1)) == len(expected.token_ids)


def test_json_is_one_object_with_consistent_numbers(photo):
    proc = run_cli("-i", photo, "-p", "answer en what is this?", *DEMO, "--max-tokens", 5, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    out = json.loads(proc.stdout)
    assert out["prompt"] == "answer en what is this?"
    assert out["model"] == "demo" and out["backend"] == "mlx" and out["demo"] is True
    assert out["image_size"] == [WIDTH, HEIGHT]
    assert len(out["token_ids"]) == out["stats"]["generated_tokens"] == 5
    assert out["stats"]["backend"] == "mlx" and out["stats"]["prompt_tokens"] > 256
    assert out["detections"] == [] and isinstance(out["text"], str)
    assert out["finished_by"] in ("eos", "max_tokens")


def test_json_detections_are_pixel_boxes_inside_the_image(photo, detecting_seed):
    seed, expected = detecting_seed
    proc = run_cli(
        "detect", photo, "cat", ";", "dog", *DEMO, "--json",
        "--max-tokens", 24, "--temperature", 1.5, "--seed", seed,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt"] == "detect cat ; dog"
    dets = out["detections"]
    assert [d["label"] for d in dets] == [d.label for d in expected]
    for d, e in zip(dets, expected):
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT
        assert d["box"] == pytest.approx(e.box, abs=0.051)


def test_detect_prints_boxes_and_saves_the_picture(photo, detecting_seed, tmp_path):
    seed, expected = detecting_seed
    out = tmp_path / "boxes.jpg"
    proc = run_cli(
        "detect", photo, "cat ; dog", "--save", out, *DEMO,
        "--max-tokens", 24, "--temperature", 1.5, "--seed", seed,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(format_detections(expected) + "\n")
    assert f"saved {out}" in proc.stderr
    with Image.open(out) as im:
        im.load()
        assert im.format == "JPEG" and im.size == (WIDTH, HEIGHT)
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.jpg"]  # no temporary file left


def test_quiet_prints_only_the_answer(photo, demo_model):
    proc = run_cli("ocr", photo, *DEMO, "--max-tokens", 4, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == demo_model.generate(photo, "ocr", max_tokens=4).text + "\n"
    assert not any(STATS_LINE.match(line) for line in proc.stderr.splitlines())


def test_options_before_and_after_the_command_and_lang(photo):
    proc = run_cli("--model", "demo", "describe", photo, "--backend", "mlx", "--lang", "fr", "--max-tokens", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt"] == "describe fr" and len(out["token_ids"]) == 3


@pytest.fixture(scope="module")
def penalised_stop(demo_model, photo):
    """Settings with a repetition penalty and a stop string that cuts the demo model's caption short."""
    kw = dict(max_tokens=10, repetition_penalty=1.4)
    text = demo_model.generate(photo, "caption en", **kw).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and text.index(stop) > 0, text
    return dict(kw, stop=[stop, "\n"])


def test_stop_and_repetition_penalty_flags(photo, demo_model, penalised_stop):
    kw = penalised_stop
    proc = run_cli("caption", photo, *DEMO, "--max-tokens", kw["max_tokens"], "--repetition-penalty",
                   kw["repetition_penalty"], "--stop", kw["stop"][0], "--stop", "\n", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = demo_model.generate(photo, "caption en", **kw)
    assert expected.finished_by == "stop" and kw["stop"][0] not in expected.text
    assert (out["text"], out["token_ids"], out["finished_by"]) == (expected.text, expected.token_ids, "stop")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["caption", "{photo}", "--repetition-penalty", "0", "--model", "/no/such/model"], "repetition_penalty"),
        (["caption", "no-such-image.jpg", *DEMO], "no such image file"),
        (["caption", "{photo}", "--temperature", "-1", "--model", "/no/such/model"], "temperature"),
        (["caption", "{photo}", "--top-p", "2", "--model", "/no/such/model"], "top_p"),
        (["caption", "{photo}", "--top-k", "-3", "--model", "/no/such/model"], "top_k"),
        (["caption", "{photo}", "--max-tokens", "0", "--model", "/no/such/model"], "max_tokens"),
        (["caption", "{photo}", "--temperature", "nan", "--model", "/no/such/model"], "temperature"),
        (["caption", "{photo}", "--backend", "tpu"], "--backend"),
        (["caption", "{photo}", "--temperature", "hot"], "--temperature"),
        (["detect", "{photo}", " ; ", *DEMO], "at least one thing"),
        (["detect", "{photo}", "cat", "--save", "out.gif", *DEMO], "suffix"),
        (["caption", "{photo}", "--model", "/no/such/model"], "no such checkpoint folder"),
        (["-i", "{photo}", *DEMO], "-p PROMPT"),
        ([], "no command given"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(photo, args, needle):
    line = one_error_line(run_cli(*[a.format(photo=photo) for a in args]))
    assert needle in line


def test_bad_checkpoint_folder(tmp_path, photo):
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in one_error_line(run_cli("caption", photo, "--model", tmp_path, "--backend", "mlx"))


def test_ctrl_c_exits_130_without_traceback_or_output_file(photo, tmp_path):
    out = tmp_path / "boxes.png"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_paligemma", "detect", str(photo), "cat", "--save", str(out), *DEMO,
         "--max-tokens", "7000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
        preexec_fn=interruptible,
    )
    try:
        assert proc.stdout.read(1)  # the answer has started streaming
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_chat_checks_settings_before_loading(capsys):
    assert cli.main(["chat", "--temperature", "-1", "--model", "/no/such/model"]) == 2
    assert "temperature" in capsys.readouterr().err


# the shell


class Printed:
    """A print function that records everything the shell says."""

    def __init__(self):
        self.parts: list[str] = []

    def __call__(self, *args, sep=" ", end="\n", flush=False):
        self.parts.append(sep.join(map(str, args)) + end)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def drive(keys: str, settings: Settings, loader=None) -> tuple[int, str]:
    printed = Printed()
    with create_pipe_input() as inp:
        inp.send_text(keys + "\x04")  # Ctrl-D ends the session when nothing else did
        code = run_shell(loader or (lambda: pg.load("demo", backend="mlx")), settings, input=inp, output=DummyOutput(), print_fn=printed)
    return code, printed.text


@pytest.fixture
def history(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state" / "history"
    monkeypatch.setenv("MLX_PALIGEMMA_HISTORY", str(path))
    return path


def test_shell_settings_prompts_and_history(photo, history, demo_model):
    keys = (
        "caption\n"  # no image yet
        f"/image {photo}\n"
        "/temperature -1\n"  # refused: keeps 0
        "/top_p 2\n"  # refused: keeps 1
        "/max_tokens lots\n"  # refused: keeps 5
        "/top_k 7\n"
        "/max_tokens 3\n"
        "/settings\n"
        "caption\n"
        "/nonsense\n"
        "exit\n"
        "caption\n"  # after exit: never run
    )
    code, text = drive(keys, Settings(model="demo", backend="mlx", sampling=pg.SamplingParams(max_tokens=5)))
    assert code == 0
    start, after = text.split("no image yet", 1)
    assert "/image PATH" in start and "temperature  0" in start and "max_tokens   5" in start
    assert "random weights" in start
    assert f"image {photo} ({WIDTH}x{HEIGHT})" in after
    assert "temperature must be a number >= 0" in after and "temperature stays 0" in after
    assert "top_p must be in (0, 1]" in after and "top_p stays 1" in after
    assert "max_tokens stays 5" in after
    shown = after.split("max_tokens = 3", 1)[1]
    assert "temperature  0\n" in shown and "top_p        1\n" in shown
    assert "top_k        7\n" in shown and "max_tokens   3\n" in shown and str(photo) in shown
    answer = demo_model.generate(photo, "caption en", max_tokens=3, top_k=7)
    assert answer.text + "\n3 tokens in " in text
    assert len([line for line in text.splitlines() if STATS_LINE.match(line)]) == 1  # the second caption never ran
    assert "unknown command /nonsense" in text
    typed = [line[1:] for line in history.read_text().splitlines() if line.startswith("+")]
    assert typed == [line for line in keys.splitlines()][:11]


def test_shell_stop_and_repetition_penalty(photo, history, demo_model, penalised_stop):
    kw = penalised_stop
    keys = (
        f"/image {photo}\n/repetition_penalty 0\n/repetition_penalty {kw['repetition_penalty']}\n"
        f"/stop \"{kw['stop'][0]}\" \\n\n/stop \"open\n/settings\ncaption\n/stop\n/settings\n"
    )
    code, text = drive(keys, Settings(model="demo", backend="mlx", sampling=pg.SamplingParams(max_tokens=kw["max_tokens"])))
    assert code == 0
    assert "repetition_penalty must be a number > 0" in text and "repetition_penalty stays 1.0" in text
    assert "no closing quotation" in text
    shown = f"stop         {kw['stop'][0]!r} '\\n'\n"
    assert f"repetition_penalty = {kw['repetition_penalty']}" in text and shown in text
    answer = demo_model.generate(photo, "caption en", **kw)
    assert answer.text + f"\n{len(answer.token_ids)} tokens in " in text
    assert text.rstrip().endswith("stop         (none)\n  constrain    off")


def test_shell_detect_then_save(photo, history, detecting_seed, tmp_path):
    seed, expected = detecting_seed
    out = tmp_path / "drawn.png"
    keys = f"/save {out}\n/temperature 1.5\n/seed {seed}\n/max_tokens 24\ndetect cat;dog\n/save {out}\n"
    code, text = drive(keys, Settings(model="demo", backend="mlx", image=str(photo)))
    assert code == 0
    assert "no boxes or masks yet" in text
    assert format_detections(expected) in text
    assert f"saved {out}" in text
    with Image.open(out) as im:
        assert im.size == (WIDTH, HEIGHT)


class StoppedModel:
    """A stand-in model whose answer is interrupted by Ctrl-C after two pieces."""

    is_demo = False
    context_len = 100

    def __init__(self):
        self.calls = 0

    def stream(self, image, prompt, **kwargs):
        self.calls += 1
        yield "a "
        yield "cat "
        raise KeyboardInterrupt


def test_shell_ctrl_c_stops_an_answer_and_at_the_prompt(photo, history):
    model = StoppedModel()
    keys = "caption\n\x03/seed 4\ncaption\n/settings\n"
    code, text = drive(keys, Settings(image=str(photo)), loader=lambda: model)
    assert code == 0 and model.calls == 2
    assert text.count("a cat \n(stopped)") == 2
    assert "seed = 4" in text and "seed         4" in text


def test_shell_bad_start_image_is_an_error(history, tmp_path):
    code, text = drive("", Settings(model="demo", backend="mlx", image=str(tmp_path / "missing.jpg")))
    assert code == 2 and text.startswith("error: ") and "no such image file" in text


def test_completion_of_commands_and_image_paths(photo):
    completer = _make_completer()

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text, len(text)), CompleteEvent(completion_requested=True))]

    assert complete("/ima") == ["/image"]
    assert "/temperature" in complete("/te")
    assert complete("det") == ["detect"]
    folder = photo.parent
    assert complete(f"/image {folder}/ph") == ["oto.png"]
    assert complete("caption ph") == []


def test_task_prompts_and_detail():
    parse = cli.build_parser().parse_args
    assert cli._settings(parse(["describe", "x.jpg", "--detail"]), "x.jpg").sampling.max_tokens == cli.DETAIL_MAX_TOKENS
    assert cli._settings(parse(["describe", "x.jpg", "--detail", "--max-tokens", "9"]), "x.jpg").sampling.max_tokens == 9
    assert cli._settings(parse(["caption", "x.jpg"]), "x.jpg").sampling.max_tokens == pg.sampling.DEFAULT_MAX_TOKENS
    # detect/segment held to their grammar unless --no-constrain, in one run and in the shell
    assert cli._settings(parse(["detect", "x.jpg", "cat"]), "x.jpg").sampling.constrain is True
    assert cli._settings(parse(["segment", "x.jpg", "cat", "--no-constrain"]), "x.jpg").sampling.constrain is False
    assert cli._settings(parse(["--no-constrain", "chat"]), None).sampling.constrain is False
    assert cli._settings(parse(["chat"]), None).sampling.constrain is True
    args = parse(["--lang", "de", "answer", "x.jpg", "wie", "viele?"])
    assert (args.model, args.backend) == ("google/paligemma2-3b-mix-224", "auto")
    assert " ".join(args.question) == "wie viele?" and args.lang == "de"


# the examples


EXAMPLES = REPO / "examples"


def test_example_photos_are_small_and_credited():
    photos = sorted((EXAMPLES / "images").glob("*.jpg"))
    readme = (EXAMPLES / "README.md").read_text()
    assert len(photos) >= 4
    for p in photos:
        assert p.stat().st_size < 60_000 and f"images/{p.name}" in readme
        with Image.open(p) as im:
            assert im.format == "JPEG" and max(im.size) == 448


def test_example_scripts_run_on_the_demo(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    proc = run(EXAMPLES / "caption_folder.py", EXAMPLES / "images", "--model", "demo", "--backend", "mlx", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    names = [line.split(":", 1)[0] for line in proc.stdout.splitlines()]
    assert names == sorted(p.name for p in (EXAMPLES / "images").glob("*.jpg"))
    out = tmp_path / "drawn.png"
    proc = run(EXAMPLES / "detect_and_draw.py", EXAMPLES / "images" / "coffee.jpg", "cup ; spoon", out, "--model", "demo", "--backend", "mlx")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im, Image.open(EXAMPLES / "images" / "coffee.jpg") as src:
        assert im.size == src.size
