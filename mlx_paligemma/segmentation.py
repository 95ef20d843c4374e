"""PaliGemma segmentation output -> masks in image pixels, drawn or written as COCO RLE.

The model answers `segment cat ; dog` with, per object, four `<locNNNN>` tokens (y_min, x_min,
y_max, x_max), sixteen `<segNNN>` codes and the label, objects separated by ` ; `. The codes go
through big_vision's mask decoder (`vae.py`) to a 64x64 map, which is placed into the box as
big_vision's segmentation evaluator does (`evaluators/proj/paligemma/transfers/segmentation.py`):
box = bins / 1023, pixel edges `int(v * size)`, the float map resized to the box with PIL's
bilinear filter, then `> 0`. A group that is not four location tokens then sixteen codes, or
whose box is empty (before or after the conversion to pixels), is invalid and counted, as there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .detection import (
    Detection, box_pixels, clean_label, default_line_width, draw_detections, draw_label, label_colour, label_font,
)
from .errors import OutputError, SettingError

LOC_MAX = 1023  # big_vision: location bin = round(v * 1023)
SEG_CODES = 16

_TOKEN = re.compile(r"<loc([0-9]{4})>|<seg([0-9]{3})>")


@dataclass(eq=False)
class Segment:
    label: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: the pixels the mask was placed in (x1, y1 exclusive)
    mask: np.ndarray  # bool (height, width) over the whole original image

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        h, w = self.mask.shape
        return f"Segment(label={self.label!r}, box={self.box}, mask={w}x{h}, {self.area} px)"


class Segments(list):
    """`parse_segments`' list of Segment, with `invalid` (groups that are not a well-formed object,
    as big_vision's evaluator counts them) and `detections` (objects given as a box without codes)."""

    def __init__(self, items=(), invalid: int = 0, detections=()):
        super().__init__(items)
        self.invalid = invalid
        self.detections = list(detections)


def _groups(text: str):
    """(tokens, label) per object: tokens [("loc"|"seg", value)] of one run of location/code tokens
    (whitespace between them allowed), the label the text after it up to the next ` ; `."""
    runs: list[tuple[list, int, int]] = []  # tokens, start, end
    for m in _TOKEN.finditer(text):
        kind, value = ("loc", int(m.group(1))) if m.group(1) is not None else ("seg", int(m.group(2)))
        if runs:
            tokens, start, end = runs[-1]
            # a location token after codes starts the next object even without a label between
            if not text[end:m.start()].strip() and not (kind == "loc" and tokens[-1][0] == "seg"):
                tokens.append((kind, value))
                runs[-1] = (tokens, start, m.end())
                continue
        runs.append(([(kind, value)], m.start(), m.end()))
    for i, (tokens, _, end) in enumerate(runs):
        stop = runs[i + 1][1] if i + 1 < len(runs) else len(text)
        yield tokens, clean_label(text[end:stop])


def pixel_edge(bins, size: int) -> np.ndarray:
    """Location bins -> the pixel edges big_vision cuts a mask's box at: int(bin / 1023 * size)."""
    return (np.asarray(bins, dtype=np.float64) / LOC_MAX * size).astype(np.int64)  # truncation, as int()


