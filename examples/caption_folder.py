"""Caption every image in a folder: prints `name: caption`, one line per image.

    python examples/caption_folder.py examples/images
    python examples/caption_folder.py photos/ --model google/paligemma2-3b-mix-448 --backend mlx

Images that cannot be read are reported on stderr and skipped; the model loads once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx_paligemma as pg

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="google/paligemma2-3b-mix-224", help="folder or repo id; `demo` for the random demo model")
    parser.add_argument("--backend", default="auto", choices=("auto", "mlx", "torch"))
    parser.add_argument("--lang", default="en", help="caption language code")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    images = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not images:
        print(f"error: no images in {args.folder}", file=sys.stderr)
        return 2
    try:
        model = pg.load(args.model, backend=args.backend)
    except pg.PaliGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in images:
        try:
            result = model.generate(path, f"caption {args.lang}", max_tokens=args.max_tokens)
        except pg.ImageError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        print(f"{path.name}: {result.text.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
