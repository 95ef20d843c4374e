"""`paligemma convert`: a checkpoint (folder or repo id) -> an MLX-ready folder, optionally quantized.

    paligemma-convert google/paligemma2-3b-mix-224 pg2-3b-bf16 --dtype bfloat16
    paligemma-convert google/paligemma2-3b-mix-224 pg2-3b-4bit --quantize 4

The weights go through the MLX backend itself (read, cast, quantize) and what it then holds is
written as is, under the canonical names (`vision.*`, `projector.*`, `text.*`), so the folder
loads with no renames: the SigLIP patch conv is already in MLX's O,H,W,I layout, and quantized
layers come with their scales and biases (config.json says how they were quantized).

Nothing appears at OUT_DIR until the new folder is complete and has been loaded back and run:
it is written into a hidden temporary folder beside OUT_DIR and renamed at the end; an error or
Ctrl-C on the way removes the temporary folder and leaves an old OUT_DIR as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import COPIED_FILES, FLOAT_DTYPES, plan_shards, shard_files
from .config import PaliGemmaConfig
from .errors import CheckpointError, OutputError, PaliGemmaError, SettingError
from .files import atomic_folder, reason
from .usage import Parser, UsageError

SHARD_BYTES = 2_000_000_000  # at most ~2 GB per safetensors file
DTYPES = tuple(FLOAT_DTYPES.values())
GROUP_SIZES = PaliGemmaConfig.MLX_GROUP_SIZES
CHECK_PROMPT = "caption en"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="paligemma-convert",
        description="Convert a PaliGemma checkpoint (folder or Hugging Face repo id) to an MLX-ready folder.",
        epilog="Exit codes: 0 done, 2 bad input or setting, 130 interrupted (nothing is left half-written).",
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint folder or repo id (`demo` = the built-in demo checkpoint)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist, unless --force)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the weights (default: the checkpoint's)")
    p.add_argument("--quantize", type=int, choices=(4, 8), metavar="BITS", help="quantize the text decoder to 4 or 8 bits")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size (default 64)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only once the new folder is complete)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e} (see paligemma-convert --help)", file=sys.stderr)
        return 2
    try:
        out = convert(args.source, args.out_dir, dtype=args.dtype, quantize=args.quantize,
                      group_size=args.group_size, force=args.force)
    except PaliGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.out_dir}", file=sys.stderr)
        return 130
    print(f"{out} ({_human(folder_size(out))})")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(
    source: str, out_dir: str | os.PathLike, dtype: str | None = None, quantize: int | None = None,
    group_size: int = 64, force: bool = False, log=_log,
) -> Path:
    """Write the converted folder at out_dir and return its path; raises PaliGemmaError."""
    from .checkpoint import open_checkpoint

    if quantize not in (None, 4, 8):
        raise SettingError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
    if group_size not in GROUP_SIZES:
        raise SettingError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    if dtype is not None and dtype not in DTYPES:
        raise SettingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(os.path.expanduser(str(out_dir))).absolute()
    _check_target(out, force)
    if str(source) == "demo":
        from .demo import demo_checkpoint

        source = demo_checkpoint()
    checkpoint = open_checkpoint(source)
    if out.exists() and out.resolve() == checkpoint.folder.resolve():
        raise OutputError(f"{out}: is the source checkpoint; write the conversion to another folder")
    stored_q = checkpoint.config.quantization
    if stored_q and quantize and (quantize, group_size) != (stored_q.get("bits"), stored_q.get("group_size")):
        raise SettingError(
            f"{source}: already quantized ({stored_q.get('bits')} bits, group size {stored_q.get('group_size')}); "
            "convert from the unquantized checkpoint"
        )
    if quantize and not stored_q:
        checkpoint.config.check_group_size(group_size)  # as the backend will, but before the log says "loading"
    dtype = dtype or checkpoint.stored_dtype  # the files keep the source's dtype unless told

    start = time.perf_counter()
    how = f"{quantize}-bit, group size {group_size}" if quantize else dtype
    log(f"loading {checkpoint.folder} ({how}) ...")
    backend = _build(checkpoint, dtype, quantize, group_size)
    weights = backend_weights(backend)
    reference = _check_logits(_model(backend, checkpoint.folder))
    log(f"loaded in {time.perf_counter() - start:.1f} s")

    config = json.loads((checkpoint.folder / "config.json").read_text())
    if quantize and not stored_q:
        config["quantization"] = {"bits": quantize, "group_size": group_size}
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype

    try:
        with atomic_folder(out) as tmp:
            write_weights(tmp, weights)
            del backend, weights  # free the first copy before the check loads a second
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_files(checkpoint.folder, tmp)
            check(tmp, dtype, reference)
            log("checked: the folder loads and gives the same logits as the converted model")
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({reason(e)}); nothing was changed") from None
    return out


def _check_target(out: Path, force: bool) -> None:
    """Refuse, before any loading, an output that cannot be written or would be overwritten silently."""
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"{out}: cannot write there ({parent} is not a folder)")
    if parent is not None and not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: cannot write there ({parent} is not writable)")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder")
        if not force:
            raise OutputError(f"{out}: already exists; pass --force to replace it")


def _build(checkpoint, dtype: str, quantize: int | None, group_size: int):
    from .mlx_backend.backend import MLXBackend

    try:
        return MLXBackend(checkpoint, dtype=dtype, quantize=quantize, group_size=group_size, cpu_layout=False)  # files keep the standard layout
    except ValueError as e:
        if isinstance(e, PaliGemmaError):
            raise
        # mx.quantize refuses widths that the group size does not divide
        raise SettingError(f"cannot quantize with group size {group_size}: {e}") from None


def backend_weights(backend) -> dict:
    """Every parameter the MLX model holds, by its (canonical) name."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(backend.model.parameters()))


