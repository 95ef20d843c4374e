"""Throughput of `paligemma batch` against single calls: N distinct images, one model load.

    flock /tmp/heavy.lock python scripts/bench_batch.py                 # full-size random 3B-224, 32 images
    python scripts/bench_batch.py --model demo --images 4 --batch-size 2 --tokens 2   # a quick check

Single: `model.generate` on each image in turn. Batch: the batch command's own loop (`run_batch`:
decoding in a thread, `generate_batch` of --batch-size rows, a JSONL row written and fsynced per
image). Both force the same number of new tokens (eos ignored) and start with an empty feature
cache; the images are distinct, so the cache never hits. Prints one JSON object; the ids of the
two runs are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageOps

import mlx_paligemma as pg
from mlx_paligemma.batch import JsonlOutput, collect_items, run_batch
from mlx_paligemma.dev.bench import machine_description
from mlx_paligemma.dev.fullsize import full_size_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def distinct_images(folder: Path, n: int) -> None:
    """n different pictures from the example photos: each photo mirrored, rotated and cropped."""
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))]
    for i in range(n):
        im = photos[i % len(photos)]
        variant = i // len(photos)
        if variant % 2:
            im = ImageOps.mirror(im)
        im = im.rotate(7 * (variant // 2), expand=False)
        w, h = im.size
        im = im.crop((variant, variant, w - variant, h - variant))
        im.save(folder / f"img{i:03d}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the full-size random 3B-224, written once and cached)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8, help="new tokens per image, forced (default 8: prefill-heavy, as captions are)")
    args = p.parse_args(argv)

    model_path = args.model or str(full_size_checkpoint("3b-224"))
    t0 = time.perf_counter()
    model = pg.load(model_path, backend=args.backend)
    load_s = time.perf_counter() - t0
    kwargs = dict(max_tokens=args.tokens, min_tokens=args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        distinct_images(folder, args.images)
        items = collect_items(str(folder), "caption")

        model._features.clear()
        t0 = time.perf_counter()
        single = {it.input: model.generate(it.path, it.prompt, **kwargs).token_ids for it in items}
        single_s = time.perf_counter() - t0

        model._features.clear()
        out = JsonlOutput(Path(tmp) / "rows.jsonl")
        t0 = time.perf_counter()
        counts = run_batch(model, items, out, batch_size=args.batch_size, **kwargs)
        batch_s = time.perf_counter() - t0
        rows = [json.loads(line) for line in out.path.read_text().splitlines()]
    same = sum(r["token_ids"] == single[r["input"]] for r in rows)
    n, tokens = args.images, args.images * args.tokens
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "model": model_path, "backend": model.backend.name, "dtype": model.backend.dtype,
        "images": n, "batch_size": args.batch_size, "tokens_per_image": args.tokens, "load_s": round(load_s, 1),
        "single": {"seconds": round(single_s, 1), "images_per_s": round(n / single_s, 3), "tokens_per_s": round(tokens / single_s, 2)},
        "batch": {"seconds": round(batch_s, 1), "images_per_s": round(n / batch_s, 3), "tokens_per_s": round(tokens / batch_s, 2),
                  "errors": counts["errors"]},
        "speedup": round(single_s / batch_s, 2),
        "rows_with_the_same_ids": f"{same}/{len(rows)}",
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
