"""One decode step of every block in one C++ call, on the CPU (as llama.cpp does): Llama and GPT-J.

At batch 1 the bundled 135M model spends far more time dispatching small torch ops (RMSNorm,
rotary, views, cache writes, SDPA, residual adds, silu * mul: ~100 per layer at 1.5-4 us
each) than in its GEMVs. Here one call runs, for each layer and each of the B rows (T = 1):

    Llama: h = rms_norm(x) -> qkv GEMV -> rotary on q, k (halves) -> k, v into the cache at the
    row's position -> attention over positions 0..pos (GQA, softmax in float32) -> o GEMV ->
    x += ... -> rms_norm -> gate_up GEMV -> silu(gate) * up -> down GEMV -> x += ...

    GPT-J: h = layer_norm(x) -> q, k, v GEMVs (or one fused) -> rotary on the first rotary_dim
    dims of q, k in adjacent pairs -> cache -> attention -> out GEMV; fc_in GEMV -> gelu_new ->
    fc_out GEMV; x += both (attention and MLP in parallel from one norm)

with x [B, hidden] float32 updated in place. The GEMVs are quant.py's kernels (its source is
compiled into this library); attention runs in parallel with OpenMP over (row, kv head with
its query heads, chunk of keys), reading a float32 or (GPT-J) bfloat16 cache. The rotary tables
are the torch path's own (`rotary_tables`, in float32).

Results equal the torch path's up to float rounding; but the GEMV kernel quantizes its input
to int8, so a one-ulp difference can round an activation the other way, and in a deep model
such differences grow: the logits then differ as much as the torch path's own do when its
input is nudged by one ulp (tests/test_cpu_decode.py). Bundled model, 2 cores: 24 -> 7 ms per
token (int8), 23 -> 5-6 ms (int4), through the engine (benchmarks/bench_bundled.py). GPT-J-6B
shape: 274-294 -> 239-244 ms (int8), 210-218 -> 167-169 ms (int4), one step at position 512.
A bfloat16 model's residual stream runs in float32 here (rounded back to bf16 after the step).

Served: Llama and GPT-J models on the CPU whose linears are all QuantizedLinear layers (int8, or
int4 in groups of 32) the kernel takes (Llama: fused), float32 or bfloat16 activations, a
float32 KV cache (GPT-J: or bfloat16), at most quant.DECODE_MAX_ROWS rows. Anything else
(prefill, float or bf16 weights, CUDA, no cache, another cache dtype, no compiler) keeps the
torch path: `decode_blocks` returns False and has changed nothing. GPTJ_FAST_DECODE=0 turns it
off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref

import torch
from torch import Tensor, nn

from gptj import quant
from gptj.kv_cache import KVCache
from gptj.quant import QuantizedLinear

_DECODE_SRC = r"""
// ---------------------------------------------------------------- Llama decode step
struct GqLinear {
    const void* w;       // int8 [n,k] or uint8 [n,k/2]
    const void* scales;  // fp32 [n] (int8) or fp16 [n,k/32] (int4)
    const void* mins;    // fp16 [n,k/32] (int4)
    const float* bias;   // fp32 [n] or null
    int64_t n, k;
    int32_t bits;        // 8 or 4
};
struct GqLayer {
    const float* ln1;  // input_layernorm
    const float* ln2;  // post_attention_layernorm
    GqLinear qkv, o, gate_up, down;
};

static void run_linear(const GqLinear& L, const float* x, int64_t M, float* y, void* scratch, int nthreads) {
    if (L.bits == 8)
        gq_linear_int8((const int8_t*)L.w, (const float*)L.scales, L.bias, L.n, L.k, x, M, y, scratch, nthreads);
    else
        gq_linear_int4((const uint8_t*)L.w, (const uint16_t*)L.scales, (const uint16_t*)L.mins, L.bias, L.n, L.k, x,
                       M, y, scratch, nthreads);
}

static void rms_norm_rows(const float* x, const float* w, int64_t M, int64_t H, float eps, float* out) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * H;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; ++j) ss += xr[j] * xr[j];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        float* o = out + m * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) o[j] = xr[j] * r * w[j];
    }
}

