"""The AVX2 streaming kernels of the torch backend against float64 products."""

from __future__ import annotations

import pytest
import torch

from mlx_paligemma.torch_backend import cpu_kernels

from .conftest import require_kernels


@pytest.fixture(autouse=True)
def kernels():
    require_kernels()  # skipped only where the kernels are not meant to run; a failed build fails


# every row count: groups of four rows and each remainder; 301 and 257 weight rows: tiles of three and the rest
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("K", [64, 72, 2304 + 7])  # a tail that is not a multiple of the vector width
def test_bf16_kernel_matches_float64(rows, K):
    g = torch.Generator().manual_seed(rows * K)
    w = torch.randn(301, K, generator=g).bfloat16()
    x = torch.randn(rows, K, generator=g)
    ref = x.double() @ w.double().T
    y = cpu_kernels.gemv_bf16(x, w)
    assert y.shape == (rows, 301)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4 * K**0.5)


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 8])
def test_int8_kernel_matches_float64(rows):
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (257, 520), generator=g, dtype=torch.int8)
    scale = torch.rand(257, generator=g) / 100
    x = torch.randn(rows, 520, generator=g)
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    assert torch.allclose(cpu_kernels.gemv_int8(x, q, scale).double(), ref, rtol=1e-4, atol=1e-4)


# rows: tiles of four and remainders; weight rows: panels of 24 with thirds of 8 and single rows left;
# columns: several 192-wide blocks, a last block that is not a multiple of 8, and one shorter than 8
@pytest.mark.parametrize("M, N, K", [(9, 16, 8), (13, 45, 300), (262, 2 * 24 + 8 + 3, 2 * 192 + 13), (7, 3, 5)])
def test_many_row_products_match_float64(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    ref = x.double() @ w.double().T
    y = cpu_kernels.gemm_bf16(x, w)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * K**0.5)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    assert torch.allclose(cpu_kernels.gemm_int8(x, q, scale).double(), ref, rtol=1e-5, atol=1e-6 * K**0.5)
    bias = torch.randn(N, generator=g)
    assert torch.allclose(cpu_kernels.gemm_bf16(x, w, bias).double(), x.double() @ w.double().T + bias.double(),
                          rtol=1e-5, atol=1e-5 * K**0.5)
    # bfloat16 rows in, bfloat16 out: the float32 sums of the same rows, rounded once as PyTorch rounds
    xb = x.bfloat16()
    xb[0, 0] = float("nan")  # NaN propagates to row 0 and rounds to PyTorch's NaN bits
    for y16, y32 in ((cpu_kernels.gemm_bf16(xb, w), cpu_kernels.gemm_bf16(xb.float(), w)),
                     (cpu_kernels.gemm_int8(xb, q, scale), cpu_kernels.gemm_int8(xb.float(), q, scale))):
        assert y16.dtype == torch.bfloat16
        nan = y16.isnan()
        assert nan[0].all() and not nan[1:].any() and torch.equal(nan, y32.isnan())
        assert torch.equal(y16[1:].view(torch.int16), y32[1:].bfloat16().view(torch.int16))


