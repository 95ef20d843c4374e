"""Matrix-vector kernels for decoding on x86 CPUs without native bfloat16 (AVX2 + FMA).

Decoding multiplies a few activation rows by every weight matrix once per token, so its speed is
the rate at which weights stream from memory. On CPUs without AVX512-BF16/AMX, PyTorch's
bfloat16 and weight-only int8 kernels reach about half the measured read bandwidth there; these
reach most of it by widening each weight to float32 in registers, next to the multiply.

`y[m, n] = sum_k x[m, k] * W[n, k]` (times scale[n] for int8), float32 accumulation, for up to
MAX_ROWS rows of x at once (a batch reads each weight once). Built on first use with the
system's C++ compiler through torch.utils.cpp_extension and cached; where that is not possible
`build()` is None and the backend keeps PyTorch's own kernels. This module imports nothing of the
package: the backend decides where the kernels run and puts their layers in the model.
"""

from __future__ import annotations

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
#include <algorithm>
#include <cstring>

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

static inline float tail_dot(const uint16_t* row, const float* x, int64_t k, int64_t K) {
    float total = 0.f;
    for (; k < K; ++k) { uint32_t bits = uint32_t(row[k]) << 16; float wv; std::memcpy(&wv, &bits, 4); total += wv * x[k]; }
    return total;
}

static inline float tail_dot(const int8_t* row, const float* x, int64_t k, int64_t K) {
    float total = 0.f;
    for (; k < K; ++k) total += float(row[k]) * x[k];
    return total;
}

// One activation row against one weight row: four accumulators hide the FMA latency, and the
// loop is bound by the weights streaming from memory.
template <typename T, __m256 (*widen)(const T*)>
static inline float dot1(const T* row, const float* x, int64_t K) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
        for (int a = 0; a < 4; ++a)
            acc[a] = _mm256_fmadd_ps(widen(row + k + 8 * a), _mm256_loadu_ps(x + k + 8 * a), acc[a]);
    for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(widen(row + k), _mm256_loadu_ps(x + k), acc[0]);
    __m256 t = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    return hsum(t) + tail_dot(row, x, k, K);
}

// A register tile: NR weight rows (from n) against MR activation rows (from m0), NR * MR
// accumulators. Each widened weight vector serves MR rows and each activation load serves NR
// weight rows, so a batch is bound by the multiplies rather than by loads.
template <int MR, int NR, typename T, __m256 (*widen)(const T*)>
static inline void tile(const T* w, const float* x, const float* scale, float* y, int64_t N, int64_t K, int64_t n, int64_t m0) {
    __m256 acc[NR][MR];
    for (int i = 0; i < NR; ++i)
        for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NR];
        for (int i = 0; i < NR; ++i) wv[i] = widen(w + (n + i) * K + k);
        for (int j = 0; j < MR; ++j) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + j) * K + k);
            for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int j = 0; j < MR; ++j) {
            float total = hsum(acc[i][j]) + tail_dot(w + (n + i) * K, x + (m0 + j) * K, k, K);
            y[(m0 + j) * N + n + i] = total * (scale ? scale[n + i] : 1.0f);
        }
}

// Every activation row (in groups of up to four) against weight rows n..n+NR: the weight rows are
// read from memory once and stay in cache for the groups after the first.
template <int NR, typename T, __m256 (*widen)(const T*)>
static inline void all_rows(const T* w, const float* x, const float* scale, float* y, int64_t M, int64_t N, int64_t K, int64_t n) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile<4, NR, T, widen>(w, x, scale, y, N, K, n, m0);
    switch (M - m0) {
        case 3: tile<3, NR, T, widen>(w, x, scale, y, N, K, n, m0); break;
        case 2: tile<2, NR, T, widen>(w, x, scale, y, N, K, n, m0); break;
        case 1: tile<1, NR, T, widen>(w, x, scale, y, N, K, n, m0); break;
        default: break;
    }
}

// x: (M, K) float32, w: (N, K) bf16 bits or int8, scale: (N,) float32 or null -> (M, N) float32.
// The threads share the weight rows out in tiles of NR (then the last few rows one at a time).
template <typename T, __m256 (*widen)(const T*)>
static torch::Tensor gemv(torch::Tensor x, const T* w, const float* scale, int64_t N, int64_t K) {
    const int64_t M = x.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (M == 1) {
        #pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; ++n) yp[n] = dot1<T, widen>(w + n * K, xp, K) * (scale ? scale[n] : 1.0f);
        return y;
    }
    constexpr int64_t NR = 3;
    const int64_t tiles = N / NR;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) all_rows<NR, T, widen>(w, xp, scale, yp, M, N, K, t * NR);
    for (int64_t n = tiles * NR; n < N; ++n) all_rows<1, T, widen>(w, xp, scale, yp, M, N, K, n);
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

// Decode attention over a float32 KV cache, the two products that read it. The keys and values
// are (B, G, S, D) views of the cache (rows of D contiguous, any strides above); each (b, g) pair
// is one task, and its R query rows (the heads that share kv head g) go through each cache row
// while it is in cache, so the cache is read from memory once.