// HF's rotate_half: dim i pairs with dim i + hd/2
static inline void rotary(float* v, const float* c, const float* s, int64_t hd) {
    const int64_t half = hd / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

// float vectors of FW lanes (see quant's vf): loads (also from a bf16 cache), stores, math
#if GQ_ISA == 3
#define FW 16
static inline vf vf_ld(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vf_ld(const uint16_t* p) {  // bfloat16 -> float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void vf_st(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vf_pow2(vf n) {  // 2^n for whole n in the float exponent's range
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// the sums of four vectors' lanes
static inline __m128 vf_sum4(const vf* a) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    // per 128-bit lane: a0, a1, a2, a3's partial sums
    const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(w), _mm512_extractf32x8_ps(w, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else
#define FW 8
static inline vf vf_ld(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vf_ld(const uint16_t* p) {  // bfloat16 -> float32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline void vf_st(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vf_pow2(vf n) {  // 2^n for whole n in the float exponent's range
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline __m128 vf_sum4(const vf* a) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

// e^x for x <= 0 (Cephes' expf: |rel. error| < 2e-7); below -87 it gives ~1e-38, not 0
static inline void exp_block(float* p) {
    const vf x = vf_max(vf_ld(p), vf_set(-87.f));
    const vf n = vf_round(vf_mul(x, vf_set(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set(0.693359375f), x);
    r = vf_fnma(n, vf_set(-2.12194440e-4f), r);
    vf q = vf_set(1.9875691500e-4f);
    q = vf_fma(q, r, vf_set(1.3981999507e-3f));
    q = vf_fma(q, r, vf_set(8.3334519073e-3f));
    q = vf_fma(q, r, vf_set(4.1665795894e-2f));
    q = vf_fma(q, r, vf_set(1.6666665459e-1f));
    q = vf_fma(q, r, vf_set(5.0000001201e-1f));
    q = vf_fma(q, vf_mul(r, r), vf_add(r, vf_set(1.f)));
    vf_st(p, vf_mul(q, vf_pow2(n)));
}

static inline void exp_inplace(float* s, int64_t n) {  // s[j] = e^s[j], s[j] <= 0
    int64_t j = 0;
    for (; j + FW <= n; j += FW) exp_block(s + j);
    for (; j < n; ++j) s[j] = expf(s[j]);
}

// silu(g) * u = g / (1 + e^-g) * u, from e = e^-|g| <= 1 (no overflow): g >= 0: g / (1 + e),
// g < 0: g * e / (1 + e). a: n floats out.
static void silu_mul(const float* g, const float* u, int64_t n, float* a) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = g[i] < 0.f ? g[i] : -g[i];
    exp_inplace(a, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = (g[i] >= 0.f ? g[i] : g[i] * a[i]) / (1.f + a[i]) * u[i];
}

// ---- attention
// A task covers query heads t0..t0+G-1 (G <= 4, sharing one kv head) of one row, over one chunk of
// n keys: each key and value is read once for the G heads (the cache is read from memory: at
// long contexts that read is what attention costs). Per head it leaves the chunk's max score m,
// l = sum e^(score - m) and o = sum e^(score - m) v, combined over chunks afterwards (chunks
// let two threads share one row's few heads at long contexts).

// per head t: s[t*n ..] scores -> e^(score - m); m[t*ms], l[t*ms]
static void chunk_softmax(float* s, int G, int64_t n, float* m, float* l, int64_t ms) {
    for (int t = 0; t < G; ++t) {
        float* st = s + t * n;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) mx = st[j] > mx ? st[j] : mx;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) st[j] -= mx;
        exp_inplace(st, n);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += st[j];
        m[t * ms] = mx;
        l[t * ms] = sum;
    }
}

// the KV cache holds float32 or bfloat16 (uint16_t: the high half of a float32)
static inline float kv_f(float v) { return v; }
static inline float kv_f(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void kv_put(float* dst, const float* src, int64_t n) { memcpy(dst, src, n * sizeof(float)); }
static inline void kv_put(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// any head_dim. q: G heads, stride hd; o: stride os
template <typename CT>
static void attend_any(const float* q, int G, int64_t hd, const CT* K, const CT* V, int64_t n, float scale,
                       float* s, float* o, int64_t os, float* m, float* l, int64_t ms) {
    for (int t = 0; t < G; ++t)
        for (int64_t j = 0; j < n; ++j) {
            const float* qt = q + t * hd;
            const CT* kj = K + j * hd;
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < hd; ++i) d += qt[i] * kv_f(kj[i]);
            s[t * n + j] = d * scale;
        }
    chunk_softmax(s, G, n, m, l, ms);
    for (int t = 0; t < G; ++t) {
        float* ot = o + t * os;
        for (int64_t i = 0; i < hd; ++i) ot[i] = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            const CT* vj = V + j * hd;
            const float p = s[t * n + j];
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) ot[i] += p * kv_f(vj[i]);
        }
    }
}

// head_dim = NV float vectors: the G heads' queries and outputs stay in registers
template <int NV, int G, typename CT>
static void attend_v(const float* q, const CT* K, const CT* V, int64_t n, float scale, float* s, float* o,
                     int64_t os, float* m, float* l, int64_t ms) {
    constexpr int64_t hd = NV * FW;
    vf qv[G][NV];
    for (int t = 0; t < G; ++t)
        for (int i = 0; i < NV; ++i) qv[t][i] = vf_ld(q + t * hd + i * FW);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // four keys at a time: 4G independent FMA chains, one reduction
        vf a[G][4];
        for (int t = 0; t < G; ++t) a[t][0] = a[t][1] = a[t][2] = a[t][3] = vf_zero();
        for (int i = 0; i < NV; ++i)
            for (int u = 0; u < 4; ++u) {
                const vf k = vf_ld(K + (j + u) * hd + i * FW);
                for (int t = 0; t < G; ++t) a[t][u] = vf_fma(qv[t][i], k, a[t][u]);
            }
        for (int t = 0; t < G; ++t) _mm_storeu_ps(s + t * n + j, _mm_mul_ps(vf_sum4(a[t]), _mm_set1_ps(scale)));
    }
    for (; j < n; ++j) {
        vf a[G];
        for (int t = 0; t < G; ++t) a[t] = vf_zero();
        for (int i = 0; i < NV; ++i) {
            const vf k = vf_ld(K + j * hd + i * FW);
            for (int t = 0; t < G; ++t) a[t] = vf_fma(qv[t][i], k, a[t]);
        }
        for (int t = 0; t < G; ++t) s[t * n + j] = vf_sum(a[t]) * scale;
    }
    chunk_softmax(s, G, n, m, l, ms);
    vf acc[G][NV];
    for (int t = 0; t < G; ++t)
        for (int i = 0; i < NV; ++i) acc[t][i] = vf_zero();
    for (j = 0; j < n; ++j) {
        vf p[G];
        for (int t = 0; t < G; ++t) p[t] = vf_set(s[t * n + j]);
        for (int i = 0; i < NV; ++i) {
            const vf v = vf_ld(V + j * hd + i * FW);
            for (int t = 0; t < G; ++t) acc[t][i] = vf_fma(p[t], v, acc[t][i]);
        }
    }
    for (int t = 0; t < G; ++t)
        for (int i = 0; i < NV; ++i) vf_st(o + t * os + i * FW, acc[t][i]);
}

template <int NV, typename CT>
static bool attend_nv(const float* q, int G, const CT* K, const CT* V, int64_t n, float scale, float* s,
                      float* o, int64_t os, float* m, float* l, int64_t ms) {
    if (NV > 8 && G > 1) return false;  // q and the output of G heads would not fit in registers
    switch (G) {
        case 1: attend_v<NV, 1>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 2: attend_v<NV, 2>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 3: attend_v<NV, 3>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 4: attend_v<NV, 4>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
    }
    return false;
}

// n >= 1 keys
template <typename CT>
static void attend_chunk(const float* q, int G, int64_t hd, const CT* K, const CT* V, int64_t n, float scale,
                         float* s, float* o, int64_t os, float* m, float* l, int64_t ms) {
    bool done = false;
    switch (hd) {
        case FW: done = attend_nv<1>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 2 * FW: done = attend_nv<2>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 4 * FW: done = attend_nv<4>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 8 * FW: done = attend_nv<8>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 16 * FW: done = attend_nv<16>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;  // GPT-J-6B, AVX-512
    }
    if (!done) attend_any(q, G, hd, K, V, n, scale, s, o, os, m, l, ms);
}

static inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

#define ATT_G 4            // query heads per task, at most
#define ATT_MIN_CHUNK 256  // keys: shorter chunks cost more to combine than they save

// chunks per (row, kv head) at most: enough tasks for 4 per thread
static int64_t max_chunks(int64_t B, int64_t nkv, int nthreads) {
    const int64_t c = (4 * nthreads + B * nkv - 1) / (B * nkv);
    return c > 1 ? c : 1;
}

// The largest of the B rows' positions, or -1 where a row or a position lies outside the cache.
static int64_t max_position(const int64_t* pos, int64_t B, int64_t row0, int64_t cache_rows, int64_t max_len) {
    if (row0 < 0 || row0 + B > cache_rows) return -1;
    int64_t maxpos = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
        maxpos = pos[b] > maxpos ? pos[b] : maxpos;
    }
    return maxpos;
}

// Attention's scratch (scores: ATT_G * align64(max_len) per thread; po, pm, pl: per part, B * nh
// * max_chunks parts) from `at` on, then the GEMV kernel's.
struct AttnScratch {
    float *scores, *po, *pm, *pl;
    void* gemv;
};
static AttnScratch attn_scratch(float* at, int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t max_len,
                                int nthreads) {
    const int64_t parts = B * nh * max_chunks(B, nkv, nthreads);
    AttnScratch a;
    a.scores = at;
    a.po = a.scores + ATT_G * align64(max_len) * nthreads;
    a.pm = a.po + align64(parts * hd);
    a.pl = a.pm + align64(parts);
    a.gemv = a.pl + align64(parts);
    return a;
}
// bytes: attention's floats, the GEMV kernel's scratch for B rows of up to kmax inputs, alignment
static int64_t attn_gemv_scratch_bytes(int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t max_len, int64_t kmax,
                                       int nthreads) {
    const int64_t parts = B * nh * max_chunks(B, nkv, nthreads);
    const int64_t floats = ATT_G * align64(max_len) * nthreads + align64(parts * hd) + 2 * align64(parts);
    return floats * 4 + align64(B * kmax + 8 * B * (kmax / 32)) + 64;
}

// Attention of B rows (one new token each) over their cache rows. q: row b's query heads at
// q + b * q_stride; kl, vl: one layer's cache [cache_rows, nkv, max_len, hd]; att [B, nh * hd].
template <typename CT>
static void attention_step(const float* q, int64_t q_stride, const CT* kl, const CT* vl, int64_t B, const int64_t* pos,
                           int64_t row0, int64_t nh, int64_t nkv, int64_t hd, int64_t max_len, int64_t maxpos,
                           const AttnScratch& sc, float* att, int nthreads) {
    float *scores = sc.scores, *po = sc.po, *pm = sc.pm, *pl = sc.pl;
    const int64_t group = nh / nkv, row_stride = nkv * max_len * hd;
    const float scale = 1.f / sqrtf((float)hd);
    // in parallel only where it outweighs waking the threads; keys in C chunks of `chunk` per
    // (row, kv head) where that gives the threads more tasks
    const bool par = B * nh * (maxpos + 1) * hd >= 32768;
    int64_t C = par ? max_chunks(B, nkv, nthreads) : 1;
    C = C < (maxpos + 1) / ATT_MIN_CHUNK ? C : (maxpos + 1) / ATT_MIN_CHUNK > 1 ? (maxpos + 1) / ATT_MIN_CHUNK : 1;
    const int64_t chunk = (maxpos + 1 + C - 1) / C, hg = (group + ATT_G - 1) / ATT_G;
    // tasks: (row, kv head, batch of up to ATT_G of its query heads, chunk of keys)
#pragma omp parallel for schedule(dynamic) num_threads(nthreads) if (par)
    for (int64_t task = 0; task < B * nkv * hg * C; ++task) {
        const int64_t c = task % C, hb = task / C % hg, kvh = task / (C * hg) % nkv, b = task / (C * hg * nkv);
        const int64_t h0 = kvh * group + hb * ATT_G, n = pos[b] + 1;
        const int G = (int)(group - hb * ATT_G < ATT_G ? group - hb * ATT_G : ATT_G);
        const int64_t j0 = c * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
        const int64_t pi = (b * nh + h0) * C + c;  // head h0's part; head h0 + t's is C further on
        if (j1 <= j0) {  // this row has no keys in this chunk
            for (int t = 0; t < G; ++t) pm[pi + t * C] = -INFINITY;
            continue;
        }
        const int64_t at = (row0 + b) * row_stride + (kvh * max_len + j0) * hd;
        attend_chunk(q + b * q_stride + h0 * hd, G, hd, kl + at, vl + at, j1 - j0, scale,
                     scores + ATT_G * align64(max_len) * omp_get_thread_num(), po + pi * hd, C * hd, pm + pi,
                     pl + pi, C);
    }
    for (int64_t bh = 0; bh < B * nh; ++bh) {  // combine the chunks: softmax over all keys
        const int64_t pi = bh * C;
        float M = -INFINITY, sum = 0.f;
        for (int64_t c = 0; c < C; ++c) M = pm[pi + c] > M ? pm[pi + c] : M;
        float* out = att + bh * hd;  // att [B, nh * hd]: row b, head h at bh * hd
        for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
            if (pm[pi + c] == -INFINITY) continue;
            const float w = C == 1 ? 1.f : expf(pm[pi + c] - M);
            const float* o = po + (pi + c) * hd;
            sum += w * pl[pi + c];
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) out[i] += w * o[i];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
    }
}

// ---------------------------------------------------------------- Llama decode step
struct GqDecodeDims {
    int64_t n_layers, hidden, n_head, n_kv, head_dim, inter;
    float eps;
};

extern "C" int64_t gq_llama_decode_scratch(const GqDecodeDims* d, int64_t B, int64_t max_len, int nthreads) {
    const int64_t qkv = (d->n_head + 2 * d->n_kv) * d->head_dim, att = d->n_head * d->head_dim;
    int64_t kmax = d->hidden > att ? d->hidden : att;
    kmax = kmax > d->inter ? kmax : d->inter;
    const int64_t f = align64(B * d->hidden) * 2 + align64(B * qkv) + align64(B * att) + align64(B * 2 * d->inter) +
                      align64(B * d->inter);
    return f * 4 + attn_gemv_scratch_bytes(B, d->n_head, d->n_kv, d->head_dim, max_len, kmax, nthreads);
}

// One decode step of all layers for B rows; x [B, hidden] in place. Row b is cache row row0 + b
// at position pos[b]; cos/sin [B, head_dim]; kc/vc [n_layers, cache_rows, n_kv, max_len, head_dim].
// Returns 0, or -1 (having changed nothing) where a row or a position is outside the cache.
extern "C" int gq_llama_decode(const GqLayer* layers, const GqDecodeDims* d, float* x, int64_t B, const int64_t* pos,
                               const float* cos_t, const float* sin_t, float* kc, float* vc, int64_t cache_rows,
                               int64_t row0, int64_t max_len, void* scratch, int nthreads) {
    const int64_t maxpos = max_position(pos, B, row0, cache_rows, max_len);
    if (maxpos < 0) return -1;
    const int64_t H = d->hidden, nh = d->n_head, nkv = d->n_kv, hd = d->head_dim, I = d->inter;
    const int64_t qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd;
    float* h = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float* t = h + align64(B * H);
    float* qkv = t + align64(B * H);
    float* att = qkv + align64(B * qkv_w);
    float* gu = att + align64(B * att_w);
    float* act = gu + align64(B * 2 * I);
    const AttnScratch sc = attn_scratch(act + align64(B * I), B, nh, nkv, hd, max_len, nthreads);
    void* gemv = sc.gemv;
    const int64_t row_stride = nkv * max_len * hd, layer_stride = cache_rows * row_stride;
    for (int64_t l = 0; l < d->n_layers; ++l) {
        const GqLayer& L = layers[l];
        rms_norm_rows(x, L.ln1, B, H, d->eps, h);
        run_linear(L.qkv, h, B, qkv, gemv, nthreads);
        float* kl = kc + l * layer_stride;
        float* vl = vc + l * layer_stride;
        for (int64_t b = 0; b < B; ++b) {
            float* r = qkv + b * qkv_w;
            const float *c = cos_t + b * hd, *s = sin_t + b * hd;
            for (int64_t j = 0; j < nh + nkv; ++j) rotary(r + j * hd, c, s, hd);  // q heads, then k heads
            for (int64_t j = 0; j < nkv; ++j) {
                const int64_t at = (row0 + b) * row_stride + (j * max_len + pos[b]) * hd;
                memcpy(kl + at, r + (nh + j) * hd, hd * sizeof(float));
                memcpy(vl + at, r + (nh + nkv + j) * hd, hd * sizeof(float));
            }
        }
        attention_step(qkv, qkv_w, kl, vl, B, pos, row0, nh, nkv, hd, max_len, maxpos, sc, att, nthreads);
        run_linear(L.o, att, B, t, gemv, nthreads);
        for (int64_t i = 0; i < B * H; ++i) x[i] += t[i];
        rms_norm_rows(x, L.ln2, B, H, d->eps, h);
        run_linear(L.gate_up, h, B, gu, gemv, nthreads);
        for (int64_t b = 0; b < B; ++b) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, I, act + b * I);
        run_linear(L.down, act, B, t, gemv, nthreads);
        for (int64_t i = 0; i < B * H; ++i) x[i] += t[i];
    }
    return 0;
}

// ---------------------------------------------------------------- GPT-J decode step
// h = layer_norm(x); x += out(attention(rotary(q(h)), rotary(k(h)), v(h))) + fc_out(gelu(fc_in(h)))
struct GqGptjLayer {
    const float* ln_w;
    const float* ln_b;
    GqLinear q, k, v;  // k.w == null: q is q, k and v fused (3 * hidden outputs)
    GqLinear out, fc_in, fc_out;
};
struct GqGptjDims {
    int64_t n_layers, hidden, n_head, head_dim, rotary_dim, inner;
    float eps;
    int32_t cache_bf16;  // the KV cache holds bfloat16, else float32
};

static void layer_norm_rows(const float* x, const float* w, const float* b, int64_t M, int64_t H, float eps,
                            float* out) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * H;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < H; ++j) sum += xr[j];
        const float mean = sum / (float)H;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; ++j) ss += (xr[j] - mean) * (xr[j] - mean);
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        float* o = out + m * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) o[j] = (xr[j] - mean) * r * w[j] + b[j];
    }
}

