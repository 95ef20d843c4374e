"""Kernels for x86 CPUs without native bfloat16 (AVX2 + FMA): decoding's matrix-vector products and
prefill's (and the vision tower's) matrix products, on bf16 or int8 weights as they are stored.

Decoding multiplies a few activation rows by every weight matrix once per token, so its speed is
the rate at which weights stream from memory. On CPUs without AVX512-BF16/AMX, PyTorch's
bfloat16 and weight-only int8 kernels reach about half the measured read bandwidth there; these
reach most of it by widening each weight to float32 in registers, next to the multiply.
`y[m, n] = sum_k x[m, k] * W[n, k]` (times scale[n] for int8), float32 accumulation, for up to
MAX_ROWS rows of x at once (a batch reads each weight once).

Prefill and the vision tower multiply hundreds of rows, bound by the multiplies: a blocked float32
product (4 x 24 register tiles, BLIS's scheme) that widens each weight panel (24 rows x 192
columns, 18 KB, in L1) while packing it, a step every such product has anyway. So the weights are
read once in their stored width, no float32 copy of a matrix is ever made, and the products run at
float32 matrix-multiply speed (on AMD Zen 3, as fast as PyTorch's MKL sgemm on float32 weights).

Built on first use with the system's C++ compiler through torch.utils.cpp_extension and cached;
where that is not possible `build()` is None and the backend keeps PyTorch's own kernels. This
module imports nothing of the package: the backend decides where the kernels run and puts their
layers in the model.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <vector>

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

// int4 weights, two a byte (low nibble first), w = q * scale + bias per group of `group` inputs of a
// row: the rows of x go MB at a time through each weight row, its nibbles widened once per MB rows.
// Within a group the products sum in vectors, then take the group's scale; the bias term is
// bias . (the sums of x over each group), those sums computed once a call.
template <int MB>
static inline void rows_i4(const uint8_t* wrow, const float* sc, const float* bi, const float* x, const float* xsum,
                           float* y, int64_t K, int64_t G, int64_t group, int64_t N, int64_t n) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 acc[MB];
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(wrow + k / 2));
            const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            const __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);  // inputs k .. k+15, k+16 .. k+31
            __m256 w[4];
            w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v0));
            w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v0, 8)));
            w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v1));
            w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v1, 8)));
            for (int m = 0; m < MB; ++m)
                for (int a = 0; a < 4; ++a) acc[m] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(x + m * K + k + 8 * a), acc[m]);
        }
        const __m256 s = _mm256_set1_ps(sc[g]);
        for (int m = 0; m < MB; ++m) total[m] = _mm256_fmadd_ps(acc[m], s, total[m]);
    }
    for (int m = 0; m < MB; ++m) {
        float out = hsum(total[m]);
        for (int64_t g = 0; g < G; ++g) out += bi[g] * xsum[m * G + g];
        y[m * N + n] = out;
    }
}

// x: (M <= 8, K) float32, w: (N, K / 2) uint8, scale and bias: (N, K / group) float32 -> (M, N) float32
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor bias, int64_t group) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) <= 8 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "int4: the group size must be a multiple of 32 dividing K");
    const int64_t G = K / group;
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous() && w.size(1) * 2 == K);
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == N * G);
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == N * G);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    std::vector<float> xsum(M * G, 0.f);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group] += xp[m * K + k];
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const float *sp = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
    const float* xs = xsum.data();
    float* yp = y.data_ptr<float>();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wrow = wp + n * (K / 2);
        const float *sc = sp + n * G, *bi = bp + n * G;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) rows_i4<4>(wrow, sc, bi, xp + m0 * K, xs + m0 * G, yp + m0 * N, K, G, group, N, n);
        switch (M - m0) {
            case 3: rows_i4<3>(wrow, sc, bi, xp + m0 * K, xs + m0 * G, yp + m0 * N, K, G, group, N, n); break;
            case 2: rows_i4<2>(wrow, sc, bi, xp + m0 * K, xs + m0 * G, yp + m0 * N, K, G, group, N, n); break;
            case 1: rows_i4<1>(wrow, sc, bi, xp + m0 * K, xs + m0 * G, yp + m0 * N, K, G, group, N, n); break;
            default: break;
        }
    }
    return y;
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

// ---- many-row products (prefill, vision): a blocked float32 GEMM whose weight panels are widened
// from bf16 (or int8 times the row's scale) while they are packed, so weights are read once in their
// stored width and never exist in float32 outside an 18 KB panel per thread.
// y (M, N) = x (M, K) @ W (N, K)^T. Micro-tile: MR activation rows x NR weight rows (12 accumulators).
// 4 x 24 rather than 6 x 16: four broadcasts and three loads for twelve FMAs instead of six and two; on
// Zen 3 the blocked products ran ~4% faster (time of the 3B-224 and SigLIP shapes, median of 12
// alternating rounds; KC 192 keeps the panel in the 32 KB L1 beside the rows' stream).
constexpr int MR = 4, NR = 24, KC = 192, PANELS_PER_TASK = 3;

// 8 rows of 8 16-bit values -> 8 columns (out[k] holds the 8 rows' element k)
static inline void transpose8x16(__m128i r[8]) {
    __m128i t0 = _mm_unpacklo_epi16(r[0], r[1]), t1 = _mm_unpackhi_epi16(r[0], r[1]);
    __m128i t2 = _mm_unpacklo_epi16(r[2], r[3]), t3 = _mm_unpackhi_epi16(r[2], r[3]);
    __m128i t4 = _mm_unpacklo_epi16(r[4], r[5]), t5 = _mm_unpackhi_epi16(r[4], r[5]);
    __m128i t6 = _mm_unpacklo_epi16(r[6], r[7]), t7 = _mm_unpackhi_epi16(r[6], r[7]);
    __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    r[0] = _mm_unpacklo_epi64(u0, u4); r[1] = _mm_unpackhi_epi64(u0, u4);
    r[2] = _mm_unpacklo_epi64(u1, u5); r[3] = _mm_unpackhi_epi64(u1, u5);
    r[4] = _mm_unpacklo_epi64(u2, u6); r[5] = _mm_unpackhi_epi64(u2, u6);
    r[6] = _mm_unpacklo_epi64(u3, u7); r[7] = _mm_unpackhi_epi64(u3, u7);
}

static inline float as_float(float v) { return v; }
static inline float as_float(uint16_t v) { uint32_t b = uint32_t(v) << 16; float f; std::memcpy(&f, &b, 4); return f; }

// The stored weights of one product: bf16 bits, int8 times scale[n], or int4 nibbles (two a byte, low
// nibble first) times scale[n][k / group] plus bias[n][k / group].
struct WRef {
    const void* w;
    const float* scale;
    const float* bias;
    int64_t group, K;
};

// Each layout: load8 (eight inputs from k of row n as 16-bit lanes), params (the scale and bias of rows
// n .. n+7 at input k), widen (lanes -> float32 weights), one (a single weight).
struct BF16 {
    static inline __m128i load8(const WRef& r, int64_t n, int64_t k) { return _mm_loadu_si128((const __m128i*)((const uint16_t*)r.w + n * r.K + k)); }
    static inline void params(const WRef&, int64_t, int64_t, __m256& s, __m256& b) { s = _mm256_set1_ps(1.f); b = _mm256_setzero_ps(); }
    static inline __m256 widen(__m128i v, __m256, __m256) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
    static inline float one(const WRef& r, int64_t n, int64_t k) { return as_float(((const uint16_t*)r.w)[n * r.K + k]); }
    static inline void params_row(const WRef&, int64_t, int64_t, __m256& s, __m256& b) { s = _mm256_set1_ps(1.f); b = _mm256_setzero_ps(); }
};

struct I8 {
    static inline __m128i load8(const WRef& r, int64_t n, int64_t k) { return _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)((const int8_t*)r.w + n * r.K + k))); }
    static inline void params(const WRef& r, int64_t n, int64_t, __m256& s, __m256& b) { s = _mm256_loadu_ps(r.scale + n); b = _mm256_setzero_ps(); }
    static inline __m256 widen(__m128i v, __m256 s, __m256) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)), s); }
    static inline float one(const WRef& r, int64_t n, int64_t k) { return float(((const int8_t*)r.w)[n * r.K + k]) * r.scale[n]; }
    static inline void params_row(const WRef& r, int64_t n, int64_t, __m256& s, __m256& b) { s = _mm256_set1_ps(r.scale[n]); b = _mm256_setzero_ps(); }
};

struct I4 {
    // k even: four bytes hold inputs k .. k+7
    static inline __m128i load8(const WRef& r, int64_t n, int64_t k) {
        uint32_t word;
        std::memcpy(&word, (const uint8_t*)r.w + n * (r.K / 2) + k / 2, 4);
        const __m128i b = _mm_cvtsi32_si128((int)word), low = _mm_set1_epi8(0x0F);
        return _mm_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low)));
    }
    // eight inputs from k share one group: the group size is a multiple of 8 and k of 8
    static inline void params(const WRef& r, int64_t n, int64_t k, __m256& s, __m256& b) {
        const int64_t G = r.K / r.group, g = k / r.group;
        const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)G));
        s = _mm256_i32gather_ps(r.scale + n * G + g, at, 4);
        b = _mm256_i32gather_ps(r.bias + n * G + g, at, 4);
    }
    static inline __m256 widen(__m128i v, __m256 s, __m256 b) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)), s, b); }
    static inline float one(const WRef& r, int64_t n, int64_t k) {
        const uint8_t byte = ((const uint8_t*)r.w)[n * (r.K / 2) + k / 2];
        const int64_t g = n * (r.K / r.group) + k / r.group;
        return float((k & 1) ? byte >> 4 : byte & 0x0F) * r.scale[g] + r.bias[g];
    }
    // the scale and bias of row n at inputs k .. k+7 (one group: k is a multiple of 8, as the group size is)
    static inline void params_row(const WRef& r, int64_t n, int64_t k, __m256& s, __m256& b) {
        const int64_t g = n * (r.K / r.group) + k / r.group;
        s = _mm256_set1_ps(r.scale[g]);
        b = _mm256_set1_ps(r.bias[g]);
    }
};

// weight rows n0 .. n0 + NR (rows past N are zeros), columns k0 .. k0 + kc -> panel[k][j] float32
template <typename L>
static void pack_weights(const WRef& r, int64_t N, int64_t n0, int64_t k0, int64_t kc, float* panel) {
    const int64_t rows = std::min<int64_t>(NR, N - n0);
    if (rows < NR) std::memset(panel, 0, sizeof(float) * NR * kc);
    int64_t j0 = 0;
    for (; j0 + 8 <= rows; j0 += 8) {
        int64_t k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 s, b;
            L::params(r, n0 + j0, k0 + k, s, b);
            __m128i v[8];
            for (int i = 0; i < 8; ++i) v[i] = L::load8(r, n0 + j0 + i, k0 + k);
            transpose8x16(v);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k + i) * NR + j0, L::widen(v[i], s, b));
        }
        for (; k < kc; ++k)
            for (int i = 0; i < 8; ++i) panel[k * NR + j0 + i] = L::one(r, n0 + j0 + i, k0 + k);
    }
    for (; j0 < rows; ++j0)
        for (int64_t k = 0; k < kc; ++k) panel[k * NR + j0] = L::one(r, n0 + j0, k0 + k);
}

// The transposed product (a gradient through the layer, g @ W): the reduction runs over the stored rows
// and the outputs are the stored columns. Stored rows k0 .. k0 + kc, columns n0 .. n0 + NR (past the
// row's length: zeros) -> panel[k][j] float32; each panel row is contiguous in the stored matrix.
template <typename L>
static void pack_weights_t(const WRef& r, int64_t N, int64_t n0, int64_t k0, int64_t kc, float* panel) {
    const int64_t cols = std::min<int64_t>(NR, N - n0);
    for (int64_t k = 0; k < kc; ++k) {
        float* row = panel + k * NR;
        int64_t j = 0;
        for (; j + 8 <= cols; j += 8) {
            __m256 s, b;
            L::params_row(r, k0 + k, n0 + j, s, b);
            _mm256_store_ps(row + j, L::widen(L::load8(r, k0 + k, n0 + j), s, b));
        }
        for (; j < cols; ++j) row[j] = L::one(r, k0 + k, n0 + j);
        for (; j < NR; ++j) row[j] = 0.f;
    }
}

// x rows m0 .. m0 + MR (rows past M are zeros), columns k0 .. k0 + kc -> packed[k][i] float32
template <typename X>
static void pack_rows(const X* x, int64_t M, int64_t K, int64_t m0, int64_t k0, int64_t kc, float* packed) {
    const int64_t rows = std::min<int64_t>(MR, M - m0);
    for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) packed[k * MR + i] = i < rows ? as_float(x[(m0 + i) * K + k0 + k]) : 0.f;
}

// float32 -> bfloat16 bits, rounding to nearest even and NaN to 0x7FC0, as c10::BFloat16 does
static inline void store_bf16(uint16_t* out, const float* in, int64_t n) {
    int64_t j = 0;
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(in + j);
        const __m256i b = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), one), bias));
        r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        // 32 -> 16 bits within each 128-bit lane, then the two lanes' low halves together
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i*)(out + j), _mm256_castsi256_si128(packed));
    }
    for (; j < n; ++j) {
        uint32_t b; std::memcpy(&b, in + j, 4);
        out[j] = in[j] != in[j] ? 0x7FC0 : uint16_t((b + ((b >> 16) & 1) + 0x7FFF) >> 16);
    }
}

// c (rows x cols of a MR x NR tile, leading dimension ldc) = (first ? 0 : c) + xp . wp over kc
static inline void micro(const float* xp, const float* wp, int64_t kc, float* c, int64_t ldc, int rows, int cols, bool first) {
    // twelve named accumulators (an array indexed in loops gets spilled to the stack by GCC)
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    for (int64_t k = 0; k < kc; ++k, xp += MR, wp += NR) {
        const __m256 b0 = _mm256_load_ps(wp), b1 = _mm256_load_ps(wp + 8), b2 = _mm256_load_ps(wp + 16);
        __m256 a = _mm256_broadcast_ss(xp);
        c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01); c02 = _mm256_fmadd_ps(a, b2, c02);
        a = _mm256_broadcast_ss(xp + 1);
        c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11); c12 = _mm256_fmadd_ps(a, b2, c12);
        a = _mm256_broadcast_ss(xp + 2);
        c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21); c22 = _mm256_fmadd_ps(a, b2, c22);
        a = _mm256_broadcast_ss(xp + 3);
        c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31); c32 = _mm256_fmadd_ps(a, b2, c32);
    }
    const __m256 acc[MR][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
    // through a tile in memory: indexing the accumulators by a run-time row count would keep them
    // on the stack in the loop above
    alignas(32) float tile[MR][NR];
    for (int i = 0; i < MR; ++i) for (int j = 0; j < 3; ++j) _mm256_store_ps(tile[i] + 8 * j, acc[i][j]);
    for (int i = 0; i < rows; ++i) {
        float* ci = c + i * ldc;
        if (cols == NR) {
            for (int j = 0; j < NR; j += 8) {
                const __m256 t = _mm256_load_ps(tile[i] + j);
                _mm256_storeu_ps(ci + j, first ? t : _mm256_add_ps(t, _mm256_loadu_ps(ci + j)));
            }
        } else {
            for (int j = 0; j < cols; ++j) ci[j] = first ? tile[i][j] : ci[j] + tile[i][j];
        }
    }
}

// x (M, K) float32 or bf16 bits -> y (M, N) float32, or bf16 (rounded once, from the float32 sums);
// bias (N,) float32 or null, added to the float32 sums. T: the transposed product, y = x @ W with
// W stored (K, N), through pack_weights_t.
template <typename L, typename X, bool T = false>
static void gemm(const X* xp, const WRef& wr, const float* bias, int64_t M, int64_t N, int64_t K, float* yp, uint16_t* out16) {
    const int64_t MP = (M + MR - 1) / MR, KB = (K + KC - 1) / KC, NP = (N + NR - 1) / NR;
    const int64_t tasks = (NP + PANELS_PER_TASK - 1) / PANELS_PER_TASK;
    // x packed once, block (kb, mp) at (kb * MP + mp) * KC * MR
    float* xpack = (float*)std::aligned_alloc(64, sizeof(float) * KB * MP * KC * MR);
    #pragma omp parallel
    {
        #pragma omp for schedule(static) collapse(2)
        for (int64_t kb = 0; kb < KB; ++kb)
            for (int64_t mp = 0; mp < MP; ++mp)
                pack_rows(xp, M, K, mp * MR, kb * KC, std::min<int64_t>(KC, K - kb * KC), xpack + (kb * MP + mp) * KC * MR);
        alignas(64) float panel[KC * NR];
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t p_end = std::min(NP, (t + 1) * PANELS_PER_TASK);
            for (int64_t kb = 0; kb < KB; ++kb) {
                const int64_t k0 = kb * KC, kc = std::min<int64_t>(KC, K - k0);
                for (int64_t p = t * PANELS_PER_TASK; p < p_end; ++p) {
                    const int64_t n0 = p * NR;
                    const int cols = (int)std::min<int64_t>(NR, N - n0);
                    if constexpr (T) pack_weights_t<L>(wr, N, n0, k0, kc, panel);
                    else pack_weights<L>(wr, N, n0, k0, kc, panel);
                    for (int64_t mp = 0; mp < MP; ++mp) {
                        const int rows = (int)std::min<int64_t>(MR, M - mp * MR);
                        micro(xpack + (kb * MP + mp) * KC * MR, panel, kc, yp + mp * MR * N + n0, N, rows, cols, kb == 0);
                    }
                }
            }
            const int64_t n0 = t * PANELS_PER_TASK * NR, n1 = std::min(N, p_end * NR);
            for (int64_t m = 0; bias && m < M; ++m)
                for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += bias[n];
            for (int64_t m = 0; out16 && m < M; ++m) store_bf16(out16 + m * N + n0, yp + m * N + n0, n1 - n0);
        }
    }
    std::free(xpack);
}

// x (M, K) float32 or bfloat16 -> (M, N) in x's dtype
template <typename L, bool T = false>
static torch::Tensor gemm_any(torch::Tensor x, const WRef& wr, c10::optional<torch::Tensor> bias, int64_t N) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16));
    const int64_t M = x.size(0), K = x.size(1);
    const float* b = nullptr;
    if (bias.has_value()) {
        TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N);
        b = bias->data_ptr<float>();
    }
    auto acc = torch::empty({M, N}, x.options().dtype(torch::kFloat));
    if (x.scalar_type() == torch::kFloat) {
        gemm<L, float, T>(x.data_ptr<float>(), wr, b, M, N, K, acc.data_ptr<float>(), nullptr);
        return acc;
    }
    auto y = torch::empty({M, N}, x.options());
    gemm<L, uint16_t, T>((const uint16_t*)x.data_ptr(), wr, b, M, N, K, acc.data_ptr<float>(), (uint16_t*)y.data_ptr());
    return y;
}

// The stored weights of a layer, checked: bf16 (N, K); int8 (N, K) with a float32 scale per row; int4
// nibbles (N, K / 2) with a float32 scale and bias per group of `group` inputs. WRef.K: the unpacked K.
static WRef layer_weights(const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                          const c10::optional<torch::Tensor>& qbias, int64_t group) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous());
    const int64_t N = w.size(0);
    if (w.scalar_type() == torch::kBFloat16) return WRef{w.data_ptr(), nullptr, nullptr, 0, w.size(1)};
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kFloat && scale->is_contiguous(),
                "int8 and int4 weights need a float32 scale");
    if (w.scalar_type() == torch::kChar) {
        TORCH_CHECK(scale->numel() == N);
        return WRef{w.data_ptr(), scale->data_ptr<float>(), nullptr, 0, w.size(1)};
    }
    TORCH_CHECK(w.scalar_type() == torch::kByte && qbias.has_value(), "weights: bf16, int8, or int4 with a scale and a bias");
    const int64_t K = w.size(1) * 2;
    TORCH_CHECK(group > 0 && group % 8 == 0 && K % group == 0, "int4: the group size must be a multiple of 8 dividing K");
    TORCH_CHECK(scale->numel() == N * (K / group) && qbias->scalar_type() == torch::kFloat && qbias->is_contiguous()
                && qbias->numel() == N * (K / group));
    return WRef{w.data_ptr(), scale->data_ptr<float>(), qbias->data_ptr<float>(), group, K};
}

// x (M, K) float32 or bf16 -> x @ W^T (M, N), or with T x (M, N) -> x @ W (M, K): the gradient that
// reaches the layer's input, the weights widened panel by panel as in the forward product. In x's dtype.
template <bool T>
static torch::Tensor product(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale,
                             c10::optional<torch::Tensor> qbias, int64_t group, c10::optional<torch::Tensor> bias) {
    const WRef wr = layer_weights(w, scale, qbias, group);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == (T ? w.size(0) : wr.K), "the rows of x do not fit the weights");
    const int64_t N = T ? wr.K : w.size(0);
    switch (w.scalar_type()) {
        case torch::kBFloat16: return gemm_any<BF16, T>(x, wr, bias, N);
        case torch::kChar: return gemm_any<I8, T>(x, wr, bias, N);
        default: return gemm_any<I4, T>(x, wr, bias, N);
    }
}

torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16);
    return product<false>(x, w, c10::nullopt, c10::nullopt, 0, bias);
}

torch::Tensor gemm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(w.scalar_type() == torch::kChar);
    return product<false>(x, w, scale, c10::nullopt, 0, bias);
}

// x (M, K) float32 or bf16 @ int4 weights (N, K / 2) -> (M, N) in x's dtype
torch::Tensor gemm_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor qbias, int64_t group,
                        c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(w.scalar_type() == torch::kByte);
    return product<false>(x, w, scale, qbias, group, bias);
}

// g (M, N) float32 or bf16 @ the stored weights (N, K) of a layer (any layout) -> (M, K) in g's dtype
torch::Tensor gemm_t(torch::Tensor g, torch::Tensor w, c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> qbias,
                     int64_t group) {
    return product<true>(g, w, scale, qbias, group, c10::nullopt);
}

// ---- elementwise steps of the decoder on bf16 (or float32) rows, float32 math, one rounding at the end
// of each step as PyTorch rounds them: Gemma's RMSNorm and the GELU-gated product of the MLP. PyTorch's
// bf16 versions are several emulated passes each (a cast, a square, a mean, a product...), here one.

static inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8f(const uint16_t* p) { return widen_bf16(p); }
static inline void store8f(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store8f(uint16_t* p, __m256 v) { alignas(32) float t[8]; _mm256_store_ps(t, v); store_bf16(p, t, 8); }
static inline void store8f_one(float* p, float v) { *p = v; }
static inline void store8f_one(uint16_t* p, float v) { store_bf16(p, &v, 1); }
static inline float round_as(float v, const float*) { return v; }
static inline float round_as(float v, const uint16_t*) { uint16_t b; store_bf16(&b, &v, 1); return as_float(b); }

// out = (x * rsqrt(mean(x^2) + eps)) * scale, scale = 1 + w in float32; x, out (R, D)
template <typename X>
static void rms_rows(const X* x, const float* scale, float eps, int64_t R, int64_t D, X* out) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const X* xr = x + r * D;
        X* orow = out + r * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
            const __m256 v0 = load8f(xr + d), v1 = load8f(xr + d + 8);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float sum = hsum(_mm256_add_ps(a0, a1));
        for (; d < D; ++d) { const float v = as_float(xr[d]); sum += v * v; }
        const float inv = 1.0f / std::sqrt(sum / float(D) + eps);
        const __m256 iv = _mm256_set1_ps(inv);
        d = 0;
        for (; d + 8 <= D; d += 8) store8f(orow + d, _mm256_mul_ps(_mm256_mul_ps(load8f(xr + d), iv), _mm256_loadu_ps(scale + d)));
        for (; d < D; ++d) { const float v = (as_float(xr[d]) * inv) * scale[d]; store8f_one(orow + d, v); }
    }
}

// exp for float32 lanes (Cephes' expf: 2^n times a degree-7 polynomial, within 2 ulp), arguments clamped to +-88
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// gelu with the tanh approximation, 0.5 x (1 + tanh(y)) = x / (1 + exp(-2 y)), y = sqrt(2 / pi) (x + 0.044715 x^3)
static inline __m256 gelu8(__m256 x) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_mul_ps(y, _mm256_set1_ps(-2.0f)))));
}

// one value through a lane function (the scalar tails of the row loops, computed exactly as the lanes are)
template <__m256 (*F)(__m256)>
static inline float lane0(float x) {
    alignas(32) float t[8] = {x, 0, 0, 0, 0, 0, 0, 0};
    _mm256_store_ps(t, F(_mm256_load_ps(t)));
    return t[0];
}

// out = gelu(gate) * up, gelu's result rounded to X first as PyTorch's two steps round it; without up
// (null), out = gelu(gate), rounded once as PyTorch's gelu rounds it
template <typename X>
static void gelu_mul_rows(const X* gate, const X* up, int64_t n, X* out) {
    const int64_t chunks = (n + 4095) / 4096;
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * 4096, i1 = std::min<int64_t>(n, i0 + 4096);
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) {
            __m256 g = gelu8(load8f(gate + i));
            if (!up) { store8f(out + i, g); continue; }
            if (sizeof(X) == 2) {  // the bf16 rounding of gelu's result
                alignas(32) uint16_t t[8];
                store8f(t, g);
                g = widen_bf16(t);
            }
            store8f(out + i, _mm256_mul_ps(g, load8f(up + i)));
        }
        for (; i < i1; ++i) {
            const float g = lane0<gelu8>(as_float(gate[i]));
            store8f_one(out + i, up ? round_as(g, gate) * as_float(up[i]) : g);
        }
    }
}

// tanh for float32 lanes (Cephes' tanhf: an odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above)
static inline __m256 tanh8(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), a = _mm256_andnot_ps(sign, x);
    const __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f),
        _mm256_add_ps(exp8(_mm256_add_ps(a, a)), _mm256_set1_ps(1.0f))));
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
    const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), a, a);
    const __m256 r = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
    return _mm256_or_ps(r, _mm256_and_ps(x, sign));
}

// Gemma 2's attention weights, in place: rows of float32 scores -> softmax(cap * tanh(scores * scale / cap))
// over each row, keys whose mask is false left out (weight 0). scores (B, X, S): X rows per batch row, the
// row x of batch b takes the mask row (b, x % L), at mask + b * mb + (x % L) * ml (the model's (B, 1, L, S)
// mask or a slice of it, read in place); no mask: every key. As PyTorch's
// scale, softcap, masked_fill (finfo.min) and softmax in turn compute them, in one pass over the scores
// and one over the weights; a row with no key left gets uniform weights, as there.
static void softcap_softmax_rows(float* scores, const bool* mask, int64_t mb, int64_t ml, int64_t B, int64_t X, int64_t L,
                                 int64_t S, float scale, float cap) {
    const float lowest = -3.40282347e+38f;
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < B * X; ++row) {
        float* r = scores + row * S;
        const bool* m = mask ? mask + (row / X) * mb + ((row % X) % L) * ml : nullptr;
        const __m256 pre = _mm256_set1_ps(scale / cap), post = _mm256_set1_ps(cap);
        int64_t s = 0;
        __m256 mx = _mm256_set1_ps(lowest);
        float top = lowest;
        for (; s + 8 <= S; s += 8) {
            __m256 v = _mm256_mul_ps(tanh8(_mm256_mul_ps(_mm256_loadu_ps(r + s), pre)), post);
            if (m) {
                const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(m + s)));
                const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu16_epi32(b), _mm256_setzero_si256()));
                v = _mm256_blendv_ps(_mm256_set1_ps(lowest), v, keep);
            }
            _mm256_storeu_ps(r + s, v);
            mx = _mm256_max_ps(mx, v);
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, mx);
        for (int i = 0; i < 8; ++i) top = std::max(top, t[i]);
        for (; s < S; ++s) {
            r[s] = (m && !m[s]) ? lowest : lane0<tanh8>(r[s] * (scale / cap)) * cap;
            top = std::max(top, r[s]);
        }
        if (top == lowest) {  // nothing to attend to: PyTorch's softmax of equal values
            for (s = 0; s < S; ++s) r[s] = 1.0f / (float)S;
            continue;
        }
        // exp(v - top); the left-out keys (finfo.min) get exactly 0 (exp would clamp at -88, not reach 0)
        const __m256 top8 = _mm256_set1_ps(top), low8 = _mm256_set1_ps(lowest);
        __m256 sum8 = _mm256_setzero_ps();
        for (s = 0; s + 8 <= S; s += 8) {
            const __m256 v = _mm256_loadu_ps(r + s);
            const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, low8, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, top8)));
            _mm256_storeu_ps(r + s, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; s < S; ++s) {
            r[s] = r[s] == lowest ? 0.f : lane0<exp8>(r[s] - top);
            sum += r[s];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (s = 0; s + 8 <= S; s += 8) _mm256_storeu_ps(r + s, _mm256_mul_ps(_mm256_loadu_ps(r + s), inv));
        for (; s < S; ++s) r[s] *= 1.0f / sum;
    }
}

torch::Tensor softcap_softmax_(torch::Tensor scores, int64_t L, double scale, double cap, c10::optional<torch::Tensor> mask) {
    TORCH_CHECK(scores.dim() == 3 && scores.is_contiguous() && scores.scalar_type() == torch::kFloat);
    const int64_t B = scores.size(0), X = scores.size(1), S = scores.size(2);
    const bool* m = nullptr;
    int64_t mb = 0, ml = 0;
    if (mask.has_value()) {  // (B, 1, L, S), each row of S contiguous
        TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 4 && mask->size(1) == 1 && mask->stride(3) == 1);
        TORCH_CHECK(mask->size(0) == B && mask->size(2) == L && mask->size(3) == S && X % L == 0);
        m = mask->data_ptr<bool>();
        mb = mask->stride(0), ml = mask->stride(2);
    }
    softcap_softmax_rows(scores.data_ptr<float>(), m, mb, ml, B, X, L, S, (float)scale, (float)cap);
    return scores;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor scale, double eps) {
    TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat));
    const int64_t D = x.size(-1), R = x.numel() / D;
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == D);
    auto out = torch::empty_like(x);
    if (x.scalar_type() == torch::kFloat)
        rms_rows<float>(x.data_ptr<float>(), scale.data_ptr<float>(), (float)eps, R, D, out.data_ptr<float>());
    else
        rms_rows<uint16_t>((const uint16_t*)x.data_ptr(), scale.data_ptr<float>(), (float)eps, R, D, (uint16_t*)out.data_ptr());
    return out;
}

torch::Tensor gelu_mul(torch::Tensor gate, c10::optional<torch::Tensor> up) {
    TORCH_CHECK(gate.is_contiguous() && (gate.scalar_type() == torch::kBFloat16 || gate.scalar_type() == torch::kFloat));
    if (up.has_value())
        TORCH_CHECK(up->is_contiguous() && gate.sizes() == up->sizes() && gate.scalar_type() == up->scalar_type());
    auto out = torch::empty_like(gate);
    if (gate.scalar_type() == torch::kFloat)
        gelu_mul_rows<float>(gate.data_ptr<float>(), up.has_value() ? up->data_ptr<float>() : nullptr, gate.numel(), out.data_ptr<float>());
    else
        gelu_mul_rows<uint16_t>((const uint16_t*)gate.data_ptr(), up.has_value() ? (const uint16_t*)up->data_ptr() : nullptr,
                                gate.numel(), (uint16_t*)out.data_ptr());
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv_bf16", &gemv_bf16);
    m.def("gemv_int8", &gemv_int8);
    m.def("attention_scores", &attention_scores);
    m.def("attention_values", &attention_values);
    m.def("gemm_bf16", &gemm_bf16);
    m.def("gemm_int8", &gemm_int8);
    m.def("gemv_int4", &gemv_int4);
    m.def("gemm_int4", &gemm_int4);
    m.def("rms_norm", &rms_norm);
    m.def("gelu_mul", &gelu_mul);
    m.def("gemm_t", &gemm_t);
    m.def("softcap_softmax_", &softcap_softmax_);
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
            name="paligemma_cpu_kernels_v19", cpp_sources=[_SOURCE],
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


def gemv_int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, qbias: torch.Tensor, group: int) -> torch.Tensor:
    """(M <= MAX_ROWS, K) float32 @ int4 weights (N, K / 2) nibbles, w = q * scale + qbias per group -> (M, N) float32."""
    return build().gemv_int4(x, w, scale, qbias, group)


def attention_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, G, R, D) float32 queries . (B, G, S, D) float32 keys (a view of the cache) -> (B, G, R, S)."""
    return build().attention_scores(q.contiguous(), keys)


