"""`paligemma batch --ray`: the same job as a Ray Data pipeline, for datasets past one machine.

    items (from_items) -> preprocess (decode, resize to the model's square; Ray tasks on any node)
    -> map_batches(Predictor): one model per actor, torch backend, `generate_batch` per batch
    -> rows streamed back to the driver, written through the same resumable output as a local run

Only the small resized images travel between nodes, and the rows are those of a local run (the
early resize gives the same pixels: resizing a square to its own size is a copy). The model folder
and the image paths must be readable on every node (a shared file system, or the same files).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from .batch import Item, run_one_batch
from .errors import ImageError, SettingError


def check_ray() -> None:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise SettingError("--ray needs Ray Data: pip install 'mlx-paligemma[ray]'") from None


def _model_path(model: str) -> str:
    """`demo` is made on the driver; workers get a folder (or a repo id, read from their own cache)."""
    if model == "demo":
        from .demo import demo_checkpoint

        return str(demo_checkpoint())
    return os.path.abspath(os.path.expanduser(model)) if os.path.isdir(os.path.expanduser(model)) else model


def _local(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def preprocess(row: dict, size: int) -> dict:
    """Decode and resize one image (a Ray Data `map`): the row gains pixels and the original size."""
    from .image import load_image
    from .processor import resize

    pixels, width, height, error = np.zeros((size, size, 3), np.uint8), 0, 0, row["error"]
    if error is None:
        try:
            image = load_image(row["path"])
            width, height = image.size
            pixels = np.asarray(resize(image, size))
        except ImageError as e:
            error = str(e)
    return dict(row, error=error, pixels=pixels, width=width, height=height)


class Predictor:
    """One model per actor (Ray Data calls the class once per actor, then once per batch)."""

    def __init__(self, model: str, dtype: str | None, generate_kwargs: dict, vae: str | None = None,
                 adapter: str | None = None):
        from .api import load

        self.model = load(model, backend="torch", dtype=dtype, vae=vae, adapter=adapter)
        self.generate_kwargs = generate_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # a column of text with gaps comes back with NaN (not None) in the gaps
        text = lambda v: v if isinstance(v, str) else None
        items = [Item(str(i), str(p), text(q), text(e))
                 for i, p, q, e in zip(batch["input"], batch["path"], batch["prompt"], batch["error"])]
        loaded = [item.error if item.error is not None else pixels for item, pixels in zip(items, batch["pixels"])]
        sizes = [(int(w), int(h)) for w, h in zip(batch["width"], batch["height"])]
        rows = run_one_batch(self.model, items, loaded, self.generate_kwargs, sizes)
        return {"row": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object)}


def run_ray(settings, items: Sequence[Item], output, batch_size: int, address: str | None = None,
            actors: int = 1, cpus_per_actor: float = 1, progress=None, **generate_kwargs) -> dict:
    """Run `items` through a Ray Data pipeline and write each row to `output` as it comes back.

    Joins the cluster at `address`, or the one this process already joined, or starts a local one.
    """
    import ray

    from .config import PaliGemmaConfig
    from .checkpoint import open_checkpoint

    if not isinstance(actors, int) or actors < 1:
        raise SettingError(f"--ray-actors must be a whole number >= 1, got {actors!r}")
    if not cpus_per_actor > 0:
        raise SettingError(f"--ray-cpus must be > 0, got {cpus_per_actor!r}")
    model = _model_path(settings.model)
    config: PaliGemmaConfig = open_checkpoint(model).config  # a bad checkpoint fails here, not in an actor
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    # our tqdm bar reports progress; Ray Data's own bars and execution logs would interleave with it
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    counts = {"rows": 0, "errors": 0, "tokens": 0, "seconds": 0.0}
    start = time.perf_counter()
    try:
        # paths absolute: workers do not run in this folder
        rows = [{"input": it.input, "path": os.path.abspath(it.path) if it.path else "", "prompt": it.prompt,
                 "error": it.error} for it in items]
        ds = ray.data.from_items(rows)
        ds = ds.map(preprocess, fn_kwargs={"size": config.image_size})
        ds = ds.map_batches(
            Predictor, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"model": model, "dtype": settings.dtype, "generate_kwargs": generate_kwargs,
                                   "vae": _local(settings.vae), "adapter": _local(settings.adapter)},
        )
        for out in ds.iter_rows():
            row = json.loads(out["row"])
            output.write(row)
            counts["rows"] += 1
            counts["errors"] += row["error"] is not None
            counts["tokens"] += (row["stats"] or {}).get("generated_tokens", 0)
            if progress is not None:
                progress(row, counts, time.perf_counter() - start)
    finally:
        output.close()
        if started:
            ray.shutdown()
    counts["seconds"] = time.perf_counter() - start
    return counts