// GPT-J's rotary: adjacent pairs (2i, 2i + 1) of the first `rot` dims ("rotate every two")
static inline void rotary_pairs(float* v, const float* c, const float* s, int64_t rot) {
    for (int64_t i = 0; i < rot; i += 2) {
        const float a = v[i], b = v[i + 1];
        v[i] = a * c[i] - b * s[i];
        v[i + 1] = b * c[i + 1] + a * s[i + 1];
    }
}

// gelu_new: x / 2 * (1 + tanh(y)), y = sqrt(2/pi) (x + 0.044715 x^3); tanh(|y|) from
// e = e^(-2|y|) <= 1 (no overflow) as (1 - e) / (1 + e). e: n floats of scratch.
static void gelu_tanh(float* a, int64_t n, float* e) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float y = 0.7978845608028654f * (a[i] + 0.044715f * a[i] * a[i] * a[i]);
        e[i] = -2.f * (y < 0.f ? -y : y);
    }
    exp_inplace(e, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float t = (1.f - e[i]) / (1.f + e[i]);
        a[i] = 0.5f * a[i] * (1.f + (a[i] < 0.f ? -t : t));  // y has the sign of x
    }
}

extern "C" int64_t gq_gptj_decode_scratch(const GqGptjDims* d, int64_t B, int64_t max_len, int nthreads) {
    const int64_t H = d->hidden, I = d->inner, kmax = H > I ? H : I;
    const int64_t f = align64(B * H) * 4 + align64(B * 3 * H) + 2 * align64(B * I);
    return f * 4 + attn_gemv_scratch_bytes(B, d->n_head, d->n_head, d->head_dim, max_len, kmax, nthreads);
}