def test_linear_many_rows_and_dtype():
    """Prefill-sized inputs go through the blocked products, a few rows through the streaming ones;
    the output keeps x's dtype, and both agree."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 256, generator=g).bfloat16()
    x = torch.randn(2, 40, 256, generator=g).bfloat16()
    y = cpu_kernels.linear(x, w)
    ref = (x.double() @ w.double().T)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40, 5000)
    assert (y.double() - ref).abs().max() <= 0.01 * ref.abs().max()
    few = cpu_kernels.linear(x[:, :1], w)  # 2 rows: the streaming kernel
    assert (few.double() - y[:, :1].double()).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [3, 40])  # the streaming kernel and the blocked product forward
def test_linear_gradient_is_that_of_the_float64_product(quantized, rows):
    """LoRA training over a frozen bf16 or int8 base: the gradient reaching x is grad @ w (the
    transposed blocked product), as float64 autograd gives it; w gets none."""
    g = torch.Generator().manual_seed(1)
    if quantized:
        w = torch.randint(-127, 128, (2000, 256), generator=g, dtype=torch.int8)
        scale = torch.rand(2000, generator=g) / 100 + 1e-3
        dense = w.double() * scale.double()[:, None]
    else:
        w, scale = torch.randn(2000, 256, generator=g).bfloat16(), None
        dense = w.double()
    x = torch.randn(1, rows, 256, generator=g).requires_grad_()
    up = torch.randn(1, rows, 2000, generator=g)
    (cpu_kernels.linear(x, w, scale) * up).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ((x64 @ dense.T) * up.double()).sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.float32
    assert (x.grad.double() - x64.grad).abs().max() <= 1e-5 * x64.grad.abs().max()
    with torch.no_grad():  # inference takes the plain path: no graph
        assert cpu_kernels.linear(x, w, scale).grad_fn is None


@pytest.mark.parametrize("heads", [(4, 2), (1, 8)])  # (kv heads, query heads per kv head): PaliGemma 2 and 1
def test_attention_kernels_read_cache_views_like_matmul(heads):
    """Scores and weighted values over (B, G, S, D) views of a longer cache buffer, against float64."""
    G, R = heads
    g = torch.Generator().manual_seed(G * R)
    cache_k = torch.randn(3, G, 40, 32, generator=g)
    cache_v = torch.randn(3, G, 40, 32, generator=g)
    k, v = cache_k[:, :, :27], cache_v[:, :, :27]  # the filled part of the buffer: not contiguous
    q = torch.randn(3, G, R, 32, generator=g)
    scores = cpu_kernels.attention_scores(q, k)
    assert torch.allclose(scores.double(), q.double() @ k.double().transpose(-1, -2), rtol=1e-5, atol=1e-5)
    weights = torch.softmax(torch.randn(3, G, R, 27, generator=g), dim=-1)
    out = cpu_kernels.attention_values(weights, v)
    assert torch.allclose(out.double(), weights.double() @ v.double(), rtol=1e-5, atol=1e-6)


def test_patch_embedding_as_one_product_equals_the_convolution():
    """SigLIP's patch embedding (a convolution with stride = kernel size), bf16 weights and pixels,
    through the blocked product: the float64 convolution of the same values, to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 40, kernel_size=14, stride=14).bfloat16()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        conv.bias.copy_(torch.randn(40, generator=g))
    pixels = torch.randn(2, 3, 56, 42, generator=g).bfloat16()
    ref = torch.nn.functional.conv2d(pixels.double(), conv.weight.double(), conv.bias.double(), stride=14)
    y = cpu_kernels.KernelPatchEmbedding(conv)(pixels)
    assert y.shape == ref.shape == (2, 40, 4, 3) and y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


