"""`paligemma video`: a task on frames sampled from a clip, in batches, one JSONL row per frame.

    paligemma video clip.mp4 --task detect --prompt "person" --every 1s -o frames.jsonl --save annotated.mp4

Frames are decoded with PyAV (FFmpeg's decoders: every container and codec FFmpeg reads). A
frame is taken at 0 s and then at the first frame at or after each multiple of `--every` (`1s`,
`0.5s`, `250ms`), or every Nth frame (`10f`); times are seconds from the clip's first frame. The
rows are those of `paligemma batch` plus `frame` (its index in the clip) and `time_s`, written and
resumed the same way. `--save` writes the clip again with each frame showing the boxes of the
latest sampled frame at or before it: the same frame count, size and rate (audio is not copied).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterator

from .batch import DEFAULT_BATCH_SIZE, Item, open_output, run_one_batch
from .errors import ImageError, OutputError, SettingError
from .files import atomic_file

VIDEO_SUFFIXES = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".webm": "libvpx", ".avi": "mpeg4"}
_EVERY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|ms|f)\s*$")


def _av():
    try:
        import av
    except ImportError:
        raise SettingError("video needs PyAV: pip install 'mlx-paligemma[video]'") from None
    return av


def parse_every(text: str) -> tuple[float, str]:
    """`1s`, `0.5s`, `250ms` -> (seconds, "s"); `10f` -> (10, "f")."""
    m = _EVERY.match(str(text))
    if not m:
        raise SettingError(f"--every must be a time like 1s, 0.5s or 250ms, or a frame count like 10f; got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "f":
        if value < 1 or value != int(value):
            raise SettingError(f"--every in frames must be a whole number >= 1, got {text!r}")
        return value, "f"
    seconds = value / 1000 if unit == "ms" else value
    if seconds <= 0:
        raise SettingError(f"--every must be more than 0, got {text!r}")
    return seconds, "s"


def _open(path: str):
    av = _av()
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a video FFmpeg can read ({e})") from None
    if not container.streams.video:
        container.close()
        raise ImageError(f"{path}: has no video stream")
    return container


def frames(path: str) -> Iterator[tuple[int, float, object]]:
    """(index, seconds from the first frame, av.VideoFrame) for every frame of the first video stream."""
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first = None
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 1)
                first = t if first is None else first
                yield index, t - first, frame
        except av.FFmpegError as e:
            raise ImageError(f"{path}: the video is corrupt or truncated ({e})") from None
    finally:
        container.close()


def sample(path: str, every: tuple[float, str]) -> Iterator[tuple[int, float, object]]:
    """The frames `every` picks: (index, time_s, av.VideoFrame)."""
    step, unit = every
    due = 0.0
    for index, t, frame in frames(path):
        if unit == "f":
            if index % int(step) == 0:
                yield index, t, frame
        elif t >= due - 1e-6:  # float times of frames on an exact grid land a hair short of it
            yield index, t, frame
            while due <= t + 1e-6:
                due += step


def run_video(model, clip: str, prompt: str, every: tuple[float, str], output, batch_size: int = DEFAULT_BATCH_SIZE,
              progress=None, **generate_kwargs) -> dict[int, list]:
    """Run `prompt` on the sampled frames a batch at a time and write a row per frame (frames
    already in `output` are skipped). Returns {frame index: (segments, detections)} of every sampled frame."""
    done = {row["frame"]: row for row in output.existing() if row.get("input") == clip and row.get("prompt") == prompt}
    boxes = {i: _drawables(r) for i, r in done.items()}
    pending: list[tuple[int, float, object]] = []

    def flush():
        items = [Item(clip, clip, prompt) for _ in pending]
        rows = run_one_batch(model, items, [image for _, _, image in pending], generate_kwargs)
        for (index, t, _), row in zip(pending, rows):
            row = {"input": clip, "frame": index, "time_s": round(t, 6), **{k: v for k, v in row.items() if k != "input"}}
            output.write(row)
            boxes[index] = _drawables(row)
            if progress is not None:
                progress(row)
        pending.clear()

    try:
        for index, t, frame in sample(clip, every):
            if index in done:
                continue
            pending.append((index, t, frame.to_image()))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        output.close()
    return boxes


def _drawables(row: dict) -> tuple[list, list]:
    """A row's (segments, detections) as objects to draw (masks decoded from their RLE)."""
    from .detection import Detection
    from .segmentation import Segment, rle_to_mask

    segments = [Segment(s["label"], tuple(s["box"]), rle_to_mask(s["mask"])) for s in row.get("segments") or []]
    return segments, [Detection(d["label"], tuple(d["box"])) for d in row.get("detections") or []]


