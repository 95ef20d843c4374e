"""The mask decoder's weights: finding, reading, checking, converting and downloading them.

PaliGemma's segmentation answers give 16 `<segNNN>` codes per object; big_vision's VQ-VAE
decoder turns them into a 64x64 mask. Its weights are big_vision's `vae-oid.npz`, saved from a
PyTorch model: PyTorch names and layouts (`_vq_vae._embedding`, `decoder.0`, `decoder.2.net.{0,2,4}`,
`decoder.3.net.{0,2,4}`, transposed convs `decoder.4/6/8/10`, `decoder.12`). The file also holds
the encoder (`encoder.*`), which turns masks into codes and is not needed here.

The file comes from a path (`pg.load(..., vae=PATH)`, `--vae`, `$PALIGEMMA_VAE`), or from
`paligemma download-vae`, which fetches big_vision's public file only when asked. The model math
lives in `mlx_backend/vae.py` and `torch_backend/vae.py`; this module imports neither framework.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from .backend import pick_backend
from .config import GRID, HIDDEN, MASK_SIZE, NUM_CODES, UP_CHANNELS
from .errors import CheckpointError, OutputError, SettingError
from .files import atomic_file, cache_root

VAE_ENV = "PALIGEMMA_VAE"
VAE_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"  # gs://big_vision/paligemma/vae-oid.npz
VAE_NAME = "vae-oid.npz"

# stored name -> canonical name (what both backends' MaskDecoder call their parameters)
_LAYERS = {"decoder.0": "conv_in", "decoder.12": "conv_out"}
for _b in range(2):
    for _i, _c in ((0, 1), (2, 2), (4, 3)):
        _LAYERS[f"decoder.{2 + _b}.net.{_i}"] = f"blocks.{_b}.conv{_c}"
for _u, _n in enumerate((4, 6, 8, 10)):
    _LAYERS[f"decoder.{_n}"] = f"ups.{_u}"
STORED_NAMES = {"_vq_vae._embedding": "embedding"}
STORED_NAMES.update({f"{k}.{p}": f"{v}.{p}" for k, v in _LAYERS.items() for p in ("weight", "bias")})


def expected_shapes(num_codes: int, embedding_dim: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape in PyTorch's layouts (conv O,I,H,W; transposed conv I,O,H,W)."""
    shapes = {"embedding": (num_codes, embedding_dim), "conv_in.weight": (HIDDEN, embedding_dim, 1, 1), "conv_in.bias": (HIDDEN,)}
    for b in range(2):
        for c, k in ((1, 3), (2, 3), (3, 1)):
            shapes[f"blocks.{b}.conv{c}.weight"] = (HIDDEN, HIDDEN, k, k)
            shapes[f"blocks.{b}.conv{c}.bias"] = (HIDDEN,)
    dims = (HIDDEN,) + UP_CHANNELS
    for u in range(len(UP_CHANNELS)):
        shapes[f"ups.{u}.weight"] = (dims[u], dims[u + 1], 4, 4)
        shapes[f"ups.{u}.bias"] = (dims[u + 1],)
    shapes["conv_out.weight"] = (1, UP_CHANNELS[-1], 1, 1)
    shapes["conv_out.bias"] = (1,)
    return shapes


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The decoder's tensors of a `vae-oid.npz` (or its safetensors copy) under canonical names, float32,
    and the file's metadata (safetensors only; `demo` marks the random demo decoder).

    npz files are read without pickle. Every decoder tensor must be there with its shape; the
    encoder's tensors and anything else outside the decoder are not read.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such mask decoder file (get big_vision's with `paligemma download-vae`)")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                metadata = dict(f.metadata() or {})
                stored = {k: f.get_tensor(k) for k in f.keys() if k in STORED_NAMES}
        else:
            with np.load(path, allow_pickle=False) as f:
                stored = {k: f[k] for k in f.files if k in STORED_NAMES}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a mask decoder file (.npz or .safetensors): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in STORED_NAMES if k not in stored]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} (is this big_vision's vae-oid.npz?)")
    emb = stored["_vq_vae._embedding"]
    if emb.ndim != 2 or emb.shape[0] != NUM_CODES:
        raise CheckpointError(f"{path}: tensor _vq_vae._embedding has shape {list(emb.shape)}, expected [{NUM_CODES}, D]")
    shapes = expected_shapes(*emb.shape)
    weights = {}
    for stored_name, name in STORED_NAMES.items():
        w = stored[stored_name]
        if tuple(w.shape) != shapes[name]:
            raise CheckpointError(f"{path}: tensor {stored_name} has shape {list(w.shape)}, expected {list(shapes[name])}")
        if not np.issubdtype(w.dtype, np.floating):
            raise CheckpointError(f"{path}: tensor {stored_name} is {w.dtype}, expected floating point")
        weights[name] = np.asarray(w, dtype=np.float32)
    return weights, metadata


class Vae:
    """The mask decoder on a backend: `decode(codes)` turns (N, 16) codes into (N, 64, 64) maps."""

    def __init__(self, weights: dict[str, np.ndarray], backend: str = "torch", device: str | None = None,
                 source: str = "", demo: bool = False):
        if backend == "mlx":
            from .mlx_backend import vae as impl
        elif backend == "torch":
            from .torch_backend import vae as impl
        else:
            raise SettingError(f"backend for the mask decoder must be mlx or torch, got {backend!r}")
        self._impl = impl
        self.decoder = impl.load_decoder(weights, device)
        self.backend = backend
        self.source = source
        self.demo = demo

    def decode(self, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, GRID * GRID)
        if codes.size and (codes.min() < 0 or codes.max() >= NUM_CODES):
            raise ValueError(f"mask codes must be in [0, {NUM_CODES - 1}]")
        if not len(codes):
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        return self._impl.decode(self.decoder, codes)

    def __repr__(self) -> str:
        return f"Vae({self.source!r}, backend={self.backend!r}{', demo' if self.demo else ''})"


def load_vae(path: str | os.PathLike, backend: str = "auto", device: str | None = None) -> Vae:
    """Read a mask decoder file (`vae-oid.npz` or its safetensors copy) onto a backend."""
    weights, metadata = read_weights(path)
    return Vae(weights, pick_backend(backend), device, source=str(path), demo=metadata.get("demo") == "true")


def default_vae_path() -> Path:
    """Where `paligemma download-vae` puts the file by default (the package's cache folder)."""
    return cache_root() / VAE_NAME


def find_vae(explicit: str | os.PathLike | None = None) -> Path | None:
    """The decoder file to use: the explicit one, else $PALIGEMMA_VAE, else a downloaded one, else None."""
    if explicit:
        return Path(os.path.expanduser(str(explicit)))
    env = os.environ.get(VAE_ENV)
    if env:
        return Path(os.path.expanduser(env))
    for candidate in (default_vae_path(), default_vae_path().with_suffix(".safetensors")):
        if candidate.is_file():
            return candidate
    return None


def missing_vae_message() -> str:
    return (
        "segmentation needs big_vision's mask decoder (vae-oid.npz): run `paligemma download-vae` once, "
        f"or pass --vae PATH (or set ${VAE_ENV})"
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_vae(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the decoder tensors of `source` as a safetensors file (original names), atomically."""
    from safetensors.numpy import save_file

    source, out = Path(os.path.expanduser(str(source))), Path(os.path.expanduser(str(out)))
    if out.suffix != ".safetensors":
        raise OutputError(f"{out}: the output must end in .safetensors")
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    weights, metadata = read_weights(source)
    names = {v: k for k, v in STORED_NAMES.items()}
    tensors = {names[k]: np.ascontiguousarray(w) for k, w in weights.items()}
    metadata = dict(metadata, source=source.name, source_sha256=sha256_of(source))
    _write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return out


def _write_atomic(out: Path, write) -> None:
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist")
    try:
        with atomic_file(out) as tmp:
            write(tmp)
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({e.strerror or e})") from None


def download_vae(out: str | os.PathLike | None = None, url: str = VAE_URL, force: bool = False, progress: bool = True) -> tuple[Path, str]:
    """Fetch big_vision's vae-oid.npz (only ever called on a person's request) -> (path, sha256).

    The file goes to a temporary name beside `out`, is checked to be a decoder, and only then
    renamed into place; its sha256 is written next to it (`vae-oid.npz.sha256`, sha256sum format).
    """
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    out = Path(os.path.expanduser(str(out))) if out else default_vae_path()
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to download it again")
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"downloading {url} to {out}", file=sys.stderr)
    h = hashlib.sha256()
    try:
        with atomic_file(out) as tmp:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise OutputError(f"cannot download {url}: {reason}") from None
            with response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=out.name, disable=not progress, file=sys.stderr) as bar:
                    while True:
                        try:
                            block = response.read(1 << 16)
                        except OSError as e:
                            raise OutputError(f"download of {url} broke off: {e}") from None
                        if not block:
                            break
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
                if total is not None and f.tell() != total:
                    raise OutputError(f"download of {url} broke off after {f.tell()} of {total} bytes")
            read_weights(tmp)  # a file that is not a decoder never takes the final name
    except CheckpointError as e:
        raise OutputError(f"{url} did not give a mask decoder file: {e}") from None
    digest = h.hexdigest()
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return out, digest


def demo_weights(seed: int = 0, embedding_dim: int = 64) -> dict[str, np.ndarray]:
    """Random decoder tensors under the stored (vae-oid.npz) names, for the demo checkpoint.

    Random codebook and convs, but transposed convs that upsample smoothly (each output channel a
    bilinear [1, 3, 3, 1] kernel of its input channels), so that masks come out as blobs rather
    than noise, and a final bias that sets about half of each map.
    """
    rng = np.random.default_rng(seed)
    names = {v: k for k, v in STORED_NAMES.items()}
    bilinear = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 16.0
    out = {}
    for name, shape in expected_shapes(NUM_CODES, embedding_dim).items():
        if name == "embedding":
            w = rng.normal(0.0, 1.0, shape)
        elif name == "conv_out.bias":
            w = np.full(shape, -2.14)  # about the median map value of these weights (seed 0)
        elif name.endswith("bias"):
            w = np.zeros(shape)
        elif name.startswith("ups."):
            cin, cout = shape[:2]
            w = np.zeros(shape)
            for i in range(cin):
                w[i, i % cout] += bilinear * cout / cin
        elif name.startswith("blocks."):
            w = rng.normal(0.0, 0.02, shape)
        elif name == "conv_in.weight":
            w = rng.normal(0.0, 1.0 / np.sqrt(embedding_dim), shape)
        else:
            w = rng.normal(0.0, 1.0, shape)
        out[names[name]] = w.astype(np.float32)
    return out
