"""Many images through one model: `paligemma batch` over a folder, a glob or a manifest.

    paligemma batch photos/ --task caption -o captions.jsonl
    paligemma batch 'shots/*.png' --task detect --prompt "car ; person" -o boxes.parquet
    paligemma batch manifest.csv --task answer -o answers.jsonl     # columns image, prompt

Rows go through `Model.generate_batch`, a batch at a time; each output row is the image, the
prompt, the answer (text, ids, boxes in pixels) and its stats, or an error for that row alone.
Rows are appended one write and one fsync each, so a kill loses at most the batch in flight; a
rerun of the same command reads what is there (dropping a partial last line), and runs only the
rows that are missing. A row's identity is its input and prompt (and, for a pair listed twice,
which occurrence it is). Parquet output keeps a JSONL journal beside it while running and turns
it into the parquet file at the end, atomically.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import ImageError, OutputError, PaliGemmaError, PromptError, SettingError
from .files import atomic_file
from .prompts import TASKS, is_detection_prompt, is_segmentation_prompt, task_prompt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
# `prompt`: each row's prompt (or the whole --prompt) is sent as it is
BATCH_TASKS = tuple(TASKS) + ("prompt",)
DEFAULT_BATCH_SIZE = 8
DECODED_CACHE_SIZE = 16  # decoded images kept by file content, about two batches


@dataclass(frozen=True)
class Item:
    """One row to compute: `input` is what the output row names, `path` where the image is read."""

    input: str
    path: str
    prompt: str | None
    error: str | None = None  # a manifest row or prompt that cannot run: written as an error row


def collect_items(source: str, task: str, argument: str | None = None, lang: str = "en") -> list[Item]:
    """A folder (recursive), a glob or a JSONL/CSV manifest -> one Item per (image, prompt).

    `argument` is the task's argument for every row (the question of `answer`, the things of
    `detect`); a manifest row's own `prompt` (or `question`) column overrides it.
    """
    if task not in BATCH_TASKS:
        raise SettingError(f"unknown task {task!r}; one of {', '.join(BATCH_TASKS)}")
    path = Path(os.path.expanduser(source))
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return [_item(name, file, arg if arg is not None else argument, task, lang, error)
                for name, file, arg, error in _read_manifest(path)]
    # one prompt for every image: a bad --prompt is a setting error before anything runs
    prompt = make_prompt(task, argument, lang)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            # dot files are editor and OS leftovers (macOS writes `._photo.jpg` beside each photo)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        items = [Item(p.relative_to(path).as_posix(), str(p), prompt) for p in files]
        where = f"the folder {source}"
    elif glob.has_magic(source):
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
        items = [Item(f, f, prompt) for f in files]
        where = f"files matching {source}"
    elif path.is_file():
        raise SettingError(f"{source}: not a folder, a glob or a manifest (.jsonl or .csv)")
    else:
        raise SettingError(f"{source}: no such folder or manifest, and no file matches it as a glob")
    if not items:
        raise SettingError(f"no images in {where} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return items


def make_prompt(task: str, argument: str | None, lang: str = "en") -> str:
    """A batch task and its argument -> the prompt (`prompt`: the argument as is)."""
    if task == "prompt":
        if not (argument or "").strip():
            raise SettingError("the task `prompt` needs --prompt (or a prompt column in the manifest): the text sent as is")
        return argument
    return task_prompt(task, argument or "", lang)


def _item(name, file, argument, task, lang, error) -> Item:
    if error is None:
        try:
            return Item(name, file, make_prompt(task, argument, lang))
        except SettingError as e:
            error = str(e)
    return Item(name, file, None, error)


def _read_manifest(path: Path) -> Iterator[tuple[str, str, str | None, str | None]]:
    """(input, file, argument, error) per row; image paths are relative to the manifest's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel writes CSV with a byte order mark
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"{path}: cannot read the manifest ({e})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in reader.fieldnames or []]
        if "image" not in columns:
            raise SettingError(f"{path}: a CSV manifest needs a header line with an `image` column (and optionally `prompt`)")
        rows = (({(k or "").strip(): v for k, v in r.items()}, reader.line_num) for r in reader)
    else:
        rows = _jsonl_rows(text)
    count = 0
    for row, line in rows:
        count += 1
        where = f"{path.name}:{line}"
        if isinstance(row, str):  # a line that is not a JSON object
            yield where, "", None, f"{where}: {row}"
            continue
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            yield where, "", None, f"{where}: the row has no `image`"
            continue
        argument = row.get("prompt")
        if argument in (None, ""):
            argument = row.get("question")
        if argument is not None and not isinstance(argument, str):
            yield image, "", None, f"{where}: `prompt` must be text, got {type(argument).__name__}"
            continue
        file = os.path.join(path.parent, os.path.expanduser(image.strip()))
        yield image, file, argument or None, None
    if count == 0:
        raise SettingError(f"{path}: the manifest has no rows")


