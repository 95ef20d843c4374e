"""Image preprocessing, as transformers' SiglipImageProcessor does it (the oracle).

RGB image -> bicubic resize straight to the square size (aspect ratio not kept, PIL's filter)
-> rescale by 1/255 -> normalise with mean = std = 0.5. Output is float32 (3, S, S).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .image import load_image

MEAN = 0.5
STD = 0.5


def resize(image: Image.Image, size: int) -> Image.Image:
    """The square the model sees: aspect ratio not kept. Resizing the result again is a copy, so
    a pipeline may resize early (and ship the small image) and get the same pixels."""
    return image.resize((size, size), resample=Image.Resampling.BICUBIC)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> float32 pixels (3, size, size)."""
    resized = resize(image, size)
    # transformers rescales in float64 and normalises after; the result is cast to float32
    x = np.asarray(resized, dtype=np.float64) * (1.0 / 255.0)
    x = ((x - MEAN) / STD).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pixel_values(images, size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Images (paths, PIL images or arrays) -> (B, 3, S, S) float32 and each original (width, height)."""
    loaded = [load_image(im) for im in images]
    return np.stack([preprocess(im, size) for im in loaded]), [im.size for im in loaded]