template <typename CT>
static void gptj_layers(const GqGptjLayer* layers, const GqGptjDims* d, float* x, int64_t B, const int64_t* pos,
                        int64_t maxpos, const float* cos_t, const float* sin_t, CT* kc, CT* vc, int64_t cache_rows,
                        int64_t row0, int64_t max_len, void* scratch, int nthreads) {
    const int64_t H = d->hidden, nh = d->n_head, hd = d->head_dim, I = d->inner;
    float* h = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float* att = h + align64(B * H);
    float* t1 = att + align64(B * H);
    float* t2 = t1 + align64(B * H);
    float* qkv = t2 + align64(B * H);
    float* f = qkv + align64(B * 3 * H);
    float* ef = f + align64(B * I);
    const AttnScratch sc = attn_scratch(ef + align64(B * I), B, nh, nh, hd, max_len, nthreads);
    void* gemv = sc.gemv;
    const int64_t row_stride = nh * max_len * hd, layer_stride = cache_rows * row_stride;
    for (int64_t l = 0; l < d->n_layers; ++l) {
        const GqGptjLayer& L = layers[l];
        layer_norm_rows(x, L.ln_w, L.ln_b, B, H, d->eps, h);
        // q, k, v of row b at qkv + b * stride, + ko, + vo
        int64_t stride = 3 * H, ko = H, vo = 2 * H;
        if (L.k.w) {
            run_linear(L.q, h, B, qkv, gemv, nthreads);
            run_linear(L.k, h, B, qkv + B * H, gemv, nthreads);
            run_linear(L.v, h, B, qkv + 2 * B * H, gemv, nthreads);
            stride = H, ko = B * H, vo = 2 * B * H;
        } else {
            run_linear(L.q, h, B, qkv, gemv, nthreads);
        }
        CT* kl = kc + l * layer_stride;
        CT* vl = vc + l * layer_stride;
        for (int64_t b = 0; b < B; ++b) {
            float* q = qkv + b * stride;
            const float *c = cos_t + b * hd, *s = sin_t + b * hd;
            for (int64_t j = 0; j < nh; ++j) {
                rotary_pairs(q + j * hd, c, s, d->rotary_dim);
                rotary_pairs(q + ko + j * hd, c, s, d->rotary_dim);
                const int64_t at = (row0 + b) * row_stride + (j * max_len + pos[b]) * hd;
                kv_put(kl + at, q + ko + j * hd, hd);
                kv_put(vl + at, q + vo + j * hd, hd);
            }
        }
        attention_step(qkv, stride, kl, vl, B, pos, row0, nh, nh, hd, max_len, maxpos, sc, att, nthreads);
        run_linear(L.out, att, B, t1, gemv, nthreads);
        run_linear(L.fc_in, h, B, f, gemv, nthreads);
        gelu_tanh(f, B * I, ef);
        run_linear(L.fc_out, f, B, t2, gemv, nthreads);
        for (int64_t i = 0; i < B * H; ++i) x[i] += t1[i] + t2[i];
    }
}

