import errno
import io
import os
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

from mlx_paligemma.errors import ImageError, OutputError
from mlx_paligemma.image import MAX_PIXELS, load_image, save_image_atomic


def _gradient(width=32, height=24):
    """Noise, so that encoded files are large enough to cut in half."""
    rng = np.random.default_rng(width * 10_000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _png_claiming(tmp_path, width, height):
    """A small PNG whose IHDR is patched to claim width x height (CRC fixed so it parses)."""
    data = bytearray(_png_bytes(Image.new("RGB", (8, 8), (1, 2, 3))))
    # signature (8) + chunk length (4) + b"IHDR" (4), then width and height
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return _write(tmp_path, "bomb.png", bytes(data))


def _pixels(image):
    return np.asarray(image)


def test_rgb_png_round_trips_exactly(tmp_path):
    src = _gradient()
    path = tmp_path / "a.png"
    src.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(_pixels(out), _pixels(src))


def test_str_path_works_like_pathlib(tmp_path):
    path = tmp_path / "a.png"
    _gradient().save(path)
    np.testing.assert_array_equal(_pixels(load_image(str(path))), _pixels(load_image(path)))


def test_missing_path_names_the_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg.*no such image file"):
        load_image(path)


def test_folder_is_refused(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    with pytest.raises(ImageError, match="pipe.png: not a regular file"):
        load_image(path)


def test_zero_byte_file_is_refused(tmp_path):
    path = _write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageError, match=r"empty.png.*empty \(0 bytes\)"):
        load_image(path)


def test_text_file_named_jpg_is_refused(tmp_path):
    path = _write(tmp_path, "notes.jpg", b"these are my shopping notes\n" * 20)
    with pytest.raises(ImageError, match="notes.jpg: not an image in a supported format"):
        load_image(path)


def test_eps_is_not_read(tmp_path):
    # Pillow hands EPS files to Ghostscript; untrusted files must never get there
    path = _write(tmp_path, "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="x.eps: not an image in a supported format"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_fails_at_load_not_later(tmp_path, fmt):
    path = tmp_path / f"full.{fmt.lower()}"
    _gradient(256, 256).save(path, fmt)
    data = path.read_bytes()
    cut = _write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}: corrupt or truncated"):
        load_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM", "TGA"])
def test_other_allowed_formats_load(tmp_path, fmt):
    src = _gradient()
    path = tmp_path / f"a.{fmt.lower()}"
    src.save(path, fmt)
    np.testing.assert_array_equal(_pixels(load_image(path)), _pixels(src))


def test_messages_are_one_line(tmp_path):
    path = _write(tmp_path, "cut.png", _png_bytes(_gradient(64, 64))[:200])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_bomb_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = _png_claiming(tmp_path, 12_000, 10_000)
    assert 12_000 * 10_000 > MAX_PIXELS

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=f"bomb.png: 12000x10000 .*limit of {MAX_PIXELS}"):
        load_image(path)


def test_bomb_past_pillows_own_limit_is_an_image_error(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    path = _png_claiming(tmp_path, 50_000, 50_000)
    with pytest.raises(ImageError, match=f"bomb.png: .*limit here is {MAX_PIXELS}"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_argument_is_the_limit(tmp_path):
    path = tmp_path / "a.png"
    _gradient(100, 100).save(path)
    with pytest.raises(ImageError, match="limit of 9999"):
        load_image(path, max_pixels=9999)
    assert load_image(path, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1)])
def test_tiny_and_extreme_aspect_ratios(tmp_path, size):
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    out = load_image(path)
    assert out.size == size
    assert out.getpixel((size[0] - 1, size[1] - 1)) == (10, 200, 30)


def test_grey_matches_transformers(tmp_path):
    path = tmp_path / "grey.png"
    _gradient().convert("L").save(path)
    out = load_image(path)
    with Image.open(path) as im:
        np.testing.assert_array_equal(_pixels(out), convert_to_rgb(im, return_numpy=True))
    assert out.getpixel((3, 2))[0] == out.getpixel((3, 2))[1] == out.getpixel((3, 2))[2]


