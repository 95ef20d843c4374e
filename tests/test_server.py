"""`paligemma serve` as a client sees it: the official openai client (and plain HTTP for what it
cannot send) against a live uvicorn server on 127.0.0.1, on the demo checkpoint (torch, float32).

Answers are held to `Model.generate` on the same image, prompt and settings in this process; every
bad input gets its status and JSON error, and a normal request right after it succeeds.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

import openai  # noqa: E402  (test-serve extra, installed by scripts/setup.sh: missing is a failure, not a skip)
import starlette  # noqa: E402,F401  (serve extra)

import mlx_paligemma as pg  # noqa: E402
from mlx_paligemma.detection import parse_detections  # noqa: E402
from mlx_paligemma.segmentation import rle_to_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"
KEY = "test-key"
CAT, ASTRONAUT = IMAGES / "chelsea.jpg", IMAGES / "astronaut.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlx_paligemma", "serve", "--model", "demo", "--backend", "torch",
               "--dtype", "float32", "--port", str(self.port), "--log-level", "warning", *flags]
        self.log = io.BytesIO()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=lambda: [self.log.write(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.getvalue().decode(errors='replace')}")
            try:
                if self.health()["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not come up in 180 s")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def client(self, key: str | None = KEY, timeout: float = 120) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=timeout)

    def post(self, path: str, body: bytes, key: str | None = KEY, content_type="application/json") -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a raw POST."""
        headers = {"Content-Type": content_type}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def model():
    # loaded first: the demo checkpoint is then written once, before the server reads it
    return pg.load("demo", backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    s = Server("--api-key", KEY, "--max-queue", "2", "--max-body-bytes", "400000", "--max-tokens", "2000",
               "--max-image-pixels", "4000000")
    yield s
    s.stop()
    # every bad request above was answered, none crashed a handler
    assert b"Traceback" not in s.log.getvalue(), s.log.getvalue().decode(errors="replace")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, image: str | None) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": parts}]


def chat_body(image: str | None = None, text: str = "caption en", **settings) -> bytes:
    return json.dumps({"model": "demo", "messages": user(text, image or data_url(CAT)), **settings}).encode()