def attention_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, G, R, S) float32 weights @ (B, G, S, D) float32 values (a view of the cache) -> (B, G, R, D)."""
    return build().attention_values(weights.contiguous(), values)


def gemm_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float32 or bfloat16 @ (N, K) bfloat16 weights (+ float32 bias) -> (M, N) in x's dtype
    (float32 sums, one rounding), any M (meant for many rows)."""
    return build().gemm_bf16(x, w, bias)


def gemm_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float32 or bfloat16 @ (N, K) int8 weights * scale[n] (+ float32 bias) -> (M, N) in x's dtype, any M."""
    return build().gemm_int8(x, w, scale, bias)


def gemm_int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, qbias: torch.Tensor, group: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float32 or bfloat16 @ int4 weights (N, K / 2) nibbles (+ float32 bias) -> (M, N) in x's dtype, any M."""
    return build().gemm_int4(x, w, scale, qbias, group, bias)


def gemm_t(g: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, qbias: torch.Tensor | None = None,
           group: int = 0) -> torch.Tensor:
    """(M, N) float32 or bfloat16 @ the stored weights (N, K) of a layer (bf16; int8 times scale[n]; int4
    nibbles times scale[n, g] plus qbias[n, g]) -> (M, K) in g's dtype: the gradient reaching the layer's
    input. The transposed blocked product: the weights are widened panel by panel, never as a whole."""
    return build().gemm_t(g, w, scale, qbias, group)