def test_palette_with_transparency_is_white_like_transformers(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0] + [200, 10, 10] + [0] * 762)
    im.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (200, 10, 10)
    with Image.open(path) as original:
        np.testing.assert_array_equal(_pixels(out), convert_to_rgb(original, return_numpy=True))


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    im = Image.new("P", (2, 1), 1)
    im.putpalette([0, 0, 0] + [20, 30, 40] + [0] * 762)
    path = tmp_path / "pal.gif"
    im.save(path)
    assert load_image(path).getpixel((0, 0)) == (20, 30, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white_like_transformers(tmp_path, mode):
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, 0, 3] = 0  # fully transparent
    a[0, 1, 3] = 128  # half
    a[0, 2, 3] = 255  # opaque
    a[1, :, 3] = 77
    path = tmp_path / f"alpha_{mode}.png"
    Image.fromarray(a, "RGBA").convert(mode).save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(path) as original:
        np.testing.assert_array_equal(_pixels(out), convert_to_rgb(original, return_numpy=True))
    if mode == "RGBA":
        assert out.getpixel((2, 0)) == (200, 100, 50)


def test_cmyk_matches_transformers(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _gradient().convert("CMYK").save(path, quality=95)
    out = load_image(path)
    with Image.open(path) as original:
        assert original.mode == "CMYK"
        np.testing.assert_array_equal(_pixels(out), convert_to_rgb(original, return_numpy=True))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = load_image(path)
    assert _pixels(out)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_mode_i_is_read_as_16_bit():
    im = Image.fromarray(np.array([[0, 257, 32768, 65535, 70000, -5]], dtype=np.int32))
    assert _pixels(load_image(im))[0, :, 0].tolist() == [0, 1, 128, 255, 255, 0]


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_animated_webp_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 255), (255, 0, 0)]]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert load_image(path).getpixel((4, 4)) == (0, 0, 255)


def _exif_rotated_jpeg(tmp_path):
    im = Image.new("RGB", (40, 20), (250, 0, 0))
    im.paste((0, 0, 250), (0, 0, 20, 20))  # left half blue
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_for_paths_like_transformers(tmp_path):
    path = _exif_rotated_jpeg(tmp_path)
    out = load_image(path)
    assert out.size == (20, 40)
    # orientation 6: the left (blue) half ends up on top
    assert out.getpixel((10, 5))[2] > 200
    assert out.getpixel((10, 35))[0] > 200
    np.testing.assert_array_equal(_pixels(out), _pixels(hf_load_image(str(path)).convert("RGB")))


def test_pil_images_from_the_caller_are_not_rotated(tmp_path):
    path = _exif_rotated_jpeg(tmp_path)
    with Image.open(path) as im:
        out = load_image(im)
    assert out.size == (40, 20)


def test_pil_input_is_copied_not_modified():
    src = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert src.getpixel((0, 0)) == (10, 20, 30, 0)


def test_closed_pil_image_is_an_image_error(tmp_path):
    path = tmp_path / "a.png"
    _gradient().save(path)
    im = Image.open(path)
    im.close()
    with pytest.raises(ImageError):
        load_image(im)


def test_arrays_grey_rgb_rgba():
    grey = np.full((3, 5), 9, dtype=np.uint8)
    assert load_image(grey).getpixel((4, 2)) == (9, 9, 9)
    rgb = np.zeros((3, 5, 3), dtype=np.uint8)
    rgb[2, 4] = (1, 2, 3)
    assert load_image(rgb).getpixel((4, 2)) == (1, 2, 3)
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0
    oracle = convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True)
    np.testing.assert_array_equal(_pixels(load_image(rgba)), oracle)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 5, 2), np.uint8), np.zeros((3, 5, 3), np.float32), np.zeros((3,), np.uint8), np.zeros((0, 5, 3), np.uint8)],
)
def test_bad_arrays_name_shape_and_dtype(array):
    with pytest.raises(ImageError, match=re.escape(f"shape {array.shape} and dtype {array.dtype}")):
        load_image(array)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)


def test_urls_are_refused_by_default():
    with pytest.raises(ImageError, match="URLs are not fetched unless allow_urls=True"):
        load_image("https://example.com/cat.jpg")


class _FakeResponse:
    def __init__(self, data):
        self.data = data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n):
        # a file-like response: each read takes the next bytes
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_urls_are_fetched_with_a_timeout_when_allowed(monkeypatch):
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return _FakeResponse(_png_bytes(Image.new("RGB", (3, 2), (7, 8, 9))))

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    out = load_image("http://example.com/x.png", allow_urls=True)
    assert out.getpixel((2, 1)) == (7, 8, 9)
    assert calls[0][0] == "http://example.com/x.png" and calls[0][1] > 0


