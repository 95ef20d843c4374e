"""PaliGemma detection output -> boxes in image pixels, and drawing them.

The model answers `detect cat ; dog` with objects separated by " ; ", each object being four
location tokens `<locNNNN>` (y_min, x_min, y_max, x_max in 1024 bins) then the label, which may be
several words. Segmentation answers put 16 `<segNNN>` tokens between the locations and the label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

LOC_BINS = 1024

# whitespace between the four tokens is tolerated; the model itself emits them back to back
_LOCS = re.compile(r"<loc([0-9]{4})>\s*<loc([0-9]{4})>\s*<loc([0-9]{4})>\s*<loc([0-9]{4})>")
_SPECIAL_TOKEN = re.compile(r"<[^<>]*>")

# distinct, saturated colours that stay readable with black or white text
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image


def parse_detections(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """Detection text -> boxes in pixels of an image of `image_size` = (width, height).

    Never raises on any text: pieces without four location tokens are skipped, special tokens
    (`<seg...>`, `<eos>`, ...) are dropped from labels, and boxes are clamped inside the image.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    matches = list(_LOCS.finditer(text))
    detections = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        # the label runs to the next object's separator; what follows it is not part of this object
        label = clean_label(text[m.end() : end])
        detections.append(Detection(label, box_pixels([int(g) for g in m.groups()], (width, height))))
    return detections


def clean_label(text: str) -> str:
    """The label text after an object's tokens: up to the next ` ; `, special tokens dropped, spaces collapsed."""
    return " ".join(_drop_special_tokens(text.split(";", 1)[0]).split())


def box_pixels(bins, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Four location bins (y0, x0, y1, x1) -> (x0, y0, x1, y1) in pixels, ordered and clamped inside the image."""
    width, height = image_size
    y0, x0, y1, x1 = bins
    # bin / 1024 is the bin-start convention of Google's demo code; big_vision encodes
    # round(v * 1023), so the two differ by under one bin
    xs = sorted(_clamp(b / LOC_BINS * width, width) for b in (x0, x1))
    ys = sorted(_clamp(b / LOC_BINS * height, height) for b in (y0, y1))
    return (xs[0], ys[0], xs[1], ys[1])


def _drop_special_tokens(text: str) -> str:
    # repeated because removing `<b>` from `<a<b>c>` leaves a new token `<a c>`
    n = 1
    while n:
        text, n = _SPECIAL_TOKEN.subn(" ", text)
    return text


def _clamp(v: float, limit: int) -> float:
    return min(max(v, 0.0), float(limit))


def format_detections(detections) -> str:
    """One line per detection: `car: (12, 40) - (210, 180)` (a box the model gave no label: `(no label)`)."""
    return "\n".join(
        f"{d.label or '(no label)'}: ({round(d.box[0])}, {round(d.box[1])}) - ({round(d.box[2])}, {round(d.box[3])})"
        for d in detections
    )


def label_colour(label: str, colours: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """The colour of `label`, recorded in `colours`: colours follow the order labels first appear,
    so distinct labels differ up to 12 of them."""
    return colours.setdefault(label, _PALETTE[len(colours) % len(_PALETTE)])


def default_line_width(size: tuple[int, int]) -> int:
    return max(1, round(min(size) / 160))


def label_font(size: tuple[int, int]):
    return ImageFont.load_default(size=max(10, round(min(size) / 30)))


def draw_detections(image: Image.Image, detections, *, line_width: int | None = None,
                    colours: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """A copy of `image` (as RGB) with each box outlined and labelled; one colour per label
    (`colours`, label -> RGB, is used and extended when given)."""
    out = image.convert("RGB")
    w, h = out.size
    if line_width is None:
        line_width = default_line_width((w, h))
    font = label_font((w, h))
    draw = ImageDraw.Draw(out)
    colours = {} if colours is None else colours
    for det in detections:
        colour = label_colour(det.label, colours)
        # sorted, because PIL refuses a rectangle given right-to-left
        x0, x1 = sorted(min(max(round(v), 0), w - 1) for v in (det.box[0], det.box[2]))
        y0, y1 = sorted(min(max(round(v), 0), h - 1) for v in (det.box[1], det.box[3]))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        if det.label:
            draw_label(draw, det.label, (x0, y0), colour, font, (w, h))
    return out


def draw_label(draw, label, corner, colour, font, size):
    """A filled tag with `label`, above `corner` when there is room, else just inside."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        # without FreeType Pillow falls back to a bitmap font that only encodes Latin-1
        label = label.encode("latin-1", "replace").decode("latin-1")
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left + 4, bottom - top + 4
    w, h = size
    x = max(0, min(corner[0], w - tw))
    # above the box when there is room, otherwise just inside its top edge
    y = corner[1] - th if corner[1] - th >= 0 else min(corner[1], max(0, h - th))
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    text_colour = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + 2 - left, y + 2 - top), label, fill=text_colour, font=font)
