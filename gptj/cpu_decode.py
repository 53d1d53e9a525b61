"""One decode step of every Llama block in one C++ call, on the CPU (as llama.cpp does).

At batch 1 the bundled 135M model spends far more time dispatching small torch ops (RMSNorm,
rotary, views, cache writes, SDPA, residual adds, silu * mul: ~100 per layer at 1.5-4 us
each) than in its GEMVs. Here one call runs, for each layer and each of the B rows (T = 1):

    h = rms_norm(x) -> qkv GEMV -> rotary on q, k -> k, v into the cache at the row's position
    -> attention over positions 0..pos (GQA, softmax in float32) -> o GEMV -> x += ...
    -> rms_norm -> gate_up GEMV -> silu(gate) * up -> down GEMV -> x += ...

with x [B, hidden] float32 updated in place. The GEMVs are quant.py's kernels (its source is
compiled into this library); attention runs in parallel with OpenMP over (row, kv head with
its query heads, chunk of keys). The rotary tables are the torch path's own (`rotary_tables`).

Results equal the torch path's up to float rounding; but the GEMV kernel quantizes its input
to int8, so a one-ulp difference can round an activation the other way, and in a deep model
such differences grow: the logits then differ as much as the torch path's own do when its
input is nudged by one ulp (tests/test_cpu_decode.py). Bundled model, 2 cores: 24 -> 7 ms per
token (int8), 23 -> 5-6 ms (int4), through the engine (benchmarks/bench_bundled.py).

Served: Llama models on the CPU whose linears are all fused QuantizedLinear layers (int8, or
int4 in groups of 32) the kernel takes, float32 activations and a float32 KV cache, at most
quant.DECODE_MAX_ROWS rows. Anything else (prefill, float or bf16 weights, CUDA, no cache,
another cache dtype, no compiler) keeps the torch path: `decode_blocks` returns False and has
changed nothing. GPTJ_FAST_DECODE=0 turns it off.
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
    int32_t qb;          // int8: the activation block
};
struct GqLayer {
    const float* ln1;  // input_layernorm
    const float* ln2;  // post_attention_layernorm
    GqLinear qkv, o, gate_up, down;
};

static void run_linear(const GqLinear& L, const float* x, int64_t M, float* y, void* scratch, int nthreads) {
    if (L.bits == 8)
        gq_linear_int8((const int8_t*)L.w, (const float*)L.scales, L.bias, L.n, L.k, L.qb, x, M, y, scratch, nthreads);
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

// e^x for x <= 0 (Cephes' expf: |rel. error| < 2e-7); below -87 it gives ~1e-38, not 0
#if GQ_ISA == 3
#define EW 16
static inline void exp_block(float* p) {
    __m512 x = _mm512_max_ps(_mm512_loadu_ps(p), _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    _mm512_storeu_ps(p, _mm512_mul_ps(q, _mm512_castsi512_ps(e)));
}
#else
#define EW 8
static inline void exp_block(float* p) {
    __m256 x = _mm256_max_ps(_mm256_loadu_ps(p), _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_set1_ps(1.9875691500e-4f);
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
    q = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(p, _mm256_mul_ps(q, _mm256_castsi256_ps(e)));
}
#endif

static inline void exp_inplace(float* s, int64_t n) {  // s[j] = e^s[j], s[j] <= 0
    int64_t j = 0;
    for (; j + EW <= n; j += EW) exp_block(s + j);
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

// any head_dim. q: G heads, stride hd; o: stride os
static void attend_any(const float* q, int G, int64_t hd, const float* K, const float* V, int64_t n, float scale,
                       float* s, float* o, int64_t os, float* m, float* l, int64_t ms) {
    for (int t = 0; t < G; ++t)
        for (int64_t j = 0; j < n; ++j) {
            const float *qt = q + t * hd, *kj = K + j * hd;
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < hd; ++i) d += qt[i] * kj[i];
            s[t * n + j] = d * scale;
        }
    chunk_softmax(s, G, n, m, l, ms);
    for (int t = 0; t < G; ++t) {
        float* ot = o + t * os;
        for (int64_t i = 0; i < hd; ++i) ot[i] = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            const float *vj = V + j * hd, p = s[t * n + j];
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) ot[i] += p * vj[i];
        }
    }
}

// head_dim = NV float vectors: the G heads' queries and outputs stay in registers
#if GQ_ISA == 3
#define FW 16
static inline vf vf_ld(const float* p) { return _mm512_loadu_ps(p); }
static inline void vf_st(float* p, vf a) { _mm512_storeu_ps(p, a); }
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
static inline void vf_st(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline __m128 vf_sum4(const vf* a) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif
template <int NV, int G>
static void attend_v(const float* q, const float* K, const float* V, int64_t n, float scale, float* s, float* o,
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

template <int NV>
static bool attend_nv(const float* q, int G, const float* K, const float* V, int64_t n, float scale, float* s,
                      float* o, int64_t os, float* m, float* l, int64_t ms) {
    switch (G) {
        case 1: attend_v<NV, 1>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 2: attend_v<NV, 2>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 3: attend_v<NV, 3>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
        case 4: attend_v<NV, 4>(q, K, V, n, scale, s, o, os, m, l, ms); return true;
    }
    return false;
}

// n >= 1 keys
static void attend_chunk(const float* q, int G, int64_t hd, const float* K, const float* V, int64_t n, float scale,
                         float* s, float* o, int64_t os, float* m, float* l, int64_t ms) {
    bool done = false;
    switch (hd) {
        case FW: done = attend_nv<1>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 2 * FW: done = attend_nv<2>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 4 * FW: done = attend_nv<4>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 8 * FW: done = attend_nv<8>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
    }
    if (!done) attend_any(q, G, hd, K, V, n, scale, s, o, os, m, l, ms);
}

static inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

struct GqDecodeDims {
    int64_t n_layers, hidden, n_head, n_kv, head_dim, inter;
    float eps;
};

#define ATT_G 4            // query heads per task, at most
#define ATT_MIN_CHUNK 256  // keys: shorter chunks cost more to combine than they save

// chunks per (row, kv head) at most: enough tasks for 4 per thread
static int64_t max_chunks(int64_t B, int64_t nkv, int nthreads) {
    const int64_t c = (4 * nthreads + B * nkv - 1) / (B * nkv);
    return c > 1 ? c : 1;
}

extern "C" int64_t gq_llama_decode_scratch(const GqDecodeDims* d, int64_t B, int64_t max_len, int nthreads) {
    const int64_t qkv = (d->n_head + 2 * d->n_kv) * d->head_dim, att = d->n_head * d->head_dim;
    int64_t kmax = d->hidden > att ? d->hidden : att;
    kmax = kmax > d->inter ? kmax : d->inter;
    const int64_t parts = B * d->n_head * max_chunks(B, d->n_kv, nthreads);
    const int64_t f = align64(B * d->hidden) * 2 + align64(B * qkv) + align64(B * att) + align64(B * 2 * d->inter) +
                      align64(B * d->inter) + ATT_G * align64(max_len) * nthreads + align64(parts * d->head_dim) +
                      2 * align64(parts);
    return f * 4 + align64(B * kmax + 8 * B * (kmax / 32)) + 64;
}

// One decode step of all layers for B rows; x [B, hidden] in place. Row b is cache row row0 + b
// at position pos[b]; cos/sin [B, head_dim]; kc/vc [n_layers, cache_rows, n_kv, max_len, head_dim].
// Returns 0, or -1 (having changed nothing) where a row or a position is outside the cache.
extern "C" int gq_llama_decode(const GqLayer* layers, const GqDecodeDims* d, float* x, int64_t B, const int64_t* pos,
                               const float* cos_t, const float* sin_t, float* kc, float* vc, int64_t cache_rows,
                               int64_t row0, int64_t max_len, void* scratch, int nthreads) {
    if (row0 < 0 || row0 + B > cache_rows) return -1;
    int64_t maxpos = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
        maxpos = pos[b] > maxpos ? pos[b] : maxpos;
    }
    const int64_t H = d->hidden, nh = d->n_head, nkv = d->n_kv, hd = d->head_dim, I = d->inter;
    const int64_t qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd, group = nh / nkv;
    const float scale = 1.f / sqrtf((float)hd);
    float* h = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float* t = h + align64(B * H);
    float* qkv = t + align64(B * H);
    float* att = qkv + align64(B * qkv_w);
    float* gu = att + align64(B * att_w);
    float* act = gu + align64(B * 2 * I);
    float* scores = act + align64(B * I);
    const int64_t parts = B * nh * max_chunks(B, nkv, nthreads);
    float* po = scores + ATT_G * align64(max_len) * nthreads;
    float* pm = po + align64(parts * hd);
    float* pl = pm + align64(parts);
    void* gemv = pl + align64(parts);
    const int64_t row_stride = nkv * max_len * hd, layer_stride = cache_rows * row_stride;
    // attention in parallel only where it outweighs waking the threads; keys in C chunks of
    // `chunk` per (row, kv head) where that gives the threads more tasks
    const bool par = B * nh * (maxpos + 1) * hd >= 32768;
    int64_t C = par ? max_chunks(B, nkv, nthreads) : 1;
    C = C < (maxpos + 1) / ATT_MIN_CHUNK ? C : (maxpos + 1) / ATT_MIN_CHUNK > 1 ? (maxpos + 1) / ATT_MIN_CHUNK : 1;
    const int64_t chunk = (maxpos + 1 + C - 1) / C, hg = (group + ATT_G - 1) / ATT_G;
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
            attend_chunk(qkv + b * qkv_w + h0 * hd, G, hd, kl + at, vl + at, j1 - j0, scale,
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
"""


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("qb", ctypes.c_int32)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]  # fmt: skip