def int4_weights(N: int, K: int, group: int, g: torch.Generator):
    """Random nibbles (N, K) in 0..15, a scale and a bias per group, and the float64 weights they make."""
    q = torch.randint(0, 16, (N, K), generator=g)
    scale = torch.rand(N, K // group, generator=g) / 50 + 1e-3
    qbias = torch.randn(N, K // group, generator=g) / 10
    dense = (q.double().reshape(N, K // group, group) * scale.double()[..., None] + qbias.double()[..., None]).reshape(N, K)
    return cpu_kernels.pack_int4(q), scale, qbias, dense, q


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    packed = cpu_kernels.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert int(packed[2, 3]) == int(q[2, 6]) + 16 * int(q[2, 7])  # input 2j low, 2j + 1 high
    assert torch.equal(cpu_kernels.unpack_int4(packed).long(), q)


# every row count (groups of four rows and each remainder), every group size the backend allows
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_streaming_kernel_matches_float64(rows, group):
    g = torch.Generator().manual_seed(rows * group)
    w, scale, qbias, dense, _ = int4_weights(37, 512, group, g)
    x = torch.randn(rows, 512, generator=g)
    ref = x.double() @ dense.T
    y = cpu_kernels.gemv_int4(x, w, scale, qbias, group)
    assert y.shape == (rows, 37) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


# rows: tiles of four and remainders; weight rows: panels of 24, thirds of 8 and single rows; columns: a last
# 192-wide block that is short (320 = 192 + 128), and groups that straddle the 192-wide blocks (128, 256)
@pytest.mark.parametrize("M, N, K, group", [(9, 16, 64, 32), (13, 45, 320, 64), (262, 2 * 24 + 8 + 3, 768, 128),
                                            (20, 24, 2304, 256)])
def test_int4_many_row_products_match_float64(M, N, K, group):
    g = torch.Generator().manual_seed(M * N + K)
    w, scale, qbias, dense, _ = int4_weights(N, K, group, g)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g)
    ref = x.double() @ dense.T + bias.double()
    y = cpu_kernels.gemm_int4(x, w, scale, qbias, group, bias)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    # bfloat16 rows in: the float32 sums of the same rows, rounded once
    xb = x.bfloat16()
    assert torch.equal(cpu_kernels.gemm_int4(xb, w, scale, qbias, group, bias).view(torch.int16),
                       cpu_kernels.gemm_int4(xb.float(), w, scale, qbias, group, bias).bfloat16().view(torch.int16))
    # the layer: a few rows stream, many go through the blocked product; both agree with float64
    layer = cpu_kernels.KernelLinear.int4(cpu_kernels.unpack_int4(w), scale, qbias)
    assert layer.group == group and layer.weight.shape == (N, K // 2) and layer.scale.shape == (N, K // group)
    for rows in (min(M, 3), M):
        out = layer(x[None, :rows])
        assert torch.allclose(out[0].double(), (x[:rows].double() @ dense.T), rtol=1e-5, atol=1e-5 * ref.abs().max())


# the transposed product (g @ W, the backward of a layer): gradient rows in tiles of six and remainders;
# stored rows (the reduction) in 192-row blocks and a short last one; stored columns (the outputs) in
# panels of 24, thirds of 8 and single columns
@pytest.mark.parametrize("M, N, K, group", [(1, 5, 8, 8), (13, 300, 45 * 8, 40), (262, 2 * 192 + 13, 2 * 24 + 8 + 8, 16),
                                            (7, 40, 2304, 256)])
def test_transposed_products_match_float64(M, N, K, group):
    g = torch.Generator().manual_seed(M + N + K)
    grad = torch.randn(M, N, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100 + 1e-3
    w4, scale4, qbias4, dense4, _ = int4_weights(N, K, group, g)
    cases = [((w,), w.double()), ((q, scale), q.double() * scale.double()[:, None]),
             ((w4, scale4, qbias4, group), dense4)]
    for args, dense in cases:
        ref = grad.double() @ dense
        y = cpu_kernels.gemm_t(grad, *args)
        assert y.shape == (M, K) and y.dtype == torch.float32
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max()), args[0].dtype
        # bfloat16 rows in: the float32 sums of the same rows, rounded once
        gb = grad.bfloat16()
        assert torch.equal(cpu_kernels.gemm_t(gb, *args).view(torch.int16),
                           cpu_kernels.gemm_t(gb.float(), *args).bfloat16().view(torch.int16))


@pytest.mark.parametrize("rows", [3, 40])
def test_int4_linear_gradient_is_that_of_the_float64_product(rows):
    """QLoRA over a 4-bit base: the gradient reaching x is grad @ w, w widened panel by panel."""
    g = torch.Generator().manual_seed(2)
    w, scale, qbias, dense, _ = int4_weights(2000, 256, 64, g)
    x = torch.randn(1, rows, 256, generator=g).requires_grad_()
    up = torch.randn(1, rows, 2000, generator=g)
    (cpu_kernels.linear(x, w, scale, None, qbias, 64) * up).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ((x64 @ dense.T) * up.double()).sum().backward()
    assert (x.grad.double() - x64.grad).abs().max() <= 1e-5 * x64.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_and_gelu_product_match_float64(dtype):
    """The one-pass RMSNorm, GELU-gated product and GELU: within one rounding of the float64 result (bf16: the
    intermediate gelu rounded as PyTorch's two steps round it), and at least as close as PyTorch's ops."""
    import torch.nn.functional as F

    from mlx_paligemma.torch_backend.gemma import RMSNorm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 2304 + 5, generator=g) * 4).to(dtype)  # a row length that is not a multiple of 8
    norm = RMSNorm(x.shape[1])
    norm.weight.data = (torch.randn(x.shape[1], generator=g) / 5).to(dtype)
    norm.weight.requires_grad_(False)
    scale = 1.0 + norm.weight.float()
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * scale.double()
    out = cpu_kernels.rms_norm(x, scale, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20  # a few roundings of float32
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + 1e-30).all()
    assert (out.double() - ref).abs().max() <= (norm(x).double() - ref).abs().max() * 1.25  # float32: a few ulps either way

    gate = (torch.randn(29, 1000 + 3, generator=g) * 3).to(dtype)
    gate[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-3])  # both tails of the exp and zero
    up = torch.randn(gate.shape, generator=g).to(dtype)
    gelu64 = F.gelu(gate.double(), approximate="tanh")
    if dtype == torch.bfloat16:
        gelu64 = gelu64.bfloat16().double()
    ref = gelu64 * up.double()
    out = cpu_kernels.gelu_mul(gate, up)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err, torch_err = (out.double() - ref).abs(), ((F.gelu(gate, approximate="tanh") * up).double() - ref).abs()
    assert (err <= 2 * ulp * ref.abs() + 1e-30).float().mean() >= 0.97  # bf16: a few gelu roundings differ by one step
    assert err.max() <= max(torch_err.max(), 4 * ulp * ref.abs().max())

    # gelu alone (SigLIP's MLP): one rounding of the float64 gelu, as PyTorch's gelu rounds
    ref = F.gelu(gate.double(), approximate="tanh")
    out = cpu_kernels.gelu(gate)
    assert out.dtype == dtype and out.shape == gate.shape and torch.isfinite(out).all()
    err, torch_err = (out.double() - ref).abs(), (F.gelu(gate, approximate="tanh").double() - ref).abs()
    within = lambda e: (e <= ulp * ref.abs() + 1e-30).float().mean()  # noqa: E731
    assert within(err) >= max(0.95, within(torch_err))  # as many elements within a rounding as PyTorch's gelu, or more
    assert err.max() <= max(torch_err.max(), 2 * ulp * ref.abs().max())


def test_few_token_attention_under_autograd_keeps_its_gradient(checkpoints):
    """On our kernels' path attention runs in float32; the fused decode products have no derivative,
    so a forward of a few tokens that needs gradients (training) must not take them."""
    from mlx_paligemma.config import PaliGemmaConfig
    from mlx_paligemma.torch_backend.gemma import GemmaModel

    config = PaliGemmaConfig.from_file(checkpoints["pg2"].folder / "config.json").text  # as transformers wrote it
    torch.manual_seed(0)
    text = GemmaModel(config)
    attn = text.layers[0].self_attn
    x = torch.randn(1, 2, config.hidden_size)  # 2 tokens x 2 query heads per kv head: within the fused products' reach
    assert attn.n_heads // attn.n_kv_heads * x.shape[1] <= 8
    tables = text.rope_tables(1, x.shape[1], x.device, x.dtype)
    grads = []
    for kernels in (False, True):
        attn.kernels = kernels
        xi = x.clone().requires_grad_()
        attn(xi, None, None, 0, tables).square().sum().backward()
        grads.append(xi.grad)
    assert grads[1].abs().sum() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_softcap_softmax_matches_float64():
    """Gemma 2's attention weights in one kernel (scale, softcap, mask, softmax, in place): as close to
    the float64 weights as PyTorch's steps are; left-out keys get exactly 0; a row with no key left
    gets uniform weights, as PyTorch's masked_fill and softmax give it."""
    from mlx_paligemma.torch_backend.gemma import softcap

    g = torch.Generator().manual_seed(5)
    B, X, L, S = 2, 3 * 37, 37, 45  # 3 heads' rows per batch row; rows not a multiple of 8 long
    scores = torch.randn(B, X, S, generator=g) * 30
    scores[0, 0, :4] = torch.tensor([0.0, 1e-4, -300.0, 300.0])  # tanh near 0 and saturated
    mask = torch.rand(B, L, S, generator=g) > 0.3
    mask[1, 5] = False
    scale, cap = 256**-0.5, 50.0
    keep = mask.repeat(1, X // L, 1)
    lowest = torch.finfo(torch.float32).min
    ref = torch.softmax((torch.tanh(scores.double() * scale / cap) * cap).masked_fill(~keep, lowest), -1)
    theirs = softcap(scores * scale, cap).masked_fill(~keep, lowest).softmax(-1)
    for m, expected, steps in ((mask, ref, theirs), (None, torch.softmax(torch.tanh(scores.double() * scale / cap) * cap, -1),
                                                      softcap(scores * scale, cap).softmax(-1))):
        original = scores.clone()
        out = cpu_kernels.softcap_softmax_(original, L, scale, cap, None if m is None else m[:, None])  # (B, 1, L, S)
        assert out.data_ptr() == original.data_ptr()  # in place
        err = (out.double() - expected).abs().max()
        assert err <= max(2 * (steps.double() - expected).abs().max(), 1e-6)
    out = cpu_kernels.softcap_softmax_(scores.clone(), L, scale, cap, mask[:, None])
    assert torch.equal(out[~keep & (keep.sum(-1, keepdim=True) > 0)], torch.zeros_like(out[~keep & (keep.sum(-1, keepdim=True) > 0)]))
    assert torch.allclose(out[1, 5::L], torch.full((X // L, S), 1.0 / S))  # no key left: uniform, as in PyTorch
    assert torch.allclose(theirs[1, 5::L], torch.full((X // L, S), 1.0 / S))
    # the mask is read in place: a strided slice (the last position's row, as the last layer of a prefill
    # takes it) gives what its contiguous copy gives
    last = mask[:, None, -1:]
    assert not last.is_contiguous()
    rows = scores[:, L - 1::L].contiguous()  # every head's last-position row
    assert torch.equal(cpu_kernels.softcap_softmax_(rows.clone(), 1, scale, cap, last),
                       cpu_kernels.softcap_softmax_(rows.clone(), 1, scale, cap, last.contiguous()))
