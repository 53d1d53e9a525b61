// The decode step of decode.h: for each layer and each of the B entries (a token of a cache row),
// in one call, as llama.cpp does (at batch 1 a small model spends more time dispatching small
// torch ops than in its GEMVs). Attention runs in parallel with OpenMP over (entry, kv head with
// its query heads, chunk of keys), reading a float32 or (GPT-J) bfloat16 cache.
#include "decode.h"

#include <math.h>
#include <omp.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

#include "gemv.h"
#include "simd.h"

namespace gq {

static void run_linear(const Linear& L, const float* x, int64_t M, float* y, void* scratch, int nthreads) {
    if (L.bits == 8)
        linear_int8((const int8_t*)L.w, L.scales, L.bias, L.n, L.k, x, M, y, scratch, nthreads);
    else
        linear_int4((const uint8_t*)L.w, L.bias, L.n, L.k, x, M, y, scratch, nthreads);
}

// ---------------------------------------------------------------- norms, rotary, activations
// The row-wise steps between the GEMVs split their rows between the threads where a prompt's
// chunk gives them enough values (a decode row stays on one thread); each row is computed alone,
// so the bits do not depend on the split or on the rows beside it.
constexpr int64_t PAR_VALUES = 1 << 16;

static void rms_norm_rows(const float* x, const float* w, int64_t M, int64_t H, float eps, float* out,
                          int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * H >= PAR_VALUES)
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

// x += a, or x += a + b (the sum of a and b taken first)
static void add_rows(float* x, const float* a, const float* b, int64_t n, int nthreads) {
    if (b) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads) if (n >= PAR_VALUES)
        for (int64_t i = 0; i < n; ++i) x[i] += a[i] + b[i];
    } else {
#pragma omp parallel for simd schedule(static) num_threads(nthreads) if (n >= PAR_VALUES)
        for (int64_t i = 0; i < n; ++i) x[i] += a[i];
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
static inline float kv_f(uint16_t v) { return bf16_to_float(v); }
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

// Attention's loops do a few FMAs per vector of keys or values they load: too few loads in flight
// for one core's demand misses and the hardware prefetcher to stream the cache from memory. So
// each asks for the rows it will read ATT_AHEAD bytes on (the prefetches past a chunk's end are
// the next chunk's rows, or dropped: a prefetch never faults).
constexpr int64_t ATT_AHEAD = 4096;
template <typename CT>
static inline void prefetch_rows(const CT* row, int64_t rows, int64_t hd) {
    for (int64_t off = 0; off < rows * hd * (int64_t)sizeof(CT); off += 64)
        _mm_prefetch((const char*)row + off, _MM_HINT_T0);
}
template <typename CT>
constexpr int64_t rows_ahead(int64_t hd) {
    return (ATT_AHEAD + hd * (int64_t)sizeof(CT) - 1) / (hd * (int64_t)sizeof(CT));
}

// The scores of keys [j, n) for G query heads (q: G heads of NV float vectors), s[t * ss + j] =
// (q_t . k_j) * scale: four keys at a time (4G independent FMA chains, one reduction), then one by
// one. attend_v and attend_tile's rests both take it, so a key's score has the same bits in each.
template <int NV, int G, typename CT>
static inline void head_scores(const float* q, const CT* K, int64_t j, int64_t n, float scale, float* s,
                               int64_t ss) {
    constexpr int64_t hd = NV * FW;
    vf qv[G][NV];
    for (int t = 0; t < G; ++t)
        for (int i = 0; i < NV; ++i) qv[t][i] = vf_ld(q + t * hd + i * FW);
    for (; j + 4 <= n; j += 4) {
        prefetch_rows(K + (j + rows_ahead<CT>(hd)) * hd, 4, hd);
        vf a[G][4];
        for (int t = 0; t < G; ++t) a[t][0] = a[t][1] = a[t][2] = a[t][3] = vf_zero();
        for (int i = 0; i < NV; ++i)
            for (int u = 0; u < 4; ++u) {
                const vf k = vf_ld(K + (j + u) * hd + i * FW);
                for (int t = 0; t < G; ++t) a[t][u] = vf_fma(qv[t][i], k, a[t][u]);
            }
        for (int t = 0; t < G; ++t)
            _mm_storeu_ps(s + t * ss + j, _mm_mul_ps(vf_sum4(a[t]), _mm_set1_ps(scale)));
    }
    for (; j < n; ++j) {
        vf a[G];
        for (int t = 0; t < G; ++t) a[t] = vf_zero();
        for (int i = 0; i < NV; ++i) {
            const vf k = vf_ld(K + j * hd + i * FW);
            for (int t = 0; t < G; ++t) a[t] = vf_fma(qv[t][i], k, a[t]);
        }
        for (int t = 0; t < G; ++t) s[t * ss + j] = vf_sum(a[t]) * scale;
    }
}

// head_dim = NV float vectors: the G heads' queries and outputs stay in registers
template <int NV, int G, typename CT>
static void attend_v(const float* q, const CT* K, const CT* V, int64_t n, float scale, float* s, float* o,
                     int64_t os, float* m, float* l, int64_t ms) {
    constexpr int64_t hd = NV * FW;
    head_scores<NV, G>(q, K, 0, n, scale, s, n);
    chunk_softmax(s, G, n, m, l, ms);
    vf acc[G][NV];
    for (int t = 0; t < G; ++t)
        for (int i = 0; i < NV; ++i) acc[t][i] = vf_zero();
    for (int64_t j = 0; j < n; ++j) {
        prefetch_rows(V + (j + rows_ahead<CT>(hd)) * hd, 1, hd);
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
// head_dim as a number of whole vectors that attend_v takes (GPT-J-6B's 256: 16 with AVX-512,
// 32 with AVX2, whose query then spills to the stack, which L1 serves), else 0: attend_any
static inline int head_vectors(int64_t hd) {
    for (int nv = 1; nv <= 32; nv *= 2)
        if (hd == nv * FW) return nv;
    return 0;
}

template <typename CT>
static void attend_chunk(const float* q, int G, int64_t hd, const CT* K, const CT* V, int64_t n, float scale,
                         float* s, float* o, int64_t os, float* m, float* l, int64_t ms) {
    bool done = false;
    switch (head_vectors(hd)) {
        case 1: done = attend_nv<1>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 2: done = attend_nv<2>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 4: done = attend_nv<4>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 8: done = attend_nv<8>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 16: done = attend_nv<16>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
        case 32: done = attend_nv<32>(q, G, K, V, n, scale, s, o, os, m, l, ms); break;
    }
    if (!done) attend_any(q, G, hd, K, V, n, scale, s, o, os, m, l, ms);
}

static inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }
// the first 64-byte boundary in a caller's scratch (the scratch sizes count 64 bytes for it)
static inline float* aligned_floats(void* p) { return (float*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

#define ATT_G 4        // query heads per task, at most
#define ATT_CHUNK 256  // keys per chunk: an entry of n keys has ceil(n / ATT_CHUNK) chunks

// Up to ATT_G consecutive entries of one row (a prompt's chunk), one query head each (kv heads
// not grouped), over one chunk of keys: each key and value is read once for all QT of them,
// where attend_v reads them once per entry. Entry t has n[t] keys (n ascending), its scores at
// s + t * ATT_CHUNK, and gets attend_v<NV, 1>'s operations in its order: the 4-key groups of
// scores the entries share, then each entry's own rest through head_scores; the output summed
// key by key, a few vectors of the head at a time.
template <int NV, int QT, typename CT>
static void attend_tile(const float* const* q, const CT* K, const CT* V, const int64_t* n, float scale,
                        float* s, float* const* o, float* const* m, float* const* l) {
    constexpr int64_t hd = NV * FW;
    constexpr int IB = NV < 4 ? NV : 4;  // vectors of the head per pass over the values
    int64_t j = 0;
    for (; j + 4 <= n[0]; j += 4) {
        prefetch_rows(K + (j + rows_ahead<CT>(hd)) * hd, 4, hd);
        vf a[QT][4];
        for (int t = 0; t < QT; ++t) a[t][0] = a[t][1] = a[t][2] = a[t][3] = vf_zero();
        for (int i = 0; i < NV; ++i) {
            vf k[4];
            for (int u = 0; u < 4; ++u) k[u] = vf_ld(K + (j + u) * hd + i * FW);
            for (int t = 0; t < QT; ++t) {
                const vf qv = vf_ld(q[t] + i * FW);
                for (int u = 0; u < 4; ++u) a[t][u] = vf_fma(qv, k[u], a[t][u]);
            }
        }
        for (int t = 0; t < QT; ++t)
            _mm_storeu_ps(s + t * ATT_CHUNK + j, _mm_mul_ps(vf_sum4(a[t]), _mm_set1_ps(scale)));
    }
    for (int t = 0; t < QT; ++t) {
        head_scores<NV, 1>(q[t], K, j, n[t], scale, s + t * ATT_CHUNK, 0);
        chunk_softmax(s + t * ATT_CHUNK, 1, n[t], m[t], l[t], 1);
    }
    for (int i0 = 0; i0 < NV; i0 += IB) {
        vf acc[QT][IB];
        for (int t = 0; t < QT; ++t)
            for (int i = 0; i < IB; ++i) acc[t][i] = vf_zero();
        for (j = 0; j < n[QT - 1]; ++j) {
            if (i0 == 0) prefetch_rows(V + (j + rows_ahead<CT>(hd)) * hd, 1, hd);  // later passes: from L2
            vf v[IB];
            for (int i = 0; i < IB; ++i) v[i] = vf_ld(V + j * hd + (i0 + i) * FW);
            for (int t = 0; t < QT; ++t) {
                if (j >= n[t]) continue;  // only in the last few keys: n differs by one from entry to entry
                const vf p = vf_set(s[t * ATT_CHUNK + j]);
                for (int i = 0; i < IB; ++i) acc[t][i] = vf_fma(p, v[i], acc[t][i]);
            }
        }
        for (int t = 0; t < QT; ++t)
            for (int i = 0; i < IB; ++i) vf_st(o[t] + (i0 + i) * FW, acc[t][i]);
    }
}

// The tile of `count` (2..ATT_G) entries whose heads are NV vectors (head_vectors)
template <int NV, typename CT>
static void attend_tile_n(int count, const float* const* q, const CT* K, const CT* V, const int64_t* n,
                          float scale, float* s, float* const* o, float* const* m, float* const* l) {
    switch (count) {
        case 2: attend_tile<NV, 2>(q, K, V, n, scale, s, o, m, l); break;
        case 3: attend_tile<NV, 3>(q, K, V, n, scale, s, o, m, l); break;
        default: attend_tile<NV, 4>(q, K, V, n, scale, s, o, m, l); break;
    }
}

template <typename CT>
static void attend_tile_any(int nv, int count, const float* const* q, const CT* K, const CT* V,
                            const int64_t* n, float scale, float* s, float* const* o, float* const* m,
                            float* const* l) {
    switch (nv) {
        case 1: attend_tile_n<1>(count, q, K, V, n, scale, s, o, m, l); break;
        case 2: attend_tile_n<2>(count, q, K, V, n, scale, s, o, m, l); break;
        case 4: attend_tile_n<4>(count, q, K, V, n, scale, s, o, m, l); break;
        case 8: attend_tile_n<8>(count, q, K, V, n, scale, s, o, m, l); break;
        case 16: attend_tile_n<16>(count, q, K, V, n, scale, s, o, m, l); break;
        default: attend_tile_n<32>(count, q, K, V, n, scale, s, o, m, l); break;
    }
}

// Chunks per (entry, kv head): a function of the entry's own key count only, so that its
// attention is the same float operations whatever else is in the step and however many threads
// run it (a token's logits do not depend on its batch, nor on how many tokens a step takes).
static inline int64_t n_chunks(int64_t n) { return (n + ATT_CHUNK - 1) / ATT_CHUNK; }

// The largest of the B entries' positions, or -1 where an entry's row or position lies outside
// the cache.
static int64_t max_position(const int64_t* pos, const int64_t* rows, int64_t B, int64_t cache_rows,
                            int64_t max_len) {
    int64_t maxpos = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (rows[b] < 0 || rows[b] >= cache_rows || pos[b] < 0 || pos[b] >= max_len) return -1;
        maxpos = pos[b] > maxpos ? pos[b] : maxpos;
    }
    return maxpos;
}

// Attention's scratch (scores: ATT_G * ATT_CHUNK per thread; po, pm, pl: per part, B * nh *
// n_chunks(max_len) parts) from `at` on, then the GEMV kernel's.
struct AttnScratch {
    float *scores, *po, *pm, *pl;
    void* gemv;
};
static AttnScratch attn_scratch(float* at, int64_t B, int64_t nh, int64_t hd, int64_t max_len, int nthreads) {
    const int64_t parts = B * nh * n_chunks(max_len);
    AttnScratch a;
    a.scores = at;
    a.po = a.scores + ATT_G * ATT_CHUNK * nthreads;
    a.pm = a.po + align64(parts * hd);
    a.pl = a.pm + align64(parts);
    a.gemv = a.pl + align64(parts);
    return a;
}
// bytes: attention's floats, the GEMV kernel's scratch for B rows of up to kmax inputs, alignment
static int64_t attn_gemv_scratch_bytes(int64_t B, int64_t nh, int64_t hd, int64_t max_len, int64_t kmax,
                                       int nthreads) {
    const int64_t parts = B * nh * n_chunks(max_len);
    const int64_t floats = ATT_G * ATT_CHUNK * nthreads + align64(parts * hd) + 2 * align64(parts);
    return floats * 4 + align64(linear_scratch_bytes(B, kmax)) + 64;
}

// Attention of B entries (one token each) over their cache rows: entry b is a query at position
// pos[b] of cache row rows[b], over keys 0..pos[b] (entries of one row at later positions see
// the keys the earlier ones wrote). q: entry b's query heads at q + b * q_stride; kl, vl: one
// layer's cache [cache_rows, nkv, max_len, hd]; att [B, nh * hd].
template <typename CT>
static void attention_step(const float* q, int64_t q_stride, const CT* kl, const CT* vl, int64_t B,
                           const int64_t* pos, const int64_t* rows, int64_t nh, int64_t nkv, int64_t hd,
                           int64_t max_len, int64_t maxpos, const AttnScratch& sc, float* att, int nthreads) {
    float *scores = sc.scores, *po = sc.po, *pm = sc.pm, *pl = sc.pl;
    const int64_t group = nh / nkv, row_stride = nkv * max_len * hd;
    const float scale = 1.f / sqrtf((float)hd);
    // in parallel only where it outweighs waking the threads (the results are the same)
    const bool par = B * nh * (maxpos + 1) * hd >= 32768;
    const int64_t C = n_chunks(maxpos + 1), hg = (group + ATT_G - 1) / ATT_G;
    // tiles: runs of up to ATT_G entries of one row at consecutive positions (a prompt's chunk)
    // where a kv head has one query head; else one entry each
    const int nv = group == 1 ? head_vectors(hd) : 0;  // where a lone entry takes attend_v too
    static thread_local std::vector<int64_t> starts;
    starts.clear();
    for (int64_t b = 0; b < B; ++b)
        if (!nv || b == 0 || rows[b] != rows[b - 1] || pos[b] != pos[b - 1] + 1 || b - starts.back() == ATT_G)
            starts.push_back(b);
    starts.push_back(B);
    const int64_t ntiles = (int64_t)starts.size() - 1;
    const int64_t* tile_at = starts.data();
    // tasks: (kv head, batch of up to ATT_G of its query heads, chunk of keys, tile of entries),
    // the tile fastest: the tiles of a prompt's chunk read one chunk of keys and values after
    // another while it is in L2, not all of a head's for each tile
#pragma omp parallel for schedule(dynamic) num_threads(nthreads) if (par)
    for (int64_t task = 0; task < ntiles * nkv * hg * C; ++task) {
        const int64_t tile = task % ntiles, c = task / ntiles % C, hb = task / (ntiles * C) % hg,
                      kvh = task / (ntiles * C * hg);
        const int64_t h0 = kvh * group + hb * ATT_G, j0 = c * ATT_CHUNK;
        const int G = (int)(group - hb * ATT_G < ATT_G ? group - hb * ATT_G : ATT_G);
        float* s = scores + ATT_G * ATT_CHUNK * omp_get_thread_num();
        int64_t b = tile_at[tile];
        while (b < tile_at[tile + 1] && pos[b] + 1 <= j0) ++b;  // entries with no keys in this chunk
        const int count = (int)(tile_at[tile + 1] - b);
        if (!count) continue;
        const int64_t at = rows[b] * row_stride + (kvh * max_len + j0) * hd;
        if (count == 1) {
            const int64_t n = pos[b] + 1, j1 = j0 + ATT_CHUNK < n ? j0 + ATT_CHUNK : n;
            const int64_t pi = (b * nh + h0) * C + c;  // head h0's part; head h0 + t's is C further on
            attend_chunk(q + b * q_stride + h0 * hd, G, hd, kl + at, vl + at, j1 - j0, scale, s, po + pi * hd,
                         C * hd, pm + pi, pl + pi, C);
            continue;
        }
        const float* qt[ATT_G];
        float *ot[ATT_G], *mt[ATT_G], *lt[ATT_G];
        int64_t nt[ATT_G];
        for (int t = 0; t < count; ++t) {
            const int64_t e = b + t, n = pos[e] + 1, pi = (e * nh + h0) * C + c;
            nt[t] = (j0 + ATT_CHUNK < n ? j0 + ATT_CHUNK : n) - j0;
            qt[t] = q + e * q_stride + h0 * hd;
            ot[t] = po + pi * hd;
            mt[t] = pm + pi;
            lt[t] = pl + pi;
        }
        attend_tile_any(nv, count, qt, kl + at, vl + at, nt, scale, s, ot, mt, lt);
    }
    for (int64_t bh = 0; bh < B * nh; ++bh) {  // combine the entry's chunks: softmax over all its keys
        const int64_t pi = bh * C, Cb = n_chunks(pos[bh / nh] + 1);
        float M = -INFINITY, sum = 0.f;
        for (int64_t c = 0; c < Cb; ++c) M = pm[pi + c] > M ? pm[pi + c] : M;
        float* out = att + bh * hd;  // att [B, nh * hd]: entry b, head h at bh * hd
        for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
        for (int64_t c = 0; c < Cb; ++c) {
            const float w = Cb == 1 ? 1.f : expf(pm[pi + c] - M);
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

int64_t attention_scratch(int64_t B, int64_t nh, int64_t hd, int64_t max_len, int nthreads) {
    return attn_gemv_scratch_bytes(B, nh, hd, max_len, 0, nthreads);
}

int attention(const float* q, int64_t B, const int64_t* pos, const int64_t* rows, int64_t nh, int64_t nkv,
              int64_t hd, const void* kl, const void* vl, int32_t bf16, int64_t cache_rows, int64_t max_len,
              float* att, void* scratch, int nthreads) {
    const int64_t maxpos = max_position(pos, rows, B, cache_rows, max_len);
    if (maxpos < 0 || nkv <= 0 || nh % nkv) return -1;
    const AttnScratch sc = attn_scratch(aligned_floats(scratch), B, nh, hd, max_len, nthreads);
    if (bf16)
        attention_step(q, nh * hd, (const uint16_t*)kl, (const uint16_t*)vl, B, pos, rows, nh, nkv, hd,
                       max_len, maxpos, sc, att, nthreads);
    else
        attention_step(q, nh * hd, (const float*)kl, (const float*)vl, B, pos, rows, nh, nkv, hd, max_len,
                       maxpos, sc, att, nthreads);
    return 0;
}

// ---------------------------------------------------------------- the cache's pages
// The KV cache is an anonymous mapping whose pages are faulted in as positions are first
// written. A prompt's chunk writes hundreds of positions of one row, one token after another
// on one thread, while the others wait: its pages are populated up front instead, in one call
// per layer and head, on every thread.
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; elsewhere the call fails and the writes fault as before
#endif
constexpr int64_t POPULATE_MIN_ENTRIES = 64;  // decode steps (a token a row) do not ask

template <typename CT>
static void populate_rows(CT* kc, CT* vc, int64_t n_layers, int64_t nkv, int64_t B, const int64_t* pos,
                          const int64_t* rows, int64_t cache_rows, int64_t max_len, int64_t hd,
                          int nthreads) {
    if (B < POPULATE_MIN_ENTRIES) return;
    const uintptr_t page = 4096;
    for (int64_t b0 = 0, b1; b0 < B; b0 = b1) {  // runs of one row
        int64_t lo = pos[b0], hi = pos[b0];
        for (b1 = b0 + 1; b1 < B && rows[b1] == rows[b0]; ++b1) {
            lo = pos[b1] < lo ? pos[b1] : lo;
            hi = pos[b1] > hi ? pos[b1] : hi;
        }
        if (b1 - b0 < POPULATE_MIN_ENTRIES) continue;
        const int64_t ranges = n_layers * nkv * 2;
#pragma omp parallel for schedule(dynamic) num_threads(nthreads)
        for (int64_t i = 0; i < ranges; ++i) {
            const int64_t l = i / (2 * nkv), j = i / 2 % nkv;
            CT* base = (i % 2 ? vc : kc) + ((l * cache_rows + rows[b0]) * nkv + j) * max_len * hd;
            const uintptr_t a = (uintptr_t)(base + lo * hd) & ~(page - 1);
            const uintptr_t e = ((uintptr_t)(base + (hi + 1) * hd) + page - 1) & ~(page - 1);
            madvise((void*)a, e - a, MADV_POPULATE_WRITE);
        }
    }
}

// ---------------------------------------------------------------- Llama decode step

int64_t llama_decode_scratch(const LlamaDims* d, int64_t B, int64_t max_len, int nthreads) {
    const int64_t qkv = (d->n_head + 2 * d->n_kv) * d->head_dim, att = d->n_head * d->head_dim;
    int64_t kmax = d->hidden > att ? d->hidden : att;
    kmax = kmax > d->inter ? kmax : d->inter;
    const int64_t f = align64(B * d->hidden) * 2 + align64(B * qkv) + align64(B * att) +
                      align64(B * 2 * d->inter) + align64(B * d->inter);
    return f * 4 + attn_gemv_scratch_bytes(B, d->n_head, d->head_dim, max_len, kmax, nthreads);
}

int llama_decode(const LlamaLayer* layers, const LlamaDims* d, float* x, int64_t B, const int64_t* pos,
                 const int64_t* rows, const float* cos_t, const float* sin_t, float* kc, float* vc,
                 int64_t cache_rows, int64_t max_len, void* scratch, int nthreads) {
    const int64_t maxpos = max_position(pos, rows, B, cache_rows, max_len);
    if (maxpos < 0) return -1;
    const int64_t H = d->hidden, nh = d->n_head, nkv = d->n_kv, hd = d->head_dim, I = d->inter;
    const int64_t qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd;
    float* h = aligned_floats(scratch);
    float* t = h + align64(B * H);
    float* qkv = t + align64(B * H);
    float* att = qkv + align64(B * qkv_w);
    float* gu = att + align64(B * att_w);
    float* act = gu + align64(B * 2 * I);
    const AttnScratch sc = attn_scratch(act + align64(B * I), B, nh, hd, max_len, nthreads);
    void* gemv = sc.gemv;
    const int64_t row_stride = nkv * max_len * hd, layer_stride = cache_rows * row_stride;
    populate_rows(kc, vc, d->n_layers, nkv, B, pos, rows, cache_rows, max_len, hd, nthreads);
    for (int64_t l = 0; l < d->n_layers; ++l) {
        const LlamaLayer& L = layers[l];
        rms_norm_rows(x, L.ln1, B, H, d->eps, h, nthreads);
        run_linear(L.qkv, h, B, qkv, gemv, nthreads);
        float* kl = kc + l * layer_stride;
        float* vl = vc + l * layer_stride;
        for (int64_t b = 0; b < B; ++b) {
            float* r = qkv + b * qkv_w;
            const float *c = cos_t + b * hd, *s = sin_t + b * hd;
            for (int64_t j = 0; j < nh + nkv; ++j) rotary(r + j * hd, c, s, hd);  // q heads, then k heads
            for (int64_t j = 0; j < nkv; ++j) {
                const int64_t at = rows[b] * row_stride + (j * max_len + pos[b]) * hd;
                memcpy(kl + at, r + (nh + j) * hd, hd * sizeof(float));
                memcpy(vl + at, r + (nh + nkv + j) * hd, hd * sizeof(float));
            }
        }
        attention_step(qkv, qkv_w, kl, vl, B, pos, rows, nh, nkv, hd, max_len, maxpos, sc, att, nthreads);
        run_linear(L.o, att, B, t, gemv, nthreads);
        add_rows(x, t, nullptr, B * H, nthreads);
        rms_norm_rows(x, L.ln2, B, H, d->eps, h, nthreads);
        run_linear(L.gate_up, h, B, gu, gemv, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (B * I >= PAR_VALUES)
        for (int64_t b = 0; b < B; ++b) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, I, act + b * I);
        run_linear(L.down, act, B, t, gemv, nthreads);
        add_rows(x, t, nullptr, B * H, nthreads);
    }
    return 0;
}

// ---------------------------------------------------------------- GPT-J decode step
// h = layer_norm(x); x += out(attention(rotary(q(h)), rotary(k(h)), v(h))) + fc_out(gelu(fc_in(h)))

static void layer_norm_rows(const float* x, const float* w, const float* b, int64_t M, int64_t H, float eps,
                            float* out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * H >= PAR_VALUES)
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

int64_t gptj_decode_scratch(const GptjDims* d, int64_t B, int64_t max_len, int nthreads) {
    const int64_t H = d->hidden, I = d->inner, kmax = H > I ? H : I;
    const int64_t f = align64(B * H) * 4 + align64(B * 3 * H) + 2 * align64(B * I);
    return f * 4 + attn_gemv_scratch_bytes(B, d->n_head, d->head_dim, max_len, kmax, nthreads);
}

template <typename CT>
static void gptj_layers(const GptjLayer* layers, const GptjDims* d, float* x, int64_t B, const int64_t* pos,
                        const int64_t* rows, int64_t maxpos, const float* cos_t, const float* sin_t, CT* kc,
                        CT* vc, int64_t cache_rows, int64_t max_len, void* scratch, int nthreads) {
    const int64_t H = d->hidden, nh = d->n_head, hd = d->head_dim, I = d->inner;
    float* h = aligned_floats(scratch);
    float* att = h + align64(B * H);
    float* t1 = att + align64(B * H);
    float* t2 = t1 + align64(B * H);
    float* qkv = t2 + align64(B * H);
    float* f = qkv + align64(B * 3 * H);
    float* ef = f + align64(B * I);
    const AttnScratch sc = attn_scratch(ef + align64(B * I), B, nh, hd, max_len, nthreads);
    void* gemv = sc.gemv;
    const int64_t row_stride = nh * max_len * hd, layer_stride = cache_rows * row_stride;
    populate_rows(kc, vc, d->n_layers, nh, B, pos, rows, cache_rows, max_len, hd, nthreads);
    for (int64_t l = 0; l < d->n_layers; ++l) {
        const GptjLayer& L = layers[l];
        layer_norm_rows(x, L.ln_w, L.ln_b, B, H, d->eps, h, nthreads);
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
                const int64_t at = rows[b] * row_stride + (j * max_len + pos[b]) * hd;
                kv_put(kl + at, q + ko + j * hd, hd);
                kv_put(vl + at, q + vo + j * hd, hd);
            }
        }
        attention_step(qkv, stride, kl, vl, B, pos, rows, nh, nh, hd, max_len, maxpos, sc, att, nthreads);
        run_linear(L.out, att, B, t1, gemv, nthreads);
        run_linear(L.fc_in, h, B, f, gemv, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (B * I >= PAR_VALUES)
        for (int64_t b = 0; b < B; ++b) gelu_tanh(f + b * I, I, ef + b * I);
        run_linear(L.fc_out, f, B, t2, gemv, nthreads);
        add_rows(x, t1, t2, B * H, nthreads);
    }
}

int gptj_decode(const GptjLayer* layers, const GptjDims* d, float* x, int64_t B, const int64_t* pos,
                const int64_t* rows, const float* cos_t, const float* sin_t, void* kc, void* vc,
                int64_t cache_rows, int64_t max_len, void* scratch, int nthreads) {
    const int64_t maxpos = max_position(pos, rows, B, cache_rows, max_len);
    if (maxpos < 0) return -1;
    if (d->cache_bf16)
        gptj_layers(layers, d, x, B, pos, rows, maxpos, cos_t, sin_t, (uint16_t*)kc, (uint16_t*)vc,
                    cache_rows, max_len, scratch, nthreads);
    else
        gptj_layers(layers, d, x, B, pos, rows, maxpos, cos_t, sin_t, (float*)kc, (float*)vc, cache_rows,
                    max_len, scratch, nthreads);
    return 0;
}

}  // namespace gq
