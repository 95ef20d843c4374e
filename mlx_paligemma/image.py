"""Reading images from untrusted sources, and writing them without leaving half-written files.

Every bad input ends in an ImageError (or OutputError) with a one-line message naming the file;
nothing else escapes, so a caller can report it and move on to the next image.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import time
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, OutputError
from .files import atomic_file

MAX_PIXELS = 100_000_000
URL_TIMEOUT_S = 30.0
MAX_URL_BYTES = 50 * 1024 * 1024

# Pillow's format plugins turn malformed bytes into any of these, not only OSError.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

# Formats a photo arrives in. Pillow would also try EPS (which runs Ghostscript on the file) and
# a long tail of rare formats; an allowlist keeps untrusted files away from those code paths.
# Camera MPO files are read by the JPEG plugin.
READ_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "AVIF")

_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def load_image(src, *, allow_urls: bool = False, max_pixels: int = MAX_PIXELS,
               url_timeout_s: float | None = None, max_url_bytes: int | None = None) -> Image.Image:
    """A path, URL, PIL image, uint8 array or the bytes of an image file -> a new, fully decoded RGB image.

    - Transparency (alpha band, or palette/colour-key transparency) is composited on white, as
      transformers' `convert_to_rgb` does.
    - 16-bit grey (I;16*, and I, which Pillow uses for 16-bit samples) is scaled 0..65535 ->
      0..255, not clipped; other modes (L, F, P, CMYK, ...) go through Pillow's own conversion.
    - Animated GIF/WebP/PNG files give their first frame.
    - Files (paths and URLs) are turned upright by their EXIF orientation, as transformers'
      `load_image` does. PIL images passed in are taken as given: no EXIF rotation, current frame.
    - Arrays may be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), dtype uint8.
    - Images over `max_pixels` are refused from the header, before any pixel is decoded.
    - URLs (http/https) are fetched only when `allow_urls` is true, within `url_timeout_s`
      (the whole download; default URL_TIMEOUT_S) and `max_url_bytes` (default MAX_URL_BYTES).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError("the image data is empty (0 bytes)")
        return _open_bytes(data, "the image data", max_pixels)
    if isinstance(src, Image.Image):
        return _decode(src, "the given PIL image", max_pixels, upright=False)
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if not isinstance(src, (str, os.PathLike)):
        raise ImageError(f"cannot read an image from a {type(src).__name__}: pass a path, a PIL image or an array")
    name = os.fsdecode(src)
    if name.lower().startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError(f"{name}: URLs are not fetched unless allow_urls=True; download the image first")
        return _open_bytes(_fetch(name, url_timeout_s, max_url_bytes), name, max_pixels)
    return _open_path(Path(name), max_pixels)


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    try:
        if not path.exists():
            raise ImageError(f"{path}: no such image file")
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image file")
        if not path.is_file():
            # a FIFO or device would block or never end; only regular files are read
            raise ImageError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty (0 bytes)")
        with open(path, "rb") as f:
            return _open_bytes(f, str(path), max_pixels)
    except (OSError, ValueError) as e:
        # ImageError is a ValueError; let ours through unchanged
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: cannot read the file ({_reason(e)})") from e


def _open_bytes(data, name: str, max_pixels: int) -> Image.Image:
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    with warnings.catch_warnings():
        # our own max_pixels check replaces Pillow's warning; its hard limit (2x MAX_IMAGE_PIXELS)
        # still raises DecompressionBombError, reported below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fp, formats=_installed(READ_FORMATS)) as im:
                return _decode(im, name, max_pixels, upright=True)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: image too large for Pillow ({e}); the limit here is {max_pixels} pixels") from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image in a supported format ({', '.join(READ_FORMATS)})") from e
        except _DECODE_ERRORS as e:
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"{name}: corrupt or truncated image ({_reason(e)})") from e


def _installed(formats) -> list[str]:
    # Image.open raises KeyError for a format whose plugin this Pillow lacks (AVIF is optional)
    Image.init()
    return [f for f in formats if f in Image.OPEN]


def _decode(im: Image.Image, name: str, max_pixels: int, upright: bool) -> Image.Image:
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb; raise max_pixels to allow it)"
        )
    try:
        # decode everything now, inside the try, so a truncated file fails here and not later
        im.load()
        if upright:
            im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except _DECODE_ERRORS as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: corrupt or truncated image ({_reason(e)})") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's convert clips these to 0..255, turning most 16-bit images white
        samples = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # convert returns a copy even for RGB, so the result never shares the source's file or pixels
    return im.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise ImageError(
            f"cannot use an array of shape {a.shape} and dtype {a.dtype} as an image: "
            "expected uint8 HxW, HxWx3 or HxWx4"
        )
    # Pillow picks L, RGB or RGBA from the shape
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def _fetch(url: str, timeout_s: float | None = None, max_bytes: int | None = None) -> bytes:
    timeout_s = URL_TIMEOUT_S if timeout_s is None else timeout_s
    max_bytes = MAX_URL_BYTES if max_bytes is None else max_bytes
    # the socket timeout bounds each read; the deadline bounds the whole download (a slow drip)
    deadline = time.monotonic() + timeout_s
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageError(f"{url}: the download took longer than {timeout_s:g} s")
                chunk = response.read(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{url}: cannot fetch ({_reason(e)})") from e
    if size > max_bytes:
        raise ImageError(f"{url}: larger than the {max_bytes} byte limit for downloads")
    if not size:
        raise ImageError(f"{url}: the download is empty (0 bytes)")
    return b"".join(chunks)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return text or type(e).__name__


def save_image_atomic(image: Image.Image, path) -> Path:
    """Write `image` to `path` (format from the suffix) so that `path` is either the old file or
    the complete new one, never a partial write; returns the path."""
    path = Path(path)
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: unknown image suffix {path.suffix!r}, use .jpg, .jpeg, .png or .webp")
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"{path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is not a folder")
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        # JPEG has no alpha or palette; drawing outputs are RGB anyway
        image = image.convert("RGB")
    try:
        # also on KeyboardInterrupt the partial file goes and the old one stays
        with atomic_file(path) as tmp:
            try:
                f = open(tmp, "xb")
            except OSError as e:
                raise OutputError(f"{path}: cannot write in {folder} ({_reason(e)})") from e
            with f:
                image.save(f, format=fmt)
    except OSError as e:
        why = "disk full" if e.errno == errno.ENOSPC else _reason(e)
        raise OutputError(f"{path}: cannot write the image ({why})") from e
    except ValueError as e:
        raise OutputError(f"{path}: cannot encode the image as {fmt} ({_reason(e)})") from e
    return path