def _jsonl_rows(text: str) -> Iterator[tuple[dict | str, int]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            yield f"not a JSON object ({e.msg})", line
            continue
        yield (row if isinstance(row, dict) else "not a JSON object"), line


class JsonlOutput:
    """Rows appended to a JSONL file, each one write then fsync: a row is on disk whole or not at all."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def existing(self) -> list[dict]:
        """The rows already written. A last line without its newline (a write cut by a kill) is
        cut off the file, so that the next row starts on a line of its own."""
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot read the earlier results ({e.strerror or e})") from None
        end = data.rfind(b"\n") + 1
        if end < len(data):
            try:
                os.truncate(self.path, end)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot drop the partial last line ({e.strerror or e})") from None
        rows = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or "input" not in row or "prompt" not in row:
                raise OutputError(f"{self.path}:{n}: not a row of a batch run; pass another -o to start afresh")
            rows.append(row)
        return rows

    def check_writable(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            raise OutputError(f"{self.path}: the folder {folder} does not exist")
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a folder")
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise OutputError(f"{self.path}: not writable")

    def write(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        try:
            if self._fd is None:
                new = not self.path.exists()
                # 0o666: the umask decides, as for a plain open
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
                if new:  # the file's name survives a crash too, not only its bytes
                    _fsync_folder(self.path.parent)
            size = os.fstat(self._fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, size)  # no half row left behind (disk full)
                raise
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write a row ({e.strerror or e})") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self) -> None:
        self.close()


class ParquetOutput:
    """Rows go to a JSONL journal beside the parquet file while the run goes on; `finish` writes
    every row (those of an earlier parquet file too) into a new parquet file and renames it over
    the old one. The new file records the journal's hash, so a journal left behind by a kill
    between the rename and its removal is recognised as already absorbed and never counted twice."""

    JOURNAL_KEY = b"mlx_paligemma.journal_sha256"

    def __init__(self, path: str | os.PathLike):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SettingError("parquet output needs pyarrow: pip install 'mlx-paligemma[parquet]' (or write .jsonl)") from None
        self.path = Path(path)
        self.journal = JsonlOutput(self.path.with_name(self.path.name + ".partial.jsonl"))

    def _parquet_rows(self) -> tuple[list[dict], bytes | None]:
        import pyarrow.parquet as pq

        if not self.path.exists():
            return [], None
        try:
            table = pq.read_table(self.path)
        except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError, ...
            raise OutputError(f"{self.path}: not a parquet file of a batch run ({e}); pass another -o") from None
        meta = table.schema.metadata or {}
        return table.to_pylist(), meta.get(self.JOURNAL_KEY)

    def existing(self) -> list[dict]:
        rows, absorbed = self._parquet_rows()
        if absorbed is not None and self.journal.path.exists() and _sha256(self.journal.path) == absorbed.decode():
            self.journal.path.unlink()
        return rows + self.journal.existing()

    def check_writable(self) -> None:
        self.journal.check_writable()

    def write(self, row: dict) -> None:
        self.journal.write(row)

    def close(self) -> None:
        self.journal.close()

    def finish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.journal.close()
        if not self.journal.path.exists():
            return
        rows, _ = self._parquet_rows()
        rows += self.journal.existing()
        table = pa.Table.from_pylist(rows).replace_schema_metadata({self.JOURNAL_KEY: _sha256(self.journal.path).encode()})
        try:
            with atomic_file(self.path) as tmp:
                pq.write_table(table, tmp)
            _fsync_folder(self.path.parent)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the parquet file ({e.strerror or e}); the rows stay in {self.journal.path}") from None
        self.journal.path.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rows themselves are synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_output(path: str | os.PathLike):
    path = Path(os.path.expanduser(str(path)))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = JsonlOutput(path)
    elif suffix == ".parquet":
        out = ParquetOutput(path)
    else:
        raise OutputError(f"{path}: the results file must end in .jsonl or .parquet")
    out.check_writable()
    return out


def pending(items: Sequence[Item], done_rows: Iterable[dict]) -> list[Item]:
    """The items without a row yet. A pair (input, prompt) listed n times needs n rows."""
    done = Counter((r["input"], r["prompt"]) for r in done_rows)
    todo = []
    for item in items:
        key = (item.input, item.prompt)
        if done[key] > 0:
            done[key] -= 1
        else:
            todo.append(item)
    return todo


def result_row(item: Item, generation, image_size: tuple[int, int], batch_size: int, vae=None) -> dict:
    """The output row of one computed item: boxes in pixels of the original image; for `segment`
    also the masks, as COCO RLE (`vae`: the model's mask decoder)."""
    from .detection import parse_detections
    from .segmentation import parse_segments, segments_json

    masks = {"segments": None, "invalid": None}
    if is_segmentation_prompt(item.prompt):
        segments = parse_segments(generation.text, image_size, vae)
        detections, masks = segments.detections, segments_json(segments)
    elif is_detection_prompt(item.prompt):
        detections = parse_detections(generation.text, image_size)
    else:
        detections = []
    return {
        "input": item.input,
        "prompt": item.prompt,
        "text": generation.text,
        "token_ids": list(generation.token_ids),
        "finished_by": generation.finished_by,
        "image_size": list(image_size),
        "detections": [{"label": d.label, "box": [round(v, 1) for v in d.box]} for d in detections],
        **masks,
        "stats": dict(generation.stats.to_dict(), batch_size=batch_size),
        "error": None,
    }


def error_row(item: Item, message: str) -> dict:
    # the same keys as a result row, so that every row of a parquet file has one schema
    return {"input": item.input, "prompt": item.prompt, "text": None, "token_ids": None, "finished_by": None,
            "image_size": None, "detections": None, "segments": None, "invalid": None, "stats": None, "error": message}


class DecodedImages:
    """Images decoded once per file content: the same photo under two names, or listed with
    several prompts, is read from disk each time but decoded only once (while recently used)."""

    def __init__(self, size: int = DECODED_CACHE_SIZE):
        self.size = size
        self._images: OrderedDict[str, object] = OrderedDict()

    def load(self, path: str):
        from .image import load_image

        try:
            with open(path, "rb") as f:
                key = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return load_image(path)  # load_image gives the one-line reason (missing, a folder, ...)
        image = self._images.get(key)
        if image is None:
            image = load_image(path)
            self._images[key] = image
            while len(self._images) > self.size:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return image


def _load_batch(batch: Sequence[Item], decoded: DecodedImages) -> list:
    """Each item's decoded image, or the message of why it has none."""
    loaded = []
    for item in batch:
        if item.error is not None:
            loaded.append(item.error)
            continue
        try:
            loaded.append(decoded.load(item.path))
        except ImageError as e:
            loaded.append(str(e))
    return loaded


def group_by_image(items: Sequence[Item]) -> list[Item]:
    """Rows of the same image next to each other (first-seen order), so that its features are
    still in the model's cache for its other prompts."""
    order: dict[str, list[Item]] = {}
    for item in items:
        order.setdefault(item.path, []).append(item)
    return [item for group in order.values() for item in group]


def run_batch(model, items: Sequence[Item], output, batch_size: int = DEFAULT_BATCH_SIZE, progress=None,
              **generate_kwargs) -> dict:
    """Compute `items` (those not yet done) a batch at a time, writing each row to `output`.

    The next batch's images are decoded in a thread while the model runs. Returns counts:
    rows written, errors, tokens generated, seconds.
    """
    items = list(items)
    decoded = DecodedImages(max(DECODED_CACHE_SIZE, 2 * batch_size))
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    counts = {"rows": 0, "errors": 0, "tokens": 0, "seconds": 0.0}
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paligemma-decode")
    try:
        ahead = pool.submit(_load_batch, batches[0], decoded) if batches else None
        for i, batch in enumerate(batches):
            loaded = ahead.result()
            ahead = pool.submit(_load_batch, batches[i + 1], decoded) if i + 1 < len(batches) else None
            for row in run_one_batch(model, batch, loaded, generate_kwargs):
                output.write(row)
                counts["rows"] += 1
                counts["errors"] += row["error"] is not None
                counts["tokens"] += (row["stats"] or {}).get("generated_tokens", 0)
                if progress is not None:
                    progress(row, counts, time.perf_counter() - start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        output.close()
    counts["seconds"] = time.perf_counter() - start
    return counts


def run_one_batch(model, batch: Sequence[Item], loaded: list, generate_kwargs: dict, sizes=None) -> list[dict]:
    """The rows of one batch: `loaded` holds each item's image or the message why it has none;
    `sizes` the original (width, height) when the images were resized before (default: their size)."""
    rows: list[dict | None] = [None] * len(batch)
    ready = []
    for j, (item, image) in enumerate(zip(batch, loaded)):
        if isinstance(image, str):
            rows[j] = error_row(item, image)
            continue
        try:
            model.prompt_ids(item.prompt)  # a prompt past the context fails this row, not the batch
        except PromptError as e:
            rows[j] = error_row(item, str(e))
            continue
        ready.append(j)
    if ready:
        vae = model.mask_decoder() if any(is_segmentation_prompt(batch[j].prompt) for j in ready) else None
        images = [loaded[j] for j in ready]
        try:
            generations = model.generate_batch(images, [batch[j].prompt for j in ready], **generate_kwargs)
        except PaliGemmaError:
            if len(ready) == 1:
                raise
            # find the row at fault: each alone gives the same ids as in the batch
            generations = []
            for j in ready:
                try:
                    generations.append(model.generate(loaded[j], batch[j].prompt, **generate_kwargs))
                except (ImageError, PromptError) as e:
                    generations.append(e)
        for j, g in zip(ready, generations):
            size = sizes[j] if sizes is not None else g.image_size
            rows[j] = error_row(batch[j], str(g)) if isinstance(g, Exception) else result_row(batch[j], g, size, len(ready), vae)
    return rows


def need_pycocotools() -> None:
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        raise SettingError("masks as COCO RLE need pycocotools: pip install 'mlx-paligemma[segment]'") from None
