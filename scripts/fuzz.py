"""Fuzz load_image and parse_detections for a fixed time and count crashes.

A crash is any exception other than ImageError from load_image, and any exception or broken
invariant (box outside the image, x0 > x1, special tokens in a label) from parse_detections.

    python scripts/fuzz.py --seconds 120                  # both targets, 120 s each
    python scripts/fuzz.py --target image --crash-dir /tmp/crashes

With atheris installed (`pip install atheris`) the inputs are coverage-guided, each target in its
own process since atheris.Fuzz never returns; otherwise bytes are mutated at random from a fixed
seed, so a run can be repeated. Exits 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# small enough that a mutated header claiming a big canvas costs milliseconds, not seconds
FUZZ_MAX_PIXELS = 1_000_000
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 16, 1 << 24]
_PIECES = ["<loc0000>", "<loc1023>", "<loc0512>", "<loc9999>", "<seg000>", "<seg127>", " ; ", ";", " ",
           "<eos>", "<", ">", "<loc", "\n", "car", "red sports car", "é猫", "\x00", "<loc12>"]


class Stats:
    def __init__(self, name, crash_dir):
        self.name, self.crash_dir = name, crash_dir
        self.tried = self.crashes = 0
        self.kinds: dict[str, int] = {}

    def crash(self, data: bytes, err: str):
        self.crashes += 1
        self.kinds[err] = self.kinds.get(err, 0) + 1
        if self.kinds[err] == 1:
            print(f"[{self.name}] crash: {err}", file=sys.stderr)
        if self.crash_dir is not None:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            (self.crash_dir / f"{self.name}-{self.crashes:05d}.bin").write_bytes(data)

    def report(self):
        print(f"{self.name}: {self.tried} inputs tried, {self.crashes} crashes")
        for err, n in sorted(self.kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {n} x {err}")


def seed_images() -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    deep = Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16))
    cases = [
        ("PNG", rgb, {}),
        ("PNG", rgb.convert("RGBA"), {}),
        ("PNG", rgb.convert("P"), {"transparency": 0}),
        ("PNG", deep, {}),
        ("JPEG", rgb, {"exif": exif}),
        ("JPEG", rgb.convert("CMYK"), {"progressive": True}),
        ("GIF", rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P").rotate(90)]}),
        ("WEBP", rgb, {"save_all": True, "append_images": [rgb.rotate(90)]}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
    ]
    out = []
    for fmt, im, kw in cases:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


def run_image(data: bytes, scratch: Path, stats: Stats):
    from mlx_paligemma.errors import ImageError
    from mlx_paligemma.image import load_image

    stats.tried += 1
    scratch.write_bytes(data)
    try:
        out = load_image(scratch, max_pixels=FUZZ_MAX_PIXELS)
        if out.mode != "RGB":
            stats.crash(data, f"mode {out.mode} returned")
    except ImageError as e:
        if "\n" in str(e):
            stats.crash(data, "multi-line ImageError message")
    except BaseException as e:  # noqa: BLE001 - counting everything else is the point
        if isinstance(e, KeyboardInterrupt):
            raise
        stats.crash(data, _describe(e))


def run_detection(text: str, size: tuple[int, int], stats: Stats):
    from mlx_paligemma.detection import parse_detections

    stats.tried += 1
    try:
        dets = parse_detections(text, size)
    except Exception as e:  # noqa: BLE001
        stats.crash(text.encode("utf-8", "surrogatepass"), _describe(e))
        return
    for d in dets:
        x0, y0, x1, y1 = d.box
        if not (0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]):
            stats.crash(text.encode("utf-8", "surrogatepass"), "box outside the image or unordered")
        if re.search(r"<[^<>]*>", d.label) or d.label != d.label.strip():
            stats.crash(text.encode("utf-8", "surrogatepass"), "special token or edge whitespace in label")


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {str(e)[:80]}"


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b = bytearray(rng.choice(seeds))
        op = rng.randrange(7)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:
            b[i : i + 4] = rng.choice(_INTERESTING).to_bytes(4, rng.choice(["big", "little"]))
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del b[i : i + rng.randint(1, 64)]
        elif op == 5:
            b = b[: rng.randrange(len(b) + 1)]
        else:
            other = rng.choice(seeds)
            j = rng.randrange(len(other))
            b[i:] = other[j : j + rng.randint(1, 256)] + b[i:]
    return bytes(b)


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.5:
            parts.append(rng.choice(_PIECES))
        elif r < 0.8:
            parts.append(f"<loc{rng.randrange(1024):04d}>")
        else:
            parts.append("".join(chr(rng.randrange(0x30000)) for _ in range(rng.randint(1, 4))))
    return "".join(parts).encode("utf-8", "replace").decode("utf-8")


def fuzz_random(target: str, seconds: float, seed: int, crash_dir) -> Stats:
    rng = random.Random(seed)
    stats = Stats(target, crash_dir)
    deadline = time.monotonic() + seconds
    if target == "image":
        seeds = seed_images()
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / "input"
            while time.monotonic() < deadline:
                run_image(mutate(rng, rng.choice(seeds), seeds), scratch, stats)
    else:
        while time.monotonic() < deadline:
            run_detection(random_text(rng), (rng.randint(1, 5000), rng.randint(1, 5000)), stats)
    return stats


def atheris_worker(target: str, seconds: float, crash_dir):
    """Runs in its own process; reports and exits through os._exit when the time is up."""
    import atheris

    with atheris.instrument_imports():
        import PIL.Image

        PIL.Image.init()  # imports every format plugin now, so they are instrumented
        import mlx_paligemma.detection  # noqa: F401
        import mlx_paligemma.image  # noqa: F401

    stats = Stats(target, crash_dir)
    deadline = time.monotonic() + seconds
    tmp = tempfile.mkdtemp()
    scratch = Path(tmp) / "input"

    def one_input(data: bytes):
        if time.monotonic() > deadline:
            stats.report()
            sys.stdout.flush()
            os._exit(1 if stats.crashes else 0)
        if target == "image":
            run_image(data, scratch, stats)
        else:
            fdp = atheris.FuzzedDataProvider(data)
            size = (fdp.ConsumeIntInRange(1, 5000), fdp.ConsumeIntInRange(1, 5000))
            run_detection(fdp.ConsumeUnicodeNoSurrogates(len(data)), size, stats)

    corpus = Path(tmp) / "corpus"
    corpus.mkdir()
    seeds = seed_images() if target == "image" else [p.encode() for p in _PIECES]
    for i, s in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(s)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(seconds) + 30}", "-rss_limit_mb=4096", "-max_len=65536"]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60, help="time budget per target")
    p.add_argument("--target", choices=["image", "detection", "all"], default="all")
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random engine")
    p.add_argument("--crash-dir", type=Path, default=None, help="save each crashing input here")
    p.add_argument("--atheris-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    # Pillow warns on every corrupt TIFF/EXIF tag; millions of those would bury the report
    warnings.simplefilter("ignore")

    if args.atheris_worker:
        atheris_worker(args.atheris_worker, args.seconds, args.crash_dir)
        return
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    targets = ["image", "detection"] if args.target == "all" else [args.target]
    print(f"engine: {engine}, {args.seconds:g} s per target")
    failed = False
    for target in targets:
        if engine == "random":
            stats = fuzz_random(target, args.seconds, args.seed, args.crash_dir)
            stats.report()
            failed |= stats.crashes > 0
            continue
        cmd = [sys.executable, __file__, "--atheris-worker", target, "--seconds", str(args.seconds)]
        if args.crash_dir is not None:
            cmd += ["--crash-dir", str(args.crash_dir)]
        # libFuzzer's progress lines go to stderr; show them only when the worker died
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        print(proc.stdout, end="")
        if proc.returncode not in (0, 1) or f"{target}:" not in proc.stdout:
            print(f"{target}: fuzzer process died (exit {proc.returncode})\n{proc.stderr[-3000:]}")
        failed |= proc.returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