def running(stream):
    """Read a stream up to its first piece of text: its batch is running."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return


def still_serving(client):
    out = client.chat.completions.create(model="demo", messages=user("ocr", data_url(CAT)), max_tokens=1)
    assert out.choices[0].message.content is not None and out.usage.completion_tokens <= 1


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = server.health()
    assert health["status"] == "ok" and health["backend"] == "torch" and health["demo"] is True
    with urllib.request.urlopen(server.url + "/", timeout=5) as r:
        assert r.status == 200 and b"<html" in r.read().lower()


def test_a_completion_is_generate_with_the_same_settings(client, model):
    out = client.chat.completions.create(model="demo", messages=user("caption en", data_url(CAT)),
                                         max_tokens=6, temperature=0.9, top_p=0.8, seed=11)
    ref = model.generate(CAT, "caption en", max_tokens=6, temperature=0.9, top_p=0.8, seed=11)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == {"max_tokens": "length", "eos": "stop"}[ref.finished_by]
    assert out.usage.completion_tokens == len(ref.token_ids) == 6
    assert out.usage.prompt_tokens == ref.stats.prompt_tokens and out.usage.total_tokens == ref.stats.prompt_tokens + 6
    again = client.chat.completions.create(model="demo", messages=user("caption en", data_url(CAT)),
                                           max_tokens=6, temperature=0.9, top_p=0.8, seed=11)
    assert again.choices[0].message.content == ref.text
    other = client.chat.completions.create(model="demo", messages=user("caption en", data_url(CAT)),
                                           max_tokens=6, temperature=0.9, top_p=0.8, seed=12)
    assert other.choices[0].message.content == model.generate(CAT, "caption en", max_tokens=6, temperature=0.9,
                                                              top_p=0.8, seed=12).text != ref.text


def test_a_stream_adds_up_to_the_answer_and_ends_with_usage(client, model):
    stream = client.chat.completions.create(model="demo", messages=user("describe en", data_url(ASTRONAUT)),
                                            max_tokens=5, temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    ref = model.generate(ASTRONAUT, "describe en", max_tokens=5, temperature=1.0, seed=3)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == ref.text and len(pieces) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_stop_strings_end_the_answer_as_generate_does(client, model):
    free = model.generate(CAT, "ocr", max_tokens=6, temperature=1.0, seed=5).text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    out = client.chat.completions.create(model="demo", messages=user("ocr", data_url(CAT)), max_tokens=6,
                                         temperature=1.0, seed=5, stop=[stop])
    ref = model.generate(CAT, "ocr", max_tokens=6, temperature=1.0, seed=5, stop=[stop])
    assert ref.finished_by == "stop" and out.choices[0].message.content == ref.text and stop not in ref.text
    assert out.choices[0].finish_reason == "stop"


def test_requests_that_wait_together_run_as_one_batch_each_with_its_own_answer(server, client, model):
    # a long stream keeps the model busy while the other requests arrive and wait together
    busy = client.chat.completions.create(model="demo", messages=user("describe en", data_url(CAT)),
                                          max_tokens=2000, stream=True)
    running(busy)
    before = server.health()
    jobs = [(ASTRONAUT, "ocr", 1, 3, 0.7), (IMAGES / "rocket.jpg", "describe en", 2, 5, 0.0)]
    answers: dict[int, object] = {}

    def ask(i, image, prompt, seed, max_tokens, temperature):
        answers[i] = server.client().chat.completions.create(
            model="demo", messages=user(prompt, data_url(image)), max_tokens=max_tokens, temperature=temperature, seed=seed)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.health()["queued"] == 2, 30)
    busy.close()
    for t in threads:
        t.join()
    for i, (image, prompt, seed, max_tokens, temperature) in enumerate(jobs):
        ref = model.generate(image, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        assert answers[i].choices[0].message.content == ref.text
        assert answers[i].usage.completion_tokens == len(ref.token_ids)
    after = server.health()
    assert after["batches"] == before["batches"] + 1 and after["largest_batch"] >= 2, (before, after)


def test_detect_and_segment_return_data(server, model):
    status, out, _ = server.post("/v1/detect", json.dumps(
        {"image": data_url(CAT), "objects": ["cat", "ear"], "max_tokens": 12}).encode())
    ref = model.generate(CAT, "detect cat ; ear", max_tokens=12, constrain=True)
    assert status == 200 and out["text"] == ref.text and out["image_size"] == [448, 298]
    boxes = parse_detections(ref.text, ref.image_size)
    assert len(out["detections"]) == len(boxes) > 0
    for got, want in zip(out["detections"], boxes):
        assert got["label"] == want.label and np.allclose(got["box"], want.box, atol=0.01)

    status, out, _ = server.post("/v1/segment", json.dumps(
        {"image": base64.b64encode(CAT.read_bytes()).decode(), "objects": "cat", "max_tokens": 21,
         "temperature": 1.0, "seed": 8}).encode())
    ref = model.segment(CAT, "cat", max_tokens=21, temperature=1.0, seed=8, constrain=True)
    assert status == 200 and out["text"] == ref.text and out["invalid"] == ref.segments.invalid == 0
    assert len(out["segments"]) == len(ref.segments) == 1  # 4 + 16 + a label: one object fits in 21 tokens
    for got, want in zip(out["segments"], ref.segments):
        assert got["label"] == want.label and got["box"] == list(want.box)
        assert (rle_to_mask(got["mask"]) == want.mask).all() and got["area"] == want.area > 0

    # "constrain": false lets the answer run free, as generate does without it
    status, out, _ = server.post("/v1/detect", json.dumps(
        {"image": data_url(CAT), "objects": "cat", "max_tokens": 6, "constrain": False}).encode())
    assert status == 200 and out["text"] == model.generate(CAT, "detect cat", max_tokens=6).text


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side pixels (400 MP at 20000) in about 50 KB: all zeros, compressed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def b64_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("body, status, code", [
    (b'{"messages": [', 400, "invalid_json"),
    (b'["not", "an", "object"]', 400, "invalid_json"),
    (chat_body("data:image/png;base64,@@@not base64@@@"), 400, "invalid_base64"),
    (chat_body(b64_url(b"just some text, not a picture")), 400, "invalid_image"),
    (chat_body(b64_url(bomb_png())), 400, "invalid_image"),
    (chat_body("https://example.com/cat.jpg"), 400, "url_not_allowed"),
    (json.dumps({"messages": user("caption en", None)}).encode(), 400, "missing_image"),
    (chat_body(b64_url(b"\x00" * 600_000)), 413, "body_too_large"),
    (chat_body(temperature=5), 422, "invalid_setting"),
    (chat_body(top_p=0), 422, "invalid_setting"),
    (chat_body(max_tokens=0), 422, "invalid_setting"),
    (chat_body(max_tokens=2001), 422, "invalid_setting"),
    (chat_body(seed=-1), 422, "invalid_setting"),
    (chat_body(n=2), 422, "invalid_setting"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 422, "invalid_setting"),
    (chat_body(stream="yes"), 422, "invalid_setting"),
])
def test_bad_input_gets_its_status_and_a_json_error_then_the_server_goes_on(server, client, body, status, code):
    got, error, _ = server.post("/v1/chat/completions", body)
    assert got == status, error
    assert error["error"]["code"] == code and error["error"]["message"] and error["error"]["type"]
    still_serving(client)


def test_bad_settings_and_images_through_the_openai_client(client):
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="demo", messages=user("caption en", data_url(CAT)), temperature=2.5)
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model="demo", messages=user("caption en", "data:image/jpeg;base64,%%%"))
    with pytest.raises(openai.BadRequestError, match="pixels"):
        client.chat.completions.create(model="demo", messages=user("caption en", b64_url(bomb_png())))
    still_serving(client)


def test_a_missing_or_wrong_api_key_is_401(server, client):
    for key in (None, "wrong"):
        status, error, headers = server.post("/v1/chat/completions", chat_body(max_tokens=1), key=key)
        assert status == 401 and error["error"]["code"] in ("missing_api_key", "invalid_api_key")
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    still_serving(client)


def wait_for(condition, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, client):
    before = server.health()["cancelled"]
    stream = client.chat.completions.create(model="demo", messages=user("describe en", data_url(CAT)),
                                            max_tokens=2000, stream=True)
    got = [c for _, c in zip(range(3), stream)]
    assert len(got) == 3
    stream.close()
    # 2000 tokens take minutes on the demo model; a cancelled row ends within a few steps
    assert wait_for(lambda: server.health()["running"] == 0, 30)
    assert server.health()["cancelled"] == before + 1
    still_serving(client)


def test_a_client_that_leaves_before_a_plain_answer_stops_its_generation(server):
    before = server.health()["cancelled"]
    body = chat_body(max_tokens=2000)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: server.health()["running"] == 1, 30)
        time.sleep(3)  # well into decoding, while tokens keep coming
    assert wait_for(lambda: server.health()["running"] == 0, 30)
    assert server.health()["cancelled"] == before + 1


def test_a_full_queue_is_503_with_retry_after(server, client):
    busy = client.chat.completions.create(model="demo", messages=user("describe en", data_url(ASTRONAUT)),
                                          max_tokens=2000, stream=True)
    running(busy)
    waiting = []
    threads = [threading.Thread(target=lambda: waiting.append(server.post("/v1/chat/completions", chat_body(max_tokens=1))))
               for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.health()["queued"] == 2, 30)
    status, error, headers = server.post("/v1/chat/completions", chat_body(max_tokens=1))
    assert status == 503 and error["error"]["code"] == "queue_full"
    assert int(headers.get("retry-after", headers.get("Retry-After"))) >= 1
    busy.close()
    for t in threads:
        t.join()
    assert [w[0] for w in waiting] == [200, 200]
    still_serving(client)


@pytest.fixture(scope="module")
def limited(model):
    """A second server: image URLs allowed (with a size limit), a 3 s time limit per request."""
    folder = IMAGES

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    # 1 s: a 1000-token answer of the demo model takes ~2.4 s on an idle 2-core CPU (3 s let it finish
    # in time there), a 1-3 token one ~0.03 s
    s = Server("--allow-urls", "--max-url-bytes", "30000", "--timeout", "1")
    s.files = f"http://127.0.0.1:{files.server_address[1]}"
    yield s
    s.stop()
    files.shutdown()


def test_urls_are_fetched_within_limits_when_allowed(limited, model):
    client = limited.client(key=None)
    out = client.chat.completions.create(model="demo", messages=user("caption en", limited.files + "/chelsea.jpg"),
                                         max_tokens=3)
    assert out.choices[0].message.content == model.generate(CAT, "caption en", max_tokens=3).text
    assert os.path.getsize(ASTRONAUT) > 30000
    with pytest.raises(openai.BadRequestError, match="30000 byte limit"):
        client.chat.completions.create(model="demo", messages=user("caption en", limited.files + "/astronaut.jpg"))
    with pytest.raises(openai.BadRequestError, match="cannot fetch"):
        client.chat.completions.create(model="demo", messages=user("caption en", limited.files + "/missing.jpg"))


def test_a_request_over_the_time_limit_is_504_and_stopped(limited):
    status, error, _ = limited.post("/v1/chat/completions", chat_body(max_tokens=1000), key=None)
    assert status == 504 and error["error"]["code"] == "timeout"
    assert wait_for(lambda: limited.health()["running"] == 0, 30)
    status, out, _ = limited.post("/v1/chat/completions", chat_body(max_tokens=1), key=None)
    assert status == 200 and out["choices"][0]["finish_reason"] in ("length", "stop")


def test_serve_refuses_bad_settings_in_one_line():
    out = subprocess.run([sys.executable, "-m", "mlx_paligemma", "serve", "--model", "demo", "--port", "99999"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: --port must be in [0, 65535], got 99999"
    assert "Traceback" not in out.stderr


@pytest.fixture()
def in_process(model, monkeypatch):
    """The app in this process (Starlette's TestClient), on the module's model: a test can break one
    of the model's methods and see what the server answers."""
    from starlette.testclient import TestClient

    from mlx_paligemma.server.app import create_app
    from mlx_paligemma.server.config import ServerConfig

    with TestClient(create_app(model, ServerConfig(model_name="demo")), raise_server_exceptions=False) as tc:
        yield tc, monkeypatch


def test_segment_without_a_mask_decoder_is_501_and_the_server_goes_on(in_process, model):
    from mlx_paligemma.errors import SettingError

    tc, monkeypatch = in_process
    monkeypatch.setattr(model, "mask_decoder", lambda: (_ for _ in ()).throw(SettingError("no mask decoder here")))
    r = tc.post("/v1/segment", json={"image": data_url(CAT), "objects": "cat", "max_tokens": 4})
    assert r.status_code == 501, r.text
    assert r.json()["error"]["code"] == "missing_mask_decoder" and "no mask decoder here" in r.json()["error"]["message"]
    r = tc.post("/v1/detect", json={"image": data_url(CAT), "objects": "cat", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["text"] == model.generate(CAT, "detect cat", max_tokens=4, constrain=True).text


def test_a_failing_generation_is_500_for_its_batch_and_the_next_request_succeeds(in_process, model):
    tc, monkeypatch = in_process
    real = model.stream_batch
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of cheese")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "stream_batch", fails_once)
    r = tc.post("/v1/chat/completions", content=chat_body(max_tokens=3))
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "server_error" and "RuntimeError" in error["message"] and "cheese" not in error["message"]
    r = tc.post("/v1/chat/completions", content=chat_body(max_tokens=3))
    assert r.status_code == 200 and len(calls) == 2
    assert r.json()["choices"][0]["message"]["content"] == model.generate(CAT, "caption en", max_tokens=3).text
