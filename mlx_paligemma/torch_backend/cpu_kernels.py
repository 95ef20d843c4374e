"""Matrix-vector kernels for decoding on x86 CPUs without native bfloat16 (AVX2 + FMA).

Decoding multiplies a few activation rows by every weight matrix once per token, so its speed is
the rate at which weights stream from memory. On CPUs without AVX512-BF16/AMX, PyTorch's
bfloat16 and weight-only int8 kernels reach about half the measured read bandwidth there; these
reach most of it by widening each weight to float32 in registers, next to the multiply.

`y[m, n] = sum_k x[m, k] * W[n, k]` (times scale[n] for int8), float32 accumulation, for up to
MAX_ROWS rows of x at once (a batch reads each weight once). Built on first use with the
system's C++ compiler through torch.utils.cpp_extension and cached; where that is not possible
`available()` is False and the caller keeps PyTorch's own kernels.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 8
CHUNK_BYTES = 64 * 1024 * 1024  # float32 weight rows widened at a time for many-row (prefill) products

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

static inline __m256 widen_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 widen_i8(const int8_t* p) {
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// One output row n for M activation rows, accumulators kept in registers (M is a constant).
// ACC independent accumulators per row hide the FMA latency when M is small.
template <int M, typename T, __m256 (*widen)(const T*)>
static inline void dot_rows(const T* row, const float* xp, int64_t K, float s, float* yp, int64_t N, int64_t n) {
    constexpr int ACC = M == 1 ? 4 : (M <= 4 ? 2 : 1);
    __m256 acc[M][ACC];
    for (int m = 0; m < M; ++m)
        for (int a = 0; a < ACC; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * ACC <= K; k += 8 * ACC) {
        for (int a = 0; a < ACC; ++a) {
            __m256 wv = widen(row + k + 8 * a);
            for (int m = 0; m < M; ++m)
                acc[m][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + m * K + k + 8 * a), acc[m][a]);
        }
    }
    for (int m = 0; m < M; ++m) {
        __m256 t = acc[m][0];
        for (int a = 1; a < ACC; ++a) t = _mm256_add_ps(t, acc[m][a]);
        float total = hsum(t);
        for (int64_t j = k; j < K; ++j) {
            float wv;
            if constexpr (sizeof(T) == 2) { uint32_t bits = uint32_t(row[j]) << 16; std::memcpy(&wv, &bits, 4); }
            else { wv = float(row[j]); }
            total += wv * xp[m * K + j];
        }
        yp[m * N + n] = total * s;
    }
}

template <int M, typename T, __m256 (*widen)(const T*)>
static void gemv_m(const float* xp, const T* w, const float* scale, float* yp, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        dot_rows<M, T, widen>(w + n * K, xp, K, scale ? scale[n] : 1.0f, yp, N, n);
}

// x: (M, K) float32, w: (N, K) bf16 bits or int8, scale: (N,) float32 or null -> (M, N) float32
template <typename T, __m256 (*widen)(const T*)>
static torch::Tensor gemv(torch::Tensor x, const T* w, const float* scale, int64_t N, int64_t K) {
    const int64_t M = x.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (M) {
        case 1: gemv_m<1, T, widen>(xp, w, scale, yp, N, K); break;
        case 2: gemv_m<2, T, widen>(xp, w, scale, yp, N, K); break;
        case 3: gemv_m<3, T, widen>(xp, w, scale, yp, N, K); break;
        case 4: gemv_m<4, T, widen>(xp, w, scale, yp, N, K); break;
        case 5: gemv_m<5, T, widen>(xp, w, scale, yp, N, K); break;
        case 6: gemv_m<6, T, widen>(xp, w, scale, yp, N, K); break;
        case 7: gemv_m<7, T, widen>(xp, w, scale, yp, N, K); break;
        default: gemv_m<8, T, widen>(xp, w, scale, yp, N, K); break;
    }
    return y;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) <= 8 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1));
    return gemv<uint16_t, widen_bf16>(x, (const uint16_t*)w.data_ptr(), nullptr, w.size(0), w.size(1));
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) <= 8 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous() && w.size(1) == x.size(1));
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == w.size(0) && scale.is_contiguous());
    return gemv<int8_t, widen_i8>(x, w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0), w.size(1));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv_bf16", &gemv_bf16);
    m.def("gemv_int8", &gemv_int8);
}
"""

_module = None
_tried = False


def _load():
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("MLX_PALIGEMMA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name="paligemma_cpu_kernels_v7", cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: PyTorch's kernels stay in use
        warnings.warn(f"CPU decode kernels not built ({type(e).__name__}); using PyTorch's matmul", stacklevel=3)
        _module = None
    return _module


def available() -> bool:
    """Whether this CPU has AVX2/FMA and the kernels could be built."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and _load() is not None


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M <= MAX_ROWS, K) float32 @ (N, K) bfloat16 weights -> (M, N) float32."""
    return _load().gemv_bf16(x, w)


def gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M <= MAX_ROWS, K) float32 @ (N, K) int8 weights * scale[n] -> (M, N) float32."""
    return _load().gemv_int8(x, w, scale)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (w bfloat16, or int8 with a float32 scale per output row), result in x's dtype.

    A few rows (decoding): the streaming kernels. Many rows (prefill, vision): float32 products of
    weights widened a chunk at a time, several times faster than bfloat16 products on CPUs that
    emulate bfloat16, and never a float32 copy of a whole matrix.
    """
    K = w.shape[1]
    flat = x.reshape(-1, K).float().contiguous()
    if flat.shape[0] <= MAX_ROWS:
        y = gemv_int8(flat, w, scale) if scale is not None else gemv_bf16(flat, w)
    else:
        rows = max(1, CHUNK_BYTES // (4 * K))
        parts = []
        for i in range(0, w.shape[0], rows):
            chunk = w[i : i + rows].float()
            if scale is not None:
                chunk *= scale[i : i + rows, None]
            parts.append(F.linear(flat, chunk))
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


class KernelLinear(nn.Module):
    """A bias-optional nn.Linear on bfloat16 weights that multiplies with `linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_kernels(model: nn.Module) -> None:
    """Swap every bfloat16 nn.Linear for a KernelLinear and give the tied embedding the kernel head."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, KernelLinear(module.weight.data, module.bias))
    embed = model.text.embed_tokens
    if isinstance(embed, nn.Embedding) and embed.weight.dtype == torch.bfloat16:
        embed.as_linear = lambda h, w=embed.weight: linear(h, w)