def mask_box(bins, image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Four location bins (y1, x1, y2, x2) -> the pixel box (x1, y1, x2, y2) big_vision pastes the
    mask into, or None when it is empty (also after truncation to whole pixels: thin boxes)."""
    width, height = image_size
    y1, y2 = (int(v) for v in pixel_edge([bins[0], bins[2]], height))
    x1, x2 = (int(v) for v in pixel_edge([bins[1], bins[3]], width))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def place_mask(map64: np.ndarray, box: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """A 64x64 float map -> a bool mask of the whole image, set inside `box` where the map,
    resized to the box bilinearly (PIL, on the float values), is above 0."""
    width, height = image_size
    x1, y1, x2, y2 = box
    resized = Image.fromarray(np.ascontiguousarray(map64, dtype=np.float32)).resize((x2 - x1, y2 - y1), resample=Image.BILINEAR)
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = np.asarray(resized) > 0.0  # the decoder's maps are in about [-1, 1]
    return mask


def parse_segments(text: str, image_size: tuple[int, int], vae=None) -> Segments:
    """Segmentation text -> masks in pixels of an image of `image_size` = (width, height).

    vae: a loaded mask decoder (`pg.load_vae`, or `model.vae`), a path to one, or None for the
    one `$PALIGEMMA_VAE` or `paligemma download-vae` provides. It is only needed when the text
    has at least one valid object. Never raises on any text.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    found, invalid, detections = [], 0, []
    for tokens, label in _groups(text):
        kinds = [k for k, _ in tokens]
        values = [v for _, v in tokens]
        if kinds == ["loc"] * 4:
            detections.append(Detection(label, box_pixels(values, (width, height))))
            continue
        if kinds != ["loc"] * 4 + ["seg"] * SEG_CODES or max(values[:4]) > LOC_MAX or max(values[4:]) >= 128:
            invalid += 1
            continue
        y1, x1, y2, x2 = values[:4]
        box = mask_box(values[:4], (width, height)) if y2 > y1 and x2 > x1 else None
        if box is None:
            invalid += 1
            continue
        found.append((label, box, values[4:]))
    if not found:
        return Segments([], invalid, detections)
    maps = _as_vae(vae).decode(np.array([codes for _, _, codes in found]))
    segments = [Segment(label, box, place_mask(m, box, (width, height))) for (label, box, _), m in zip(found, maps)]
    return Segments(segments, invalid, detections)


def _as_vae(vae):
    from .vae import find_vae, load_vae, missing_vae_message

    if vae is None:
        path = find_vae()
        if path is None:
            raise SettingError(missing_vae_message())
        return load_vae(path)
    if isinstance(vae, (str, os.PathLike)):
        return load_vae(vae)
    return vae


def format_segments(segments) -> str:
    """One line per segment: `cat: (12, 40) - (210, 180), 5321 px`."""
    return "\n".join(
        f"{s.label or '(no label)'}: ({s.box[0]}, {s.box[1]}) - ({s.box[2]}, {s.box[3]}), {s.area} px" for s in segments
    )


def draw_segments(image: Image.Image, segments, detections=(), *, alpha: float = 0.45,
                  line_width: int | None = None) -> Image.Image:
    """A copy of `image` (as RGB) with each mask filled translucently, outlined and labelled, one
    colour per label; `detections` (boxes without masks) are drawn as boxes in the same colours."""
    out = image.convert("RGB")
    w, h = out.size
    line_width = default_line_width((w, h)) if line_width is None else line_width
    colours: dict[str, tuple[int, int, int]] = {}
    pixels = np.asarray(out, dtype=np.float32).copy()
    edges = []
    for seg in segments:
        if seg.mask.shape != (h, w):
            raise ValueError(f"a mask of shape {seg.mask.shape} does not fit an image of {w}x{h}")
        colour = np.array(label_colour(seg.label, colours), dtype=np.float32)
        pixels[seg.mask] = pixels[seg.mask] * (1 - alpha) + colour * alpha
        edges.append((_outline(seg.mask, line_width), colour))
    for edge, colour in edges:  # outlines over every fill, so a later fill never dims an earlier outline
        pixels[edge] = colour
    out = Image.fromarray(pixels.round().astype(np.uint8))
    draw, font = ImageDraw.Draw(out), label_font((w, h))
    for seg in segments:
        if seg.label:
            draw_label(draw, seg.label, seg.box[:2], colours[seg.label], font, (w, h))
    return draw_detections(out, detections, line_width=line_width, colours=colours) if detections else out


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within `width` of its edge (inside it)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    size = 2 * max(width // 2, 1) + 1
    inner = np.asarray(img.filter(ImageFilter.MinFilter(size))) > 0
    return mask & ~inner


def mask_to_rle(mask: np.ndarray) -> dict:
    """A bool (height, width) mask -> COCO's compressed RLE, `{"size": [h, w], "counts": str}`,
    written by pycocotools (what COCO tools read back with `pycocotools.mask.decode`)."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise OutputError("masks as COCO RLE need pycocotools: pip install 'mlx-paligemma[segment]'") from None
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """`mask_to_rle`'s output (as read back from JSON) -> the bool (height, width) mask."""
    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    return coco_mask.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}).astype(bool)


def segments_json(segments: Segments) -> dict:
    """What `--json` prints for a segmentation: masks as COCO RLE, boxes in pixels."""
    return {
        "segments": [
            {"label": s.label, "box": list(s.box), "area": s.area, "mask": mask_to_rle(s.mask)} for s in segments
        ],
        "invalid": getattr(segments, "invalid", 0),
    }