class _Dims(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("n_kv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("eps", ctypes.c_float)]  # fmt: skip


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gq_llama_decode_scratch.argtypes = [p, i64, i64, i32]
    lib.gq_llama_decode_scratch.restype = i64
    lib.gq_llama_decode.argtypes = [p, p, p, i64, p, p, p, p, p, i64, i64, i64, p, i32]
    lib.gq_llama_decode.restype = i32
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

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        hd = cfg.head_dim or cfg.hidden_size // cfg.n_head
        if cfg.n_head % cfg.n_kv_heads or hd % 2:
            raise _Unsupported
        self.lib, self.tensors = lib, []
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
        self.local = threading.local()

    def _float(self, t: Tensor, n: int) -> int:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != (n,):
            raise _Unsupported
        self.tensors.append(t)
        return t.data_ptr()

    def _linear(self, m: nn.Module | None, k: int, n: int) -> _Linear:
        if not isinstance(m, QuantizedLinear) or (m.in_features, m.out_features) != (k, n):
            raise _Unsupported
        if m.qweight.device.type != "cpu" or not m._kernel_fits():
            raise _Unsupported
        parts = [m.qweight, m.scales, m.mins if m.mode == "int4" else None]
        if m.bias is not None:
            self._float(m.bias, n)
        self.tensors += [t for t in parts if t is not None]
        bits = 8 if m.mode == "int8" else 4
        qb = quant._int8_block(k) if bits == 8 else 32
        return _Linear(m.qweight.data_ptr(), m.scales.data_ptr(), quant._ptr(parts[2]), quant._ptr(m.bias),
                       n, k, bits, qb)  # fmt: skip

    def scratch(self, rows: int, max_len: int, threads: int) -> int:
        need = self.lib.gq_llama_decode_scratch(self.dims_ptr, rows, max_len, threads)
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < need:
            buf = self.local.buf = torch.empty(need, dtype=torch.uint8)
        return buf.data_ptr()


class _Unsupported(Exception):
    pass


# model -> (what the plan was made from, the plan or None); kept beside the model, not in it, so
# that copying or pickling a model never meets ctypes objects
_plans: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], _Plan | None]] = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> _Plan | None:
    """The model's plan, made on first use (None where the fast path cannot serve it). Made again
    when the layers were replaced (e.g. by fuse_projections)."""
    layers = model.model.layers
    if not len(layers):
        return None
    key = (id(layers[0].self_attn.qkv_proj), id(layers[-1].mlp.down_proj), layers[0].input_layernorm.weight.data_ptr())
    held = _plans.get(model)
    if held is not None and held[0] == key:
        return held[1]
    plan = None
    lib = native_library()
    if lib is not None:
        try:
            plan = _Plan(model, lib)
        except _Unsupported:
            plan = None
    _plans[model] = (key, plan)
    return plan


def decode_blocks(
    model: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVCache, rows: slice
) -> bool:
    """Runs every block of `model` (a Llama) on x [B, 1, hidden] in place for one decode step,
    writing keys and values into `cache` as the torch path does. False (nothing changed) where
    this path does not serve: the caller then runs the blocks in torch."""
    if x.dim() != 3 or x.shape[1] != 1 or x.device.type != "cpu" or x.dtype != torch.float32 or not enabled():
        return False
    if x.requires_grad or not x.is_contiguous():
        return False
    plan = _plan(model)
    if plan is None:
        return False
    batch = x.shape[0]
    k, v = cache.k, cache.v
    shape = (plan.n_layers, cache.n_rows, plan.n_kv, cache.max_len, plan.head_dim)
    if k.dtype != torch.float32 or v.dtype != torch.float32 or k.device.type != "cpu" or k.shape != shape:
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
    threads = torch.get_num_threads()
    scratch = plan.scratch(batch, cache.max_len, threads)
    rc = plan.lib.gq_llama_decode(
        plan.layers_ptr, plan.dims_ptr, x.data_ptr(), batch, pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        k.data_ptr(), v.data_ptr(), cache.n_rows, start, cache.max_len, scratch, threads,
    )  # fmt: skip
    return rc == 0