def save_annotated(clip: str, boxes: dict[int, tuple[list, list]], out_path: str | os.PathLike) -> Path:
    """The clip with each frame showing the boxes (and masks) of the latest sampled frame at or before it.

    Same frame count, size and frame rate; written to a temporary file, then renamed."""
    from .segmentation import draw_segments

    av = _av()
    out_path = Path(out_path)
    codec = VIDEO_SUFFIXES[out_path.suffix.lower()]
    if codec not in av.codecs_available:
        codec = "mpeg4"  # FFmpeg's own encoder, in every build
    source = _open(clip)
    rate = source.streams.video[0].average_rate or source.streams.video[0].guessed_rate or 25
    source.close()
    try:
        with atomic_file(out_path) as tmp:  # keeps the suffix, from which av picks the container
            with av.open(str(tmp), mode="w") as target:
                stream = None
                current: tuple[list, list] = ([], [])
                for index, _, frame in frames(clip):
                    if index in boxes:
                        current = boxes[index]
                    if stream is None:
                        stream = target.add_stream(codec, rate=rate)
                        stream.width, stream.height = frame.width, frame.height
                        # 4:2:0 chroma needs even sides; 4:4:4 takes any
                        stream.pix_fmt = "yuv420p" if frame.width % 2 == 0 and frame.height % 2 == 0 else "yuv444p"
                    picture = draw_segments(frame.to_image(), *current) if any(current) else frame.to_image()
                    drawn = av.VideoFrame.from_image(picture)
                    drawn.pts = index
                    for packet in stream.encode(drawn):
                        target.mux(packet)
                if stream is not None:
                    for packet in stream.encode():
                        target.mux(packet)
    except (OSError, av.FFmpegError) as e:
        if isinstance(e, ImageError):
            raise
        raise OutputError(f"{out_path}: cannot write the video ({e})") from None
    return out_path


class _StdoutRows:
    """Rows printed as JSON lines when no -o is given (nothing to resume)."""

    def existing(self):
        return []

    def write(self, row):
        import json

        print(json.dumps(row, ensure_ascii=False), flush=True)

    def close(self):
        pass

    def finish(self):
        pass


def run_command(args, settings, load_model) -> int:
    """`paligemma video`: parsed args and checked settings; `load_model()` loads once."""
    from .batch import make_prompt, need_pycocotools
    from .prompts import is_segmentation_prompt
    from .demo import DEMO_NOTE

    _av()
    prompt = make_prompt(args.task, args.prompt, settings.lang)
    every = parse_every(args.every)
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise SettingError(f"--batch-size must be a whole number >= 1, got {args.batch_size!r}")
    save = None
    if args.save:
        save = Path(os.path.expanduser(args.save))
        if save.suffix.lower() not in VIDEO_SUFFIXES:
            raise OutputError(f"{save}: unknown video suffix {save.suffix!r}, use {', '.join(VIDEO_SUFFIXES)}")
        if not save.parent.is_dir():
            raise OutputError(f"{save}: the folder {save.parent} does not exist")
    if args.output and Path(args.output).suffix.lower() != ".jsonl":
        raise OutputError(f"{args.output}: video rows go to a .jsonl file")
    _open(args.clip).close()  # an unreadable clip fails before the model loads
    output = open_output(args.output) if args.output else _StdoutRows()
    segmenting = is_segmentation_prompt(prompt)
    if segmenting:
        need_pycocotools()
    model = load_model()
    if segmenting:
        model.mask_decoder()  # a missing decoder: one error line before any frame
    kwargs = dict(params=settings.sampling)
    model.check(prompt, **kwargs)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if model.is_demo:
        say(DEMO_NOTE)
    bar = None
    if not args.quiet and args.output:
        from tqdm import tqdm

        bar = tqdm(unit="frame", file=sys.stderr, dynamic_ncols=True)
    try:
        boxes = run_video(model, args.clip, prompt, every, output, args.batch_size,
                          (lambda row: bar.update(1)) if bar is not None else None, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    output.finish()
    if save is not None:
        say(f"saved {save_annotated(args.clip, boxes, save)}")
    return 0