// q: (B, G, R, D) float32 contiguous -> scores (B, G, R, S) = q . keys
torch::Tensor attention_scores(torch::Tensor q, torch::Tensor keys) {
    TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat && q.is_contiguous());
    TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == torch::kFloat && keys.stride(3) == 1);
    const int64_t B = q.size(0), G = q.size(1), R = q.size(2), D = q.size(3), S = keys.size(2);
    TORCH_CHECK(keys.size(0) == B && keys.size(1) == G && keys.size(3) == D && D % 8 == 0);
    auto y = torch::empty({B, G, R, S}, q.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = keys.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t sb = keys.stride(0), sg = keys.stride(1), ss = keys.stride(2);
    #pragma omp parallel for schedule(static)
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        const float* qs = qp + bg * R * D;
        float* out = yp + bg * R * S;
        for (int64_t s = 0; s < S; ++s) {
            const float* krow = kp + b * sb + g * sg + s * ss;
            for (int64_t r = 0; r < R; ++r) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int64_t d = 0;
                for (; d + 16 <= D; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qs + r * D + d), _mm256_loadu_ps(krow + d), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qs + r * D + d + 8), _mm256_loadu_ps(krow + d + 8), a1);
                }
                for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qs + r * D + d), _mm256_loadu_ps(krow + d), a0);
                out[r * S + s] = hsum(_mm256_add_ps(a0, a1));
            }
        }
    }
    return y;
}

// weights: (B, G, R, S) float32 contiguous -> (B, G, R, D) = weights @ values
torch::Tensor attention_values(torch::Tensor weights, torch::Tensor values) {
    TORCH_CHECK(weights.dim() == 4 && weights.scalar_type() == torch::kFloat && weights.is_contiguous());
    TORCH_CHECK(values.dim() == 4 && values.scalar_type() == torch::kFloat && values.stride(3) == 1);
    const int64_t B = weights.size(0), G = weights.size(1), R = weights.size(2), S = weights.size(3), D = values.size(3);
    TORCH_CHECK(values.size(0) == B && values.size(1) == G && values.size(2) == S && D % 8 == 0);
    auto y = torch::empty({B, G, R, D}, weights.options());
    const float* wp = weights.data_ptr<float>();
    const float* vp = values.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t sb = values.stride(0), sg = values.stride(1), ss = values.stride(2);
    #pragma omp parallel for schedule(static)
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        const float* ws = wp + bg * R * S;
        float* out = yp + bg * R * D;
        for (int64_t i = 0; i < R * D; ++i) out[i] = 0.f;
        for (int64_t s = 0; s < S; ++s) {
            const float* vrow = vp + b * sb + g * sg + s * ss;
            for (int64_t r = 0; r < R; ++r) {
                const __m256 p = _mm256_set1_ps(ws[r * S + s]);
                float* o = out + r * D;
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vrow + d), _mm256_loadu_ps(o + d)));
            }
        }
    }
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv_bf16", &gemv_bf16);
    m.def("gemv_int8", &gemv_int8);
    m.def("attention_scores", &attention_scores);
    m.def("attention_values", &attention_values);
}
"""

_module = None
_tried = False


def build():
    """The compiled kernels (built on first use, then cached by torch), or None where they cannot be built.

    Whether this CPU should use them (x86 with AVX2 and FMA) is the backend's decision, not this module's.
    """
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name="paligemma_cpu_kernels_v9", cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: PyTorch's kernels stay in use
        warnings.warn(f"CPU decode kernels not built ({type(e).__name__}); using PyTorch's matmul", stacklevel=3)
        _module = None
    return _module


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M <= MAX_ROWS, K) float32 @ (N, K) bfloat16 weights -> (M, N) float32."""
    return build().gemv_bf16(x, w)


def gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M <= MAX_ROWS, K) float32 @ (N, K) int8 weights * scale[n] -> (M, N) float32."""
    return build().gemv_int8(x, w, scale)


def attention_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, G, R, D) float32 queries . (B, G, S, D) float32 keys (a view of the cache) -> (B, G, R, S)."""
    return build().attention_scores(q.contiguous(), keys)


def attention_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, G, R, S) float32 weights @ (B, G, S, D) float32 values (a view of the cache) -> (B, G, R, D)."""
    return build().attention_values(weights.contiguous(), values)


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
    """A linear layer that multiplies with `linear`: bfloat16 weights (and an optional bias), or int8
    weights with a float32 scale per output row. The backend puts it in place of nn.Linear and of
    int8 QuantizedLinear layers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        if scale is None:
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        else:
            self.register_buffer("weight", weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale", None if scale is None else scale.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias


class KernelEmbedding(nn.Module):
    """The tied embedding whose output-head product is `linear`: bfloat16 rows, or int8 rows with a
    scale each (`scales` in the compute dtype for looking rows up, a float32 copy for the head)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None = None):
        super().__init__()
        if scales is None:
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        else:
            self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("head_scales", None if scales is None else scales.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]
        return rows if self.scales is None else rows.to(self.scales.dtype) * self.scales[ids, None]

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.head_scales)