def test_oversized_download_is_refused(monkeypatch):
    monkeypatch.setattr("mlx_paligemma.image.MAX_URL_BYTES", 100)
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: _FakeResponse(b"x" * 500))
    with pytest.raises(ImageError, match="100 byte limit"):
        load_image("https://example.com/big.png", allow_urls=True)


def test_downloads_are_limited_by_the_callers_size_and_time(monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: _FakeResponse(b"x" * 500))
    with pytest.raises(ImageError, match="200 byte limit"):
        load_image("https://example.com/big.png", allow_urls=True, max_url_bytes=200)

    class Slow(_FakeResponse):
        def read(self, n):
            time.sleep(0.03)
            return super().read(1)  # a slow drip: every read returns, the whole takes too long

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Slow(_png_bytes(Image.new("RGB", (3, 2)))))
    with pytest.raises(ImageError, match="longer than 0.1 s"):
        load_image("https://example.com/slow.png", allow_urls=True, url_timeout_s=0.1)


def test_image_file_bytes_are_read_like_a_file():
    out = load_image(_png_bytes(Image.new("RGB", (3, 2), (7, 8, 9))))
    assert out.size == (3, 2) and out.getpixel((2, 1)) == (7, 8, 9)
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, not a picture")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_failed_download_is_an_image_error(monkeypatch):
    def refuse(url, timeout):
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    with pytest.raises(ImageError, match="cannot fetch.*Connection refused"):
        load_image("https://example.com/x.png", allow_urls=True)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_file_handles_are_closed_on_success_and_failure(tmp_path):
    good = tmp_path / "a.png"
    _gradient().save(good)
    bad = _write(tmp_path, "bad.png", good.read_bytes()[:100])
    before = _open_fds()
    for _ in range(20):
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
    assert _open_fds() == before


def test_save_writes_each_format(tmp_path):
    src = _gradient()
    for suffix in [".png", ".jpg", ".jpeg", ".webp"]:
        path = save_image_atomic(src, tmp_path / f"out{suffix}")
        assert load_image(path).size == src.size
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "out.png")), _pixels(src))


def test_save_jpeg_of_rgba_drops_alpha(tmp_path):
    path = save_image_atomic(Image.new("RGBA", (4, 4), (10, 200, 10, 255)), tmp_path / "a.jpg")
    assert load_image(path).size == (4, 4)


def test_save_replaces_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.png"
    save_image_atomic(Image.new("RGB", (2, 2), (1, 1, 1)), path)
    save_image_atomic(Image.new("RGB", (3, 3), (9, 9, 9)), path)
    assert load_image(path).getpixel((2, 2)) == (9, 9, 9)
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_unknown_suffix(tmp_path):
    with pytest.raises(OutputError, match=r"unknown image suffix '\.bmpx'"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.bmpx")
    assert os.listdir(tmp_path) == []


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "no" / "out.png")
    assert os.listdir(tmp_path) == []


def test_save_under_a_regular_file(tmp_path):
    blocker = _write(tmp_path, "file", b"x")
    with pytest.raises(OutputError, match="is not a folder"):
        save_image_atomic(Image.new("RGB", (2, 2)), blocker / "out.png")
    assert blocker.read_bytes() == b"x"


def test_save_onto_a_folder_fails_cleanly(tmp_path):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(OutputError, match="out.png: cannot write"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.png")
    assert os.listdir(tmp_path) == ["out.png"]


def _old_file(tmp_path):
    path = tmp_path / "out.png"
    save_image_atomic(Image.new("RGB", (2, 2), (5, 5, 5)), path)
    return path, path.read_bytes()


def _save_that_fails_midway(exc):
    def save(fp, format=None, **kw):
        fp.write(b"\x89PNG partial")
        raise exc

    return save


def test_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)
    im = Image.new("RGB", (2, 2), (200, 0, 0))
    monkeypatch.setattr(im, "save", _save_that_fails_midway(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputError, match="out.png: cannot write the image \\(disk full\\)"):
        save_image_atomic(im, path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["out.png"]


def test_interrupt_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)
    im = Image.new("RGB", (2, 2), (200, 0, 0))
    monkeypatch.setattr(im, "save", _save_that_fails_midway(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_image_atomic(im, path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["out.png"]