def softcap_softmax_(scores: torch.Tensor, L: int, scale: float, cap: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Gemma 2's attention weights in place: float32 scores (B, X, S), contiguous -> softmax over S of
    cap * tanh(scores * scale / cap), keys where the bool mask (B, 1, L, S) is False left out (row x of
    batch b takes mask[b, 0, x % L]; any strides with contiguous rows, so a slice is read in place);
    returns scores."""
    return build().softcap_softmax_(scores, L, scale, cap, mask)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm of contiguous bfloat16 or float32 rows: (x * rsqrt(mean(x^2) + eps)) * scale, with
    scale = 1 + w in float32, in x's dtype (float32 math, one rounding)."""
    return build().rms_norm(x, scale, eps)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, tanh approximation) * up for contiguous bfloat16 or float32 tensors of one shape,
    rounded as PyTorch's two steps round."""
    return build().gelu_mul(gate, up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """gelu(x, tanh approximation) of a contiguous bfloat16 or float32 tensor, float32 math, one rounding
    (as PyTorch's gelu): SigLIP's MLP."""
    return build().gelu_mul(x, None)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in 0..15 -> (N, K / 2) uint8, two a byte, input 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: (N, K / 2) uint8 -> (N, K) uint8 in 0..15."""
    return torch.stack((w & 0x0F, w >> 4), dim=-1).reshape(w.shape[0], -1)


class _LinearProduct(torch.autograd.Function):
    """`linear` differentiable in x, for LoRA training over a frozen bf16, int8 or int4 base: the
    kernels have no derivative (their outputs would silently cut the gradient); the backward is the
    transposed blocked product (`gemm_t`), so the weights are never widened to a float32 copy."""

    @staticmethod
    def forward(ctx, x, w, scale, bias, qbias, group):
        ctx.save_for_backward(w, scale, qbias)
        ctx.x_dtype, ctx.x_shape, ctx.group = x.dtype, x.shape, group
        return linear(x, w, scale, bias, qbias, group)  # no grad in here: the kernels' path

    @staticmethod
    def backward(ctx, grad):
        w, scale, qbias = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g = g.contiguous() if g.dtype in (torch.float32, torch.bfloat16) else g.float().contiguous()
        out = gemm_t(g, w, scale, qbias, ctx.group)
        return out.to(ctx.x_dtype).reshape(ctx.x_shape), None, None, None, None, None


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           qbias: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """x @ w.T + bias, result in x's dtype. w: bfloat16; or int8 with a float32 scale per output row; or
    int4 (uint8 (N, K / 2), pack_int4's layout) with a float32 scale and qbias per group of `group`
    inputs of each row (w = q * scale + qbias).

    A few rows (decoding): the streaming kernels, the bias added in x's dtype. Many rows (prefill,
    vision): the blocked product that widens weight panels as it packs them and adds the bias to its
    float32 sums (one rounding, as PyTorch's bf16 addmm; and one operation fewer). When x needs a
    gradient (LoRA training) the product goes through _LinearProduct, whose backward gives it.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _LinearProduct.apply(x, w, scale, bias, qbias, group)
    K = x.shape[-1]
    flat = x.reshape(-1, K)
    if flat.shape[0] <= MAX_ROWS:
        flat = flat.float().contiguous()
        if qbias is not None:
            y = gemv_int4(flat, w, scale, qbias, group)
        else:
            y = gemv_int8(flat, w, scale) if scale is not None else gemv_bf16(flat, w)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
    else:
        # the blocked products read bfloat16 rows and round their float32 sums to bfloat16 themselves
        flat = flat.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else flat.float().contiguous()
        b = None if bias is None else bias.float().contiguous()
        if qbias is not None:
            y = gemm_int4(flat, w, scale, qbias, group, b)
        else:
            y = gemm_int8(flat, w, scale, b) if scale is not None else gemm_bf16(flat, w, b)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


class KernelLinear(nn.Module):
    """A linear layer that multiplies with `linear`: bfloat16 weights (and an optional bias), int8
    weights with a float32 scale per output row, or int4 weights (`int4`). The backend puts it in place
    of nn.Linear and of int8 QuantizedLinear layers, and builds int4 layers with it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 qbias: torch.Tensor | None = None, group: int = 0):
        super().__init__()
        if scale is None:
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        else:
            self.register_buffer("weight", weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale", None if scale is None else scale.float().contiguous())
        self.register_buffer("qbias", None if qbias is None else qbias.float().contiguous())
        self.group = group

    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, qbias: torch.Tensor) -> "KernelLinear":
        """From (N, K) integers in 0..15 and float32 (N, K / group) scale and qbias: w = q * scale + qbias."""
        return cls(pack_int4(q), scale=scale, qbias=qbias, group=q.shape[1] // scale.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.bias, self.qbias, self.group)


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


class KernelPatchEmbedding(nn.Module):
    """A convolution whose stride is its kernel size (SigLIP's patch embedding) as one `linear`: each
    patch's pixels (C, p, p) flattened against each kernel flattened alike. On CPUs that emulate
    bfloat16, PyTorch's bf16 convolution is an unvectorized loop (about a second for one image)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = nn.Parameter(conv.weight.data.reshape(conv.out_channels, -1).contiguous(), requires_grad=False)
        self.bias = conv.bias

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixels.shape
        p = self.patch
        # (B, C, H/p, p, W/p, p) -> (B, H/p, W/p, C, p, p): patches in row-major order, each as the kernel is laid out
        patches = pixels.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), -1)
        y = linear(patches, self.weight, bias=self.bias)  # (B, N, D)
        return y.transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, H/p, W/p), as the convolution returns it

