"""Throughput of `paligemma batch` against single calls: N images, one model load.

    flock /tmp/heavy.lock python scripts/bench_batch.py                 # full-size random 3B-224, 32 images, both phases
    python scripts/bench_batch.py --phase single --ids ids.json         # the singles alone (their ids kept) ...
    python scripts/bench_batch.py --phase single --subset 0:8 --ids ids.json   # or the singles in pieces
    python scripts/bench_batch.py --phase batch --ids ids.json          # ... and the batch, compared with them
    python scripts/bench_batch.py --phase batch --images 8 --distinct 1 # 8 rows of one image: what dedup gives
    python scripts/bench_batch.py --model demo --images 4 --batch-size 2 --tokens 2   # a quick check

Single: `model.generate` on each image file in turn. Batch: the batch command's own loop
(`run_batch`: decoding in a thread, `generate_batch` of --batch-size rows, a JSONL row written and
fsynced per image). Both force the same number of new tokens (eos ignored) and start with an
empty feature cache, after a warm-up on another picture (one single call, one batch of 2 rows).
The N images are made from the example photos (mirrored, rotated, cropped), so that no two are
alike and neither the decoded-image nor the feature cache ever hits; `--distinct K` instead
writes N files cycling over K pictures (the same bytes under different names), as a folder with
repeated images would be. Prints one JSON object (also written to --json); with --ids the
singles' ids are written (phase single) or compared row by row (phase batch), so that the two
phases can run as separate processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

import mlx_paligemma as pg
from mlx_paligemma.batch import JsonlOutput, collect_items, run_batch
from mlx_paligemma.dev.bench import machine_description

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def distinct_images(folder: Path, n: int, distinct: int | None = None) -> None:
    """n image files: the example photos mirrored, rotated and cropped, so that no two are alike;
    with `distinct`, file i is a byte-for-byte copy of picture i % distinct."""
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))]
    k = min(n, distinct or n)
    for i in range(k):
        im = photos[i % len(photos)]
        variant = i // len(photos)
        if variant % 2:
            im = ImageOps.mirror(im)
        im = im.rotate(7 * (variant // 2), expand=False)
        w, h = im.size
        im = im.crop((variant, variant, w - variant, h - variant))
        im.save(folder / f"img{i:03d}.png")
    for i in range(k, n):
        shutil.copyfile(folder / f"img{i % k:03d}.png", folder / f"img{i:03d}.png")


def warm_up(model) -> None:
    """One single call and one batch of 2 (2 tokens each) on pictures outside the set, then an empty feature cache."""
    rng = np.random.default_rng(1)
    pictures = [np.asarray(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((320, 240)))
                for _ in range(2)]
    model.generate(pictures[0], "caption en", max_tokens=2, min_tokens=2)
    model.generate_batch(pictures, ["caption en"] * 2, max_tokens=2, min_tokens=2)
    model._features.clear()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the full-size random 3B-224, written once and cached)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--distinct", type=int, default=None, help="only this many different pictures among the images (default: all different)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="new tokens per image, forced (default 16: prefill-heavy, as captions are)")
    p.add_argument("--phase", choices=("both", "single", "batch"), default="both")
    p.add_argument("--ids", default=None, help="JSON file of the singles' ids: written by phase single, compared by phase batch")
    p.add_argument("--subset", default=None, metavar="START:END",
                   help="run only these images of the N (the singles in pieces, under a lock that rotates); --ids then gathers their ids")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    if args.model:
        model_path = args.model
    else:
        from mlx_paligemma.dev.fullsize import full_size_checkpoint

        model_path = str(full_size_checkpoint("3b-224"))
    t0 = time.perf_counter()
    model = pg.load(model_path, backend=args.backend)
    load_s = time.perf_counter() - t0
    kwargs = dict(max_tokens=args.tokens, min_tokens=args.tokens)
    start, end = (int(x) if x else None for x in args.subset.split(":")) if args.subset else (None, None)
    n = len(range(args.images)[start:end])
    tokens = n * args.tokens
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "command": "python scripts/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model_path, "backend": model.backend.name, "dtype": model.backend.dtype,
        "images": n, "subset": args.subset, "distinct_images": min(n, args.distinct or n), "batch_size": args.batch_size,
        "tokens_per_image": args.tokens, "load_s": round(load_s, 1),
    }
    warm_up(model)
    single = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        distinct_images(folder, args.images, args.distinct)
        items = collect_items(str(folder), "caption")[start:end]

        if args.phase in ("both", "single"):
            model._features.clear()
            load_before = load_average()
            t0 = time.perf_counter()
            single = {it.input: model.generate(it.path, it.prompt, **kwargs).token_ids for it in items}
            single_s = time.perf_counter() - t0
            report["single"] = {"seconds": round(single_s, 1), "images_per_s": round(n / single_s, 4),
                                "tokens_per_s": round(tokens / single_s, 2),
                                "load_average_before": load_before, "load_average_after": load_average()}
            if args.ids and args.phase == "single":
                ids = Path(args.ids)
                gathered = json.loads(ids.read_text()) if args.subset and ids.exists() else {}
                ids.write_text(json.dumps(gathered | single))
        if args.phase == "batch" and args.ids:
            single = json.loads(Path(args.ids).read_text())

        if args.phase in ("both", "batch"):
            model._features.clear()
            out = JsonlOutput(Path(tmp) / "rows.jsonl")
            load_before = load_average()
            t0 = time.perf_counter()
            counts = run_batch(model, items, out, batch_size=args.batch_size, **kwargs)
            batch_s = time.perf_counter() - t0
            rows = [json.loads(line) for line in out.path.read_text().splitlines()]
            report["batch"] = {"seconds": round(batch_s, 1), "images_per_s": round(n / batch_s, 4),
                               "tokens_per_s": round(tokens / batch_s, 2), "errors": counts["errors"],
                               "load_average_before": load_before, "load_average_after": load_average()}
            if single is not None:
                same = sum(r["token_ids"] == single.get(r["input"]) for r in rows)
                report["rows_without_a_single_call"] = sum(r["input"] not in single for r in rows)
                report["rows_with_the_ids_of_the_single_call"] = f"{same}/{len(rows)}"
            if "single" in report:
                report["speedup"] = round(report["single"]["seconds"] / batch_s, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
