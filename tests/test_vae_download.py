"""`paligemma download-vae` and `convert-vae`, against a file server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.test_vae import random_vae_file

REPO = Path(__file__).resolve().parents[1]


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if self.path == "/short.npz" else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    vae = random_vae_file(tmp_path_factory.mktemp("srv") / "vae-oid.npz", seed=1)
    Handler.files = {"/vae-oid.npz": vae.read_bytes(), "/junk.npz": b"<html>not here</html>", "/short.npz": vae.read_bytes()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", vae
    httpd.shutdown()
    thread.join(timeout=10)


def run_cli(*args, env=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "mlx_paligemma", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, stdin=subprocess.DEVNULL)


def test_download_prints_and_stores_the_sha256_and_segment_finds_the_file(server, tmp_path, monkeypatch):
    url, source = server
    cache = tmp_path / "cache"
    r = run_cli("download-vae", "--url", url + "/vae-oid.npz", env={"MLX_PALIGEMMA_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    path = cache / "vae-oid.npz"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert path.read_bytes() == source.read_bytes()
    assert f"sha256 {digest}" in r.stdout
    assert (cache / "vae-oid.npz.sha256").read_text() == f"{digest}  vae-oid.npz\n"
    assert "downloading" in r.stderr and "100%" in r.stderr  # tqdm's progress bar
    # a second run does not silently fetch again
    again = run_cli("download-vae", "--url", url + "/vae-oid.npz", env={"MLX_PALIGEMMA_CACHE": str(cache)})
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr
    from mlx_paligemma.vae import find_vae

    monkeypatch.delenv("PALIGEMMA_VAE", raising=False)
    monkeypatch.setenv("MLX_PALIGEMMA_CACHE", str(cache))
    assert find_vae() == path  # where segment looks without --vae
    assert find_vae(tmp_path / "x.npz") == tmp_path / "x.npz"
    monkeypatch.setenv("PALIGEMMA_VAE", str(source))
    assert find_vae() == source


@pytest.mark.parametrize("name, needle", [
    ("junk.npz", "did not give a mask decoder file"),
    ("short.npz", "broke off"),
    ("absent.npz", "cannot download"),
])
def test_a_bad_download_leaves_nothing(server, tmp_path, name, needle):
    url, _ = server
    out = tmp_path / "vae.npz"
    r = run_cli("download-vae", "--url", f"{url}/{name}", "--out", out)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_vae_command(server, tmp_path):
    _, source = server
    out = tmp_path / "vae.safetensors"
    r = run_cli("convert-vae", source, out)
    assert r.returncode == 0 and out.exists(), r.stderr
    from safetensors.numpy import load_file

    copy = load_file(out)
    with np.load(source) as original:
        for k, v in copy.items():
            np.testing.assert_array_equal(v, original[k])
        assert set(copy) == {k for k in original.files if not k.startswith("encoder.")}
    r = run_cli("convert-vae", source, tmp_path / "vae.bin")
    assert r.returncode == 2 and "must end in .safetensors" in r.stderr
