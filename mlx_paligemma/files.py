"""Where the package keeps files, and how it writes them so that no reader sees half of one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def cache_root() -> Path:
    """$MLX_PALIGEMMA_CACHE, else the XDG cache folder (~/.cache/mlx-paligemma): the demo checkpoint,
    full-size random checkpoints, the downloaded mask decoder."""
    base = os.environ.get("MLX_PALIGEMMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlx-paligemma"
    )
    return Path(base)


class atomic_folder:
    """`with atomic_folder(out) as tmp:` fill tmp, a hidden folder made beside `out`; on success it is
    synced to disk and renamed to `out`, on any error (or Ctrl-C) it is removed and `out` is as it was.

    replace: an existing `out` is moved aside, and deleted only once the new folder is in place.
    Without it, an `out` that exists by the end (another process wrote it first: a cache) is kept
    and the new folder dropped.
    """

    def __init__(self, out: str | os.PathLike, replace: bool = True):
        self.out = Path(out)
        self.replace = replace

    def __enter__(self) -> Path:
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.writing-", dir=parent))
        except OSError as e:
            raise OutputError(f"{self.out}: cannot write there ({reason(e)})") from None
        return self.tmp

    def __exit__(self, kind, value, tb) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            sync_folder(self.tmp)
            if self.replace or not self.out.exists():
                replace_folder(self.tmp, self.out)
        except OSError as e:
            if not self.replace and self.out.exists():
                return False  # another process put its folder there first; ours is dropped below
            raise OutputError(f"{self.out}: cannot write ({reason(e)}); nothing was changed") from None
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


@contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_file(out) as tmp:` write the file tmp, a hidden name beside `out` (with out's
    suffix, which some writers read the format from); when the block ends it is synced to disk and
    renamed to `out`; on any error (or Ctrl-C) it is removed and `out` is as it was. Errors pass
    through, for the caller to word."""
    out = Path(out)
    # in out's folder, so that the rename stays within one file system
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp{out.suffix}")
    try:
        yield tmp
        sync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Flush every file to disk before a rename makes the folder visible."""
    for f in folder.iterdir():
        sync_file(f)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and deleted only once tmp is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def reason(e: BaseException) -> str:
    """An OS error's reason in a few words, for a one-line message."""
    return (e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())) or type(e).__name__
