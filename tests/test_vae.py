"""The mask decoder against an independent reference, on random weights laid out as vae-oid.npz.

The reference follows big_vision's flax definition literally: flax `Conv` (cross-correlation,
HWIO kernels from the PyTorch ones by transposing (2, 3, 1, 0)) and flax `ConvTranspose(kernel 4,
strides 2, padding=2, transpose_kernel=True)`, which is jax.lax.conv_transpose: dilate the input
by the stride, pad it by 2 on each side, and cross-correlate with the kernel flipped in space and
with its two channel axes swapped. It is written with torch.nn.functional.conv2d on the dilated
input, not with ConvTranspose2d (what the backends use), so the padding correspondence is tested.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_paligemma.errors import CheckpointError, OutputError
from mlx_paligemma.vae import convert_vae, load_vae, read_weights


def random_vae_file(path, seed=0, embedding_dim=64, extra=True):
    """Random tensors under vae-oid.npz's names and PyTorch layouts (with encoder tensors, as the real file)."""
    rng = np.random.default_rng(seed)
    t = {"_vq_vae._embedding": rng.normal(0, 1, (128, embedding_dim))}

    def conv(name, o, i, k, transposed=False):
        shape = (i, o, k, k) if transposed else (o, i, k, k)
        fan_in = (i * k * k) / (4 if transposed else 1)
        t[name + ".weight"] = rng.normal(0, 1.3 / np.sqrt(fan_in), shape)
        t[name + ".bias"] = rng.normal(0, 0.1, (o,))

    conv("decoder.0", 128, embedding_dim, 1)
    for b in (2, 3):
        conv(f"decoder.{b}.net.0", 128, 128, 3)
        conv(f"decoder.{b}.net.2", 128, 128, 3)
        conv(f"decoder.{b}.net.4", 128, 128, 1)
    for n, (i, o) in zip((4, 6, 8, 10), ((128, 128), (128, 64), (64, 32), (32, 16))):
        conv(f"decoder.{n}", o, i, 4, transposed=True)
    conv("decoder.12", 1, 16, 1)
    if extra:  # the encoder half of the VQ-VAE is in the real file too
        conv("encoder.0", 16, 1, 3)
    np.savez(path, **{k: v.astype(np.float32) for k, v in t.items()})
    return path


def flax_reference(path, codes: np.ndarray) -> np.ndarray:
    """big_vision's Decoder, as flax computes it, in float64."""
    ck = {k: torch.from_numpy(v).double() for k, v in np.load(path).items()}

    def conv(x, name, pad):  # flax Conv: cross-correlation; the OIHW kernel is the HWIO one transposed back
        return F.conv2d(x, ck[name + ".weight"], ck[name + ".bias"], padding=pad)

    def conv_transpose(x, name):
        w = ck[name + ".weight"]  # PyTorch (I, O, H, W); flax kernel (H, W, O, I) with transpose_kernel=True
        # lax.conv_transpose(transpose_kernel=True): flip space, swap the channel axes -> OIHW (O, I) kernel
        k = w.flip(2, 3).permute(1, 0, 2, 3)
        n, c, h, wd = x.shape
        dilated = x.new_zeros(n, c, 2 * h - 1, 2 * wd - 1)
        dilated[:, :, ::2, ::2] = x  # lhs_dilation = strides
        return F.conv2d(F.pad(dilated, (2, 2, 2, 2)), k, ck[name + ".bias"])  # padding=2 on each side

    emb = ck["_vq_vae._embedding"]
    x = emb[torch.from_numpy(codes).long()].reshape(len(codes), 4, 4, -1).permute(0, 3, 1, 2)
    x = F.relu(conv(x, "decoder.0", 0))
    for b in (2, 3):
        y = F.relu(conv(x, f"decoder.{b}.net.0", 1))
        y = F.relu(conv(y, f"decoder.{b}.net.2", 1))
        x = x + conv(y, f"decoder.{b}.net.4", 0)
    for n in (4, 6, 8, 10):
        x = F.relu(conv_transpose(x, f"decoder.{n}"))
    return conv(x, "decoder.12", 0)[:, 0].numpy()


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return random_vae_file(tmp_path_factory.mktemp("vae") / "vae-oid.npz", seed=3)


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(7)
    return np.concatenate([rng.integers(0, 128, (5, 16)), np.zeros((1, 16), int), np.full((1, 16), 127)])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_decoder_matches_the_flax_definition(vae_file, codes, backend):
    ref = flax_reference(vae_file, codes)
    assert ref.shape == (len(codes), 64, 64)
    assert ref.std() > 0.1 and 0.05 < (ref > 0).mean() < 0.95  # maps with structure and both signs
    out = load_vae(vae_file, backend=backend).decode(codes)
    assert out.shape == (len(codes), 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_backends_agree_and_safetensors_copy_gives_the_same_maps(vae_file, codes, tmp_path):
    copy = convert_vae(vae_file, tmp_path / "vae-oid.safetensors")
    a = load_vae(vae_file, backend="torch").decode(codes)
    b = load_vae(vae_file, backend="mlx").decode(codes)
    c = load_vae(copy, backend="torch").decode(codes)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(OutputError, match="exists"):
        convert_vae(vae_file, copy)


def test_reading_refuses_pickles_and_names_bad_tensors(vae_file, tmp_path):
    weights, _ = read_weights(vae_file)
    assert "embedding" in weights and not any(k.startswith("encoder") for k in weights)
    data = dict(np.load(vae_file))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **dict(data, **{"decoder.0.weight": np.array([object()], dtype=object)}))
    with pytest.raises(CheckpointError, match="pickled.npz"):
        read_weights(pickled)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in data.items() if k != "decoder.8.bias"})
    with pytest.raises(CheckpointError, match="missing tensor decoder.8.bias"):
        read_weights(missing)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **dict(data, **{"decoder.6.weight": data["decoder.6.weight"].transpose(1, 0, 2, 3)}))
    with pytest.raises(CheckpointError, match=r"decoder.6.weight has shape \[64, 128, 4, 4\], expected \[128, 64, 4, 4\]"):
        read_weights(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        read_weights(junk)
    with pytest.raises(CheckpointError, match="no such mask decoder file"):
        read_weights(tmp_path / "absent.npz")
    assert zipfile.is_zipfile(vae_file)
