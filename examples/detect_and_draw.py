"""Find things in a picture, print their boxes in pixels and save the picture with the boxes drawn.

    python examples/detect_and_draw.py examples/images/coffee.jpg "cup ; spoon" coffee-boxes.jpg
    python examples/detect_and_draw.py examples/images/astronaut.jpg "person ; flag" out.png --backend mlx
"""

from __future__ import annotations

import argparse
import sys

import mlx_paligemma as pg
from mlx_paligemma.detection import format_detections
from mlx_paligemma.image import load_image, save_image_atomic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("things", help='what to look for, separated by ";", e.g. "cat ; dog"')
    parser.add_argument("out", help="where to save the drawn picture (.jpg, .png or .webp)")
    parser.add_argument("--model", default="google/paligemma2-3b-mix-224", help="folder or repo id; `demo` for the random demo model")
    parser.add_argument("--backend", default="auto", choices=("auto", "mlx", "torch"))
    args = parser.parse_args()

    things = " ; ".join(t.strip() for t in args.things.split(";") if t.strip())
    try:
        picture = load_image(args.image)
        model = pg.load(args.model, backend=args.backend)
        result = model.generate(picture, f"detect {things}", max_tokens=64)
        # boxes come back in pixels of the original picture, whatever size the model saw
        detections = pg.parse_detections(result.text, picture.size)
        print(format_detections(detections) or "nothing found")
        save_image_atomic(pg.draw_detections(picture, detections), args.out)
    except pg.PaliGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