def _model(backend, folder: Path):
    from .api import Model
    from .tokenizer import Tokenizer

    return Model(backend, Tokenizer(folder), source=str(folder))


def _check_logits(model):
    """Logits of a grey picture with a short prompt: a tiny forward through every part of the model."""
    from PIL import Image

    size = model.config.image_size
    return model.logits(Image.new("RGB", (size, size), (128, 128, 128)), CHECK_PROMPT)


def check(folder: Path, dtype: str, reference) -> None:
    """Load the written folder as a user will, and compare its logits with the converted model's."""
    import numpy as np

    from .api import load

    got = _check_logits(load(folder, backend="mlx", dtype=dtype))
    # the same weights in the same dtype through the same code: any difference is a writing error
    diff = float(np.max(np.abs(got - reference)))
    if not np.isfinite(got).all() or diff > 1e-4 * max(1.0, float(np.max(np.abs(reference)))):
        raise CheckpointError(f"the written folder gives different logits (max difference {diff:.3g}); nothing was written")


def write_weights(folder: Path, weights: dict) -> list[str]:
    """Safetensors shards (and their index when more than one) into `folder`; returns the file names."""
    import mlx.core as mx

    shards = plan_shards({k: weights[k].nbytes for k in sorted(weights)}, SHARD_BYTES)
    files = shard_files(len(shards))
    total = sum(v.nbytes for v in weights.values())
    bar = Progress("writing", total)
    for file, names in zip(files, shards):
        try:
            mx.save_safetensors(str(folder / file), {k: weights[k] for k in names}, metadata={"format": "mlx"})
        except (OSError, RuntimeError) as e:
            raise OutputError(f"{folder.parent}: cannot write {file} ({reason(e)})") from None
        bar.advance(sum(weights[k].nbytes for k in names))
    bar.close()
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: file for file, names in zip(files, shards) for k in names},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def copy_files(source: Path, folder: Path) -> None:
    """The tokenizer and the other small files a loader reads next to the weights."""
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """A one-line bar on stderr: `writing [#########---------]  50%  1.2 GB / 2.4 GB`.

    On a terminal it redraws in place; elsewhere (a log file) each update is a line of its own.
    """

    def __init__(self, label: str, total: int, stream=None, width: int = 30):
        self.label, self.total, self.width = label, max(int(total), 1), width
        self.stream = stream or sys.stderr
        self.done = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._draw()

    def advance(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total)
        self._draw()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        frac = self.done / self.total
        filled = round(frac * self.width)
        line = (
            f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {frac:4.0%}  "
            f"{_human(self.done)} / {_human(self.total)}"
        )
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