// One decode step of all GPT-J layers for B rows, as gq_llama_decode (cos/sin [B, head_dim],
// pairs repeated; kc/vc float32 or bfloat16 as d->cache_bf16 says).
extern "C" int gq_gptj_decode(const GqGptjLayer* layers, const GqGptjDims* d, float* x, int64_t B, const int64_t* pos,
                              const float* cos_t, const float* sin_t, void* kc, void* vc, int64_t cache_rows,
                              int64_t row0, int64_t max_len, void* scratch, int nthreads) {
    const int64_t maxpos = max_position(pos, B, row0, cache_rows, max_len);
    if (maxpos < 0) return -1;
    if (d->cache_bf16)
        gptj_layers(layers, d, x, B, pos, maxpos, cos_t, sin_t, (uint16_t*)kc, (uint16_t*)vc, cache_rows, row0,
                    max_len, scratch, nthreads);
    else
        gptj_layers(layers, d, x, B, pos, maxpos, cos_t, sin_t, (float*)kc, (float*)vc, cache_rows, row0, max_len,
                    scratch, nthreads);
    return 0;
}
"""


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("bits", ctypes.c_int32)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]  # fmt: skip


class _Dims(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("n_kv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("eps", ctypes.c_float)]  # fmt: skip


class _GptjLayer(ctypes.Structure):
    _fields_ = [("ln_w", ctypes.c_void_p), ("ln_b", ctypes.c_void_p), ("q", _Linear), ("k", _Linear),
                ("v", _Linear), ("out", _Linear), ("fc_in", _Linear), ("fc_out", _Linear)]  # fmt: skip


class _GptjDims(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("rotary_dim", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("eps", ctypes.c_float), ("cache_bf16", ctypes.c_int32)]  # fmt: skip


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for arch in ("llama", "gptj"):
        scratch, step = getattr(lib, f"gq_{arch}_decode_scratch"), getattr(lib, f"gq_{arch}_decode")
        scratch.argtypes, scratch.restype = [p, i64, i64, i32], i64
        step.argtypes, step.restype = [p, p, p, i64, p, p, p, p, p, i64, i64, i64, p, i32], i32
    return lib


_lib: ctypes.CDLL | None = None
_lib_tried = False
_lib_lock = threading.Lock()


def native_library() -> ctypes.CDLL | None:
    """The decode library (quant's kernels and the code above, built on first call), or None."""
    global _lib, _lib_tried
    if not _lib_tried:
        with _lib_lock:
            if not _lib_tried:
                if quant.native_kernel() is not None:  # the same conditions (and switch) as quant's kernels
                    _lib = quant.load_native(quant._KERNEL_SRC + _DECODE_SRC, "llama_decode", _setup,
                                             "decode steps stay in torch")  # fmt: skip
                _lib_tried = True
    return _lib


def enabled() -> bool:
    return os.environ.get("GPTJ_FAST_DECODE", "1") != "0"


class _Plan:
    """What one model's decode steps pass to C++: pointers to every layer's weights (the
    tensors are held here, so they outlive the pointers), and reused scratch per thread."""

    arch = ""
    cache_dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib, self.tensors = lib, []
        self.local = threading.local()
        self.step = getattr(lib, f"gq_{self.arch}_decode")
        self._scratch = getattr(lib, f"gq_{self.arch}_decode_scratch")

    def _float(self, t: Tensor, n: int) -> int:
        """A pointer to t as float32 (converted once where it is not: a bf16 model's norms)."""
        if t.device.type != "cpu" or t.shape != (n,) or not t.dtype.is_floating_point:
            raise _Unsupported
        t = t.detach().to(torch.float32).contiguous()
        self.tensors.append(t)
        return t.data_ptr()

    def _linear(self, m: nn.Module | None, k: int, n: int) -> _Linear:
        if not isinstance(m, QuantizedLinear) or (m.in_features, m.out_features) != (k, n):
            raise _Unsupported
        if m.qweight.device.type != "cpu" or not m._kernel_fits():
            raise _Unsupported
        mins = m.mins if m.mode == "int4" else None
        self.tensors += [t for t in (m.qweight, m.scales, mins) if t is not None]
        bias = self._float(m.bias, n) if m.bias is not None else None
        bits = 8 if m.mode == "int8" else 4
        return _Linear(m.qweight.data_ptr(), m.scales.data_ptr(), quant._ptr(mins), bias, n, k, bits)

    def scratch(self, rows: int, max_len: int, threads: int) -> int:
        need = self._scratch(self.dims_ptr, rows, max_len, threads)
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < need:
            buf = self.local.buf = torch.empty(need, dtype=torch.uint8)
        return buf.data_ptr()


class _LlamaPlan(_Plan):
    arch = "llama"

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        super().__init__(lib)
        cfg = model.config
        hd = cfg.head_dim or cfg.hidden_size // cfg.n_head
        if cfg.n_head % cfg.n_kv_heads or hd % 2:
            raise _Unsupported
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layer, cfg.n_kv_heads, hd
        self.dims = _Dims(cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.n_kv_heads, hd, cfg.intermediate_size,
                          cfg.rms_norm_eps)  # fmt: skip
        self.layers = (_Layer * cfg.n_layer)()
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            entry = self.layers[i]
            entry.ln1 = self._float(block.input_layernorm.weight, cfg.hidden_size)
            entry.ln2 = self._float(block.post_attention_layernorm.weight, cfg.hidden_size)
            qkv_out = (cfg.n_head + 2 * cfg.n_kv_heads) * hd
            entry.qkv = self._linear(attn.qkv_proj, cfg.hidden_size, qkv_out)
            entry.o = self._linear(attn.o_proj, cfg.n_head * hd, cfg.hidden_size)
            entry.gate_up = self._linear(mlp.gate_up_proj, cfg.hidden_size, 2 * cfg.intermediate_size)
            entry.down = self._linear(mlp.down_proj, cfg.intermediate_size, cfg.hidden_size)
        self.layers_ptr, self.dims_ptr = ctypes.addressof(self.layers), ctypes.addressof(self.dims)


class _GptjPlan(_Plan):
    arch = "gptj"
    cache_dtypes = (torch.float32, torch.bfloat16)

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        super().__init__(lib)
        cfg = model.config
        d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.n_inner or 4 * cfg.n_embd
        if cfg.rotary_dim % 2:
            raise _Unsupported
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layer, cfg.n_head, hd
        self.dims = _GptjDims(cfg.n_layer, d, cfg.n_head, hd, cfg.rotary_dim, inner, cfg.layer_norm_epsilon, 0)
        self.layers = (_GptjLayer * cfg.n_layer)()
        for i, block in enumerate(model.transformer.h):
            attn, mlp = block.attn, block.mlp
            entry = self.layers[i]
            entry.ln_w = self._float(block.ln_1.weight, d)
            entry.ln_b = self._float(block.ln_1.bias, d)
            if attn.qkv_proj is not None:  # fused: k and v stay empty
                entry.q = self._linear(attn.qkv_proj, d, 3 * d)
            else:
                entry.q, entry.k, entry.v = (self._linear(m, d, d) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            entry.out = self._linear(attn.out_proj, d, d)
            entry.fc_in = self._linear(mlp.fc_in, d, inner)
            entry.fc_out = self._linear(mlp.fc_out, inner, d)
        self.layers_ptr, self.dims_ptr = ctypes.addressof(self.layers), ctypes.addressof(self.dims)


class _Unsupported(Exception):
    pass


# model -> (what the plan was made from, the plan or None); kept beside the model, not in it, so
# that copying or pickling a model never meets ctypes objects
_plans: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], _Plan | None]] = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module) -> tuple[int, ...] | None:
    """What identifies the layers a plan points into (None: no layers)."""
    if getattr(model, "architecture", None) == "llama":
        layers = model.model.layers
        if not len(layers):
            return None
        return id(layers[0].self_attn.qkv_proj), id(layers[-1].mlp.down_proj), layers[0].input_layernorm.weight.data_ptr()
    if getattr(model, "architecture", None) == "gptj":
        blocks = model.transformer.h
        if not len(blocks):
            return None
        attn = blocks[0].attn
        first = attn.qkv_proj if attn.qkv_proj is not None else attn.q_proj
        return id(first), id(blocks[-1].mlp.fc_out), blocks[0].ln_1.weight.data_ptr()
    return None


