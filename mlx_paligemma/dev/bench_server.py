"""Concurrency of `paligemma serve`: N clients at once against the same N requests one after another.

    python -m mlx_paligemma.dev.bench_server --config 3b-224 --clients 8 --max-tokens 32
    python -m mlx_paligemma.dev.bench_server --model demo --backend torch --dtype float32   # a quick check

A server is started on the checkpoint (a full-size random one from fullsize.py unless --model),
then, after one warm-up request, the same N streamed chat requests (different images and prompts,
greedy) are sent one after another, then all at once from N threads. The figure is the
aggregate tokens/s of each phase: completion tokens (from `usage`) / the phase's wall time.
Each phase gets its own copy of the images with one pixel changed, so neither phase finds the
other's image features in the model's cache: both run the vision tower for every request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
# (image, mirrored, prompt): eight different requests from the five example photos
REQUESTS = [("astronaut.jpg", False, "caption en"), ("chelsea.jpg", False, "describe en"),
            ("coffee.jpg", False, "ocr"), ("hubble_deep_field.jpg", False, "caption en"),
            ("rocket.jpg", False, "describe en"), ("astronaut.jpg", True, "describe en"),
            ("chelsea.jpg", True, "caption en"), ("coffee.jpg", True, "answer en what is on the table?")]


def data_url(name: str, mirrored: bool, phase: int) -> str:
    image = Image.open(IMAGES / name).convert("RGB")
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.array(image)
    pixels[0, 0] = (pixels[0, 0].astype(int) + 1 + phase) % 256  # one pixel: a different image for the feature cache
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, dtype: str | None, clients: int, max_tokens: int, wait_ms: float):
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_paligemma", "serve", "--model", model, "--backend", backend, "--port", str(port),
           "--max-batch", str(clients), "--max-queue", str(2 * clients), "--max-tokens", str(max(max_tokens, 1)),
           "--batch-wait-ms", str(wait_ms), "--timeout", "36000", "--log-level", "warning"]
    if dtype:
        cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return proc, url, json.loads(r.read())
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("error: the server did not come up")


def ask(client, image: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request: its tokens, time to first piece and total time."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="bench", max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": prompt},
                                               {"type": "image_url", "image_url": {"url": image}}]}])
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "first_s": first, "total_s": time.perf_counter() - start}


def phase(url: str, images: list[str], prompts: list[str], max_tokens: int, concurrent: bool) -> dict:
    import openai

    clients = [openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=36000) for _ in images]
    results: list[dict | None] = [None] * len(images)
    start = time.perf_counter()
    if concurrent:
        barrier = threading.Barrier(len(images))

        def run(i):
            barrier.wait()
            results[i] = ask(clients[i], images[i], prompts[i], max_tokens)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(images)):
            results[i] = ask(clients[i], images[i], prompts[i], max_tokens)
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "mean_first_s": float(np.mean([r["first_s"] or r["total_s"] for r in results])),
            "mean_total_s": float(np.mean([r["total_s"] for r in results])), "requests": results}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_paligemma.dev.bench_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="3b-224", help="full-size random checkpoint (default 3b-224)")
    ap.add_argument("--layers", type=int, default=None, help="cut the text model to N layers (quick runs)")
    ap.add_argument("--model", default=None, help="a checkpoint folder or `demo` instead of --config")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--clients", type=int, default=8, help=f"concurrent clients, at most {len(REQUESTS)} (default 8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    ap.add_argument("--batch-wait-ms", type=float, default=200.0, help="the server's --batch-wait-ms (default 200)")
    ap.add_argument("--json", default="bench_out/bench_server.json", help="where to write the results")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= len(REQUESTS):
        print(f"error: --clients must be in [1, {len(REQUESTS)}]", file=sys.stderr)
        return 2
    from .bench import machine_description

    if args.model:
        model, label = args.model, args.model
    else:
        from .fullsize import full_size_checkpoint

        model = str(full_size_checkpoint(args.config, args.layers, progress=None))
        label = f"random {args.config}" + (f", {args.layers} text layers" if args.layers else "")
    chosen = REQUESTS[: args.clients]
    prompts = [p for _, _, p in chosen]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_description(),
              "checkpoint": label, "backend": args.backend, "dtype": args.dtype, "clients": args.clients,
              "max_tokens": args.max_tokens, "batch_wait_ms": args.batch_wait_ms, "load_before": load(),
              "command": "python -m mlx_paligemma.dev.bench_server " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"checkpoint: {label}; load average {report['load_before']}", file=sys.stderr)
    proc, url, health = start_server(model, args.backend, args.dtype, args.clients, args.max_tokens, args.batch_wait_ms)
    try:
        report["server"] = {k: health[k] for k in ("backend", "dtype")}
        import openai

        warm = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=36000)
        ask(warm, data_url("rocket.jpg", True, 9), "caption en", 2)  # first-call costs (kernel builds) out of the figures
        print("sequential ...", file=sys.stderr)
        report["sequential"] = phase(url, [data_url(n, m, 0) for n, m, _ in chosen], prompts, args.max_tokens, False)
        print("concurrent ...", file=sys.stderr)
        report["concurrent"] = phase(url, [data_url(n, m, 1) for n, m, _ in chosen], prompts, args.max_tokens, True)
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            report["health_after"] = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report["load_after"] = load()
    s, c = report["sequential"], report["concurrent"]
    report["speedup"] = c["tokens_per_s"] / s["tokens_per_s"]
    print(f"\n{label}, {args.backend} {report['server']['dtype']}, {args.clients} requests of max_tokens {args.max_tokens}")
    print(f"machine: {report['machine']}; load average before {report['load_before']}, after {report['load_after']}")
    print("| phase | wall s | tokens | aggregate tokens/s | mean first piece s | mean request s |")
    print("|---|---|---|---|---|---|")
    for name, p in (("one after another", s), (f"{args.clients} at once", c)):
        print(f"| {name} | {p['wall_s']:.1f} | {p['tokens']} | {p['tokens_per_s']:.2f} | {p['mean_first_s']:.1f} | {p['mean_total_s']:.1f} |")
    print(f"\nconcurrent / sequential aggregate tokens/s: {report['speedup']:.2f}x "
          f"(largest batch {report['health_after']['largest_batch']})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"results written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
