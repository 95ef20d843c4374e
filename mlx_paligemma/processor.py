"""Image preprocessing, as transformers' SiglipImageProcessor does it (the oracle).

RGB image -> resize straight to the model's square size (aspect ratio not kept, PIL's filter,
bicubic unless preprocessor_config.json says otherwise) -> rescale (1/255) -> normalise
(mean = std = 0.5 for every released checkpoint). Output is float32 (3, S, S).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import CheckpointError
from .image import load_image


@dataclass(frozen=True)
class ImageSettings:
    """A preprocessor_config.json as SiglipImageProcessor reads it; the defaults are that class's."""

    size: int
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_STD


def read_image_settings(folder: Path, image_size: int, num_image_tokens: int) -> ImageSettings:
    """The folder's image processor config, found where transformers looks for it.

    That is the `image_processor` object of processor_config.json (what transformers 5.x saves),
    else preprocessor_config.json (what the hub has); SiglipImageProcessor's defaults without
    either. Its size and image_seq_length must be what the model was built for: with another size
    the position embeddings do not fit, and with another token count transformers' forward
    refuses the prompt (image features and image tokens do not match).
    """
    d, path = None, None
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        candidate = Path(folder) / name
        if candidate.exists():
            found = _read_json(candidate)
            found = found.get(key) if key else found
            if found is not None:
                d, path = found, candidate
                break
    if d is None:
        return ImageSettings(image_size)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    defaults = ImageSettings(image_size)
    try:
        size = d.get("size") or {"height": 224, "width": 224}
        if "shortest_edge" in size or (size.get("height"), size.get("width")) != (image_size, image_size):
            raise CheckpointError(f"{path}: size {size} is not the model's image size {image_size}x{image_size}")
        tokens = d.get("image_seq_length", num_image_tokens)
        if tokens != num_image_tokens:
            raise CheckpointError(f"{path}: image_seq_length {tokens} is not the model's {num_image_tokens} image tokens")
        settings = ImageSettings(
            size=image_size,
            resample=int(_get(d, "resample", defaults)),
            do_resize=bool(_get(d, "do_resize", defaults)),
            do_rescale=bool(_get(d, "do_rescale", defaults)),
            rescale_factor=float(_get(d, "rescale_factor", defaults)),
            do_normalize=bool(_get(d, "do_normalize", defaults)),
            image_mean=_channels(_get(d, "image_mean", defaults)),
            image_std=_channels(_get(d, "image_std", defaults)),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unexpected value ({e})") from None
    if settings.resample not in {int(r) for r in Image.Resampling}:
        raise CheckpointError(f"{path}: resample {settings.resample} is not a PIL resampling filter")
    return settings


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _get(d: dict, key: str, defaults: ImageSettings):
    value = d.get(key)
    return getattr(defaults, key) if value is None else value


def _channels(v) -> tuple[float, float, float]:
    values = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3
    if len(values) != 3:
        raise ValueError(f"expected one value per RGB channel, got {v!r}")
    return tuple(values)


def resize(image: Image.Image, settings: ImageSettings | int) -> Image.Image:
    """The square the model sees: aspect ratio not kept. Resizing the result again is a copy, so
    a pipeline may resize early (and ship the small image) and get the same pixels."""
    s = ImageSettings(settings) if isinstance(settings, int) else settings
    return image.resize((s.size, s.size), resample=Image.Resampling(s.resample))


def preprocess(image: Image.Image, settings: ImageSettings | int) -> np.ndarray:
    """An RGB PIL image -> float32 pixels (3, size, size)."""
    s = ImageSettings(settings) if isinstance(settings, int) else settings
    if s.do_resize:
        image = resize(image, s)
    elif image.size != (s.size, s.size):
        raise CheckpointError(f"preprocessor_config.json turns resizing off, and the image is not {s.size}x{s.size}")
    x = np.asarray(image)
    if s.do_rescale:
        # transformers rescales in float64, casts to float32, then normalises in float32
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if s.do_normalize:
        x = (x - np.array(s.image_mean, dtype=np.float32)) / np.array(s.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pixel_values(images, settings: ImageSettings | int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Images (paths, PIL images or arrays) -> (B, 3, S, S) float32 and each original (width, height).

    `settings` may be just the square size, for SiglipImageProcessor's defaults at that size.
    """
    loaded = [load_image(im) for im in images]
    return np.stack([preprocess(im, settings) for im in loaded]), [im.size for im in loaded]