def _plan(model: nn.Module) -> _Plan | None:
    """The model's plan, made on first use (None where the fast path cannot serve it). Made again
    when the layers were replaced (e.g. by fuse_projections)."""
    key = _plan_key(model)
    if key is None:
        return None
    held = _plans.get(model)
    if held is not None and held[0] == key:
        return held[1]
    plan = None
    lib = native_library()
    if lib is not None:
        try:
            plan = (_LlamaPlan if model.architecture == "llama" else _GptjPlan)(model, lib)
        except _Unsupported:
            plan = None
    _plans[model] = (key, plan)
    return plan


def decode_blocks(
    model: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVCache, rows: slice
) -> bool:
    """Runs every block of `model` (a Llama or a GPT-J) on x [B, 1, hidden] in place for one
    decode step, writing keys and values into `cache` as the torch path does. cos/sin: the
    model's rotary tables in float32. False (nothing changed) where this path does not serve:
    the caller then runs the blocks in torch."""
    if x.dim() != 3 or x.shape[1] != 1 or x.device.type != "cpu" or not enabled():
        return False
    if x.requires_grad or not x.is_contiguous() or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    plan = _plan(model)
    if plan is None:
        return False
    batch = x.shape[0]
    k, v = cache.k, cache.v
    shape = (plan.n_layers, cache.n_rows, plan.n_kv, cache.max_len, plan.head_dim)
    if k.dtype not in plan.cache_dtypes or v.dtype != k.dtype or k.device.type != "cpu" or k.shape != shape:
        return False
    if v.shape != shape or not (k.is_contiguous() and v.is_contiguous()):
        return False
    start, stop, step = rows.indices(cache.n_rows)
    limit = int(os.environ.get("GPTJ_QUANT_DECODE_MAX_ROWS", min(quant.DECODE_MAX_ROWS.values())))
    if step != 1 or stop - start != batch or batch > limit:
        return False
    pos = positions.reshape(-1)
    if pos.numel() != batch or pos.device.type != "cpu":
        return False
    pos = pos.to(torch.int64).contiguous()
    hd = plan.head_dim
    for t in (cos, sin):
        if t.numel() != batch * hd or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    if isinstance(plan, _GptjPlan):
        plan.dims.cache_bf16 = int(k.dtype == torch.bfloat16)
    # the residual stream runs in float32 here (a bf16 model's is rounded back afterwards)
    xf = x if x.dtype == torch.float32 else x.float()
    threads = torch.get_num_threads()
    scratch = plan.scratch(batch, cache.max_len, threads)
    rc = plan.step(
        plan.layers_ptr, plan.dims_ptr, xf.data_ptr(), batch, pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        k.data_ptr(), v.data_ptr(), cache.n_rows, start, cache.max_len, scratch, threads,
    )  # fmt: skip
    if rc == 0 and xf is not x:
        x.copy_(xf)
    return rc == 0
