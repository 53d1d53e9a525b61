// The GEMV kernels of gemv.h: activation quantization, int8 and int4 weights (any number of
// rows; int8 weights in rows, or in 16-row panels where the build has VNNI; int4 in 16-row
// panels; int8 batches may go to amx.cpp instead), dequantization for prefill GEMMs, and
// weight quantization for loading.
#include "gemv.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "simd.h"

namespace gq {

// x [M,K] fp32 -> xq [M,K] int8, xs [M,nb] scale, and per block (where not null) xsum [M,nb] =
// xs * sum(xq) (int4) or xis [M,nb] = sum(xq) (int8), for nb = ceil(K/qb) blocks of qb values
// (the last one K - (nb-1)*qb, a multiple of 32). 256-bit code in every variant.
static void quant_act(const float* x, int64_t M, int64_t K, int qb, int8_t* xq, float* xs, float* xsum,
                      int32_t* xis, int nthreads) {
    const int64_t nb = (K + qb - 1) / qb;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K >= 65536)
    for (int64_t mb = 0; mb < M * nb; ++mb) {
        const int64_t row = mb / nb, b = mb % nb, off = row * K + b * qb;
        const int len = K - b * qb < qb ? (int)(K - b * qb) : qb;
        const float* xp = x + off;
        __m256 amax = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int j = 0; j < len; j += 8)
            amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xp + j), absmask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float am = _mm_cvtss_f32(m4);
        const float s = am / 127.f;
        const float inv = am > 0 ? 127.f / am : 0.f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i isum = _mm256_setzero_si256();
        int8_t* lo = xq + off;  // where values 0..15 of each 32 go, and values 16..31
        int8_t* hi = lo + 16;
        for (int j = 0; j < len; j += 32) {
            // cvtps rounds half to even (the default rounding mode), as torch.round
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j), vinv));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 8), vinv));
            const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 16), vinv));
            const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 24), vinv));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
            const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
            __m256i q = _mm256_packs_epi16(ab, cd);
            // packs works per 128-bit lane: restore order 0..31
            q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm_storeu_si128((__m128i*)(lo + j), _mm256_castsi256_si128(q));
            _mm_storeu_si128((__m128i*)(hi + j), _mm256_extracti128_si256(q, 1));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        xs[mb] = s;
        if (xsum) xsum[mb] = s * (float)_mm_cvtsi128_si32(s4);
        if (xis) xis[mb] = _mm_cvtsi128_si32(s4);
    }
}

int64_t linear_scratch_bytes(int64_t M, int64_t K) { return M * K + 8 * M * (K / 32) + 64; }

// dynamic chunks of row tiles, 4 a thread: a thread that loses its core to another process does
// not stall the call, and each chunk is long enough for a steady stream of reads (16 a thread
// slowed decode by 2-5 % at 6B and by a quarter on the bundled model, whose layers are small)
static inline int64_t tile_chunk(int64_t tiles, int nthreads) {
    return tiles / (4 * nthreads) > 1 ? tiles / (4 * nthreads) : 1;
}

// tiles [0, n) in runs taken from one counter, each a quarter of a thread's share of what is
// left, and at least a quarter of tile_chunk's: OpenMP's guided schedule with a quarter of its
// chunks. Early runs are as long as tile_chunk's, so a thread that loses its core holds little;
// the last ones are short, so the threads finish together (the last of tile_chunk's runs left
// one waiting). Measured with benchmarks/ab_kernels.py for the int4 panels of layers from
// SPLIT_MIN_BYTES; smaller layers, and the int8 rows' loop at the bundled model's sizes,
// measured slower with it, and keep tile_chunk.
constexpr int64_t SPLIT_MIN_BYTES = 4 << 20;
template <class Body>
static inline void split_tiles(int64_t n, int nthreads, Body&& body) {
    std::atomic<int64_t> next{0};
    const int64_t least = std::max<int64_t>(1, n / (16 * nthreads));
#pragma omp parallel num_threads(nthreads)
    for (;;) {
        int64_t start = next.load(std::memory_order_relaxed), len = 1;
        do {
            if (start >= n) break;
            len = std::min(n - start, std::max(least, (n - start) / (4 * nthreads)));
        } while (!next.compare_exchange_weak(start, start + len, std::memory_order_relaxed));
        if (start >= n) break;
        for (int64_t t = start; t < start + len; ++t) body(t);
    }
}

Int8Act quant_act_int8(const float* x, int64_t M, int64_t K, void* scratch, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    Int8Act a;
    a.xq = (int8_t*)scratch;
    a.xs = (float*)(a.xq + M * K);
    a.xis = (int32_t*)(a.xs + M * nb);
    quant_act(x, M, K, QB8, a.xq, a.xs, nullptr, a.xis, nthreads);
    return a;
}

constexpr int LW = VB / 4;  // weight rows per vector (the panels', the GEMM's)

// ---------------------------------------------------------------- int8 weights in rows
// Only the builds without VNNI hold int8 weights in rows; the others (amx too) hold them in
// panels (below).
#if !GQ_VNNI
// W int8 [N,K] row-major, ws fp32 [N]. Tiles of R (<= 4) weight rows x MT activation rows: each
// weight vector is loaded once per tile; the R rows' lane sums of a block reduce together into
// one 4-lane vector (lane r: weight row r).
#if GQ_AVX512
#define R8 4
#define M8 4
#else
#define R8 4
#define M8 2
#endif

// PF: prefetch the next tile (see linear_int8)
template <int R, int MT, bool PF = true>
static inline void i8_tile(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           float* y, int64_t ldy, const float* bias) {
    constexpr int NV = QB8 / VB;
    const int64_t nb = (K + QB8 - 1) / QB8;
    __m128 acc[MT];  // lane r: weight row r
    for (int m = 0; m < MT; ++m) acc[m] = _mm_setzero_ps();
    vf acc_all = vf_zero();  // where MT == FW / 4: lane 4 m + r
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * QB8;
        const int len = K - k0 < QB8 ? (int)(K - k0) : QB8;  // the last block: zeros past K
        vi x[MT][NV];
        for (int m = 0; m < MT; ++m)
            for (int i = 0; i < NV; ++i)
                x[m][i] = len == QB8     ? vi_load(xq + m * K + k0 + i * VB)
                          : i * VB < len ? vi_load_n(xq + m * K + k0 + i * VB, len - i * VB)
                                         : vi_zero();
        vi d[4][MT];
        for (int r = 0; r < 4; ++r) {
            for (int m = 0; m < MT; ++m) d[r][m] = vi_zero();
            if (r >= R) continue;
            // prefetch the next tile (the rows that follow; hint: simd.h): one core's demand
            // misses and the hardware prefetcher alone do not keep enough reads in flight
            if (PF)
                for (int i = 0; i < QB8 / 64; ++i)
                    _mm_prefetch((const char*)(W + R * K + (b * R + r) * QB8 + i * 64), GQ_STREAM_HINT);
            // one weight vector at a time: all four beside the 2 x 4 activation vectors and the
            // 8 sums of AVX2's 2-row tile spilled to the stack (16 registers)
            for (int i = 0; i < NV; ++i) {
                const vi w = len == QB8     ? vi_load(W + r * K + k0 + i * VB)
                             : i * VB < len ? vi_load_n(W + r * K + k0 + i * VB, len - i * VB)
                                            : vi_zero();
                for (int m = 0; m < MT; ++m) d[r][m] = dot_s8s8(d[r][m], w, x[m][i]);
            }
        }
        if constexpr (MT == FW / 4) {  // a vector's 128-bit lanes are the MT rows: one fold for all
            vi t[MT];
            for (int m = 0; m < MT; ++m) t[m] = sum_lanes4(d[0][m], d[1][m], d[2][m], d[3][m]);
            const vi sums = vi_fold_each(t);  // lane 4 m + r: S_b of activation row m, weight row r
            acc_all = vf_add(acc_all, vf_mul(vf_cvt(sums), vf_lanes(xs + b, nb)));
        } else {
            for (int m = 0; m < MT; ++m) {
                const __m128i sums = vi_fold(sum_lanes4(d[0][m], d[1][m], d[2][m], d[3][m]));
                acc[m] = _mm_add_ps(acc[m], _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(xs[m * nb + b])));
            }
        }
    }
    alignas(64) float out[MT == FW / 4 ? FW : 4 * MT];
    if constexpr (MT == FW / 4)
        vf_st(out, acc_all);
    else
        for (int m = 0; m < MT; ++m) _mm_store_ps(out + 4 * m, acc[m]);
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) {
            float v = out[4 * m + r] * ws[r];
            if (bias) v = v + bias[r];
            y[m * ldy + r] = v;
        }
}

template <int R, bool PF = true>
static inline void i8_rows(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           int64_t M, float* y, int64_t ldy, const float* bias) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    int64_t m = 0;
    for (; m + M8 <= M; m += M8)
        i8_tile<R, M8, PF>(W, K, ws, xq + m * K, xs + m * nb, y + m * ldy, ldy, bias);
    for (; m < M; ++m) i8_tile<R, 1, PF>(W, K, ws, xq + m * K, xs + m * nb, y + m * ldy, ldy, bias);
}

// Weight rows [n, end) against M activation rows: tiles of R8 weight rows, then single rows.
static inline void i8_rows_span(const int8_t* W, int64_t K, const float* ws, const float* bias,
                                const int8_t* xq, const float* xs, int64_t M, float* y, int64_t ldy,
                                int64_t n, int64_t end) {
    for (int64_t j = n; j < end;) {
        const float* bj = bias ? bias + j : nullptr;
        if (j + R8 <= end) {
            i8_rows<R8>(W + j * K, K, ws + j, xq, xs, M, y + j, ldy, bj);
            j += R8;
        } else {
            i8_rows<1>(W + j * K, K, ws + j, xq, xs, M, y + j, ldy, bj);
            ++j;
        }
    }
}

// ---------------------------------------------------------------- int8 weights, many rows
// With many activation rows the loop above spends as much on reducing lanes as on products. Here
// a vector's lanes are activation rows instead (ML of them): lane m of packed vector q holds
// xq[m][4q .. 4q+3] (AMX's B layout), and 4 bytes of a weight row, broadcast to every lane,
// multiply it. Each lane then holds its row's exact block sum S_b, scaled as gemv.h says: the
// same bits as the loop above. Wider register blocks (two vectors of rows per broadcast, 12
// weight rows) measured no faster; what mattered was how often the weights are read.
constexpr int ML = VB / 4;  // activation rows per vector
#ifndef BCAST_MIN_ROWS
// from here on the loop above loses (measured at GPT-J's shapes): with AVX2 (8 rows a vector) from
// 7 rows (on the Zen 3 it took 0.81 of the loop above's time at 7 rows, 0.94-1.02 at 6); with
// AVX-512 once a vector is full
#if GQ_AVX512
#define BCAST_MIN_ROWS ML
#else
#define BCAST_MIN_ROWS 7
#endif
#endif
// Rows past the last full vector, up to this many, take the loop above in the same pass over each
// weight block (from cache): a vector of mostly padding costs as much as a full one (17 rows
// cost 1.5x 16 without this).
#ifndef BCAST_TAIL_ROWS
#define BCAST_TAIL_ROWS (ML / 2)
#endif
#if GQ_AVX512
#define RB 8  // weight rows per register block
#else
#define RB 4
#endif

// Weight rows W [R, K] against one group of ML packed activation rows (`rows` of them real):
// y[m][r] for m < rows. maddubs takes |x| (axp, packed once per call) and the broadcast w with
// x's sign: four instructions a 32 products, where |w| and x with w's sign took
// five (a broadcast weight meets one vector of rows, so its |w| is not shared). Same bits.
template <int R>
static inline void i8_bcast(const int8_t* W, int64_t K, const float* ws, const float* bias, const int32_t* xp,
                            const float* xsp, const int32_t* axp, int rows, float* y, int64_t ldy,
                            bool prefetch = false) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vf_zero();
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t q0 = b * QB8 / 4, q1 = (b * QB8 + QB8 < K ? b * QB8 + QB8 : K) / 4;
        vi s[R];
        for (int r = 0; r < R; ++r) s[r] = vi_zero();
        // `prefetch`: block b of the R weight rows that follow (the tile this thread most likely
        // takes next), as i8_tile does: R rows read 4 bytes at a time leave the hardware
        // prefetcher behind. Asked for in a chunk's last group, so it lands just before its use.
        if (prefetch)
            for (int r = 0; r < R; ++r)
                for (int i = 0; i < QB8; i += 64)
                    _mm_prefetch((const char*)(W + (R + r) * K + b * QB8 + i), GQ_STREAM_HINT);
        for (int64_t q = q0; q < q1; ++q) {
            const vi xv = vi_load(xp + q * ML), axv = vi_load(axp + q * ML);
            for (int r = 0; r < R; ++r)
                s[r] = dot_u8s8(s[r], axv, sign_s8(vi_bcast32(W + r * K + 4 * q), xv));
        }
        const vf xs = vf_ld(xsp + b * ML);
        for (int r = 0; r < R; ++r) acc[r] = vf_add(acc[r], vf_mul(vf_cvt(s[r]), xs));
    }
    for (int r = 0; r < R; ++r) {
        alignas(64) float out[ML];
        vf_st(out, acc[r]);
        for (int m = 0; m < rows; ++m) {
            float v = out[m] * ws[r];
            if (bias) v = v + bias[r];
            y[m * ldy + r] = v;
        }
    }
}

static void linear_int8_bcast(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
                              const Int8Act& a, int64_t M, float* y, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8, nq = K / 4;
    const int64_t tail = M > ML && M % ML <= BCAST_TAIL_ROWS ? M % ML : 0, mv = M - tail;
    const int64_t groups = (mv + ML - 1) / ML;
    // packed activations: per group, [nq][ML] int32, then its scales [nb][ML], then |x| [nq][ML]
    const int64_t per_group = 2 * nq * ML + nb * ML;
    static thread_local std::vector<int32_t> buf;
    if ((int64_t)buf.size() < groups * per_group) buf.resize(groups * per_group);
    int32_t* packed = buf.data();
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; ++g) {
        int32_t* xp = packed + g * per_group;
        float* xsp = (float*)(xp + nq * ML);
        int32_t* axp = xp + nq * ML + nb * ML;
        for (int j = 0; j < ML; ++j) {
            const int64_t m = g * ML + j;
            for (int64_t q = 0; q < nq; ++q)
                xp[q * ML + j] = m < mv ? *(const int32_t*)(a.xq + m * K + 4 * q) : 0;
            for (int64_t b = 0; b < nb; ++b) xsp[b * ML + j] = m < mv ? a.xs[m * nb + b] : 0.f;
        }
        for (int64_t i = 0; i < nq; ++i) vi_store(axp + i * ML, abs_s8(vi_load(xp + i * ML)));
    }
    // chunks of groups whose packed activations stay in the last-level cache (4 MB of them): all
    // weight rows pass over each chunk, so the weights are read from memory once per chunk
    const int64_t chunk = std::max<int64_t>(1, (4 << 20) / (per_group * 4));
    const int64_t nblk = (N + RB - 1) / RB;
    const int8_t* xqt = a.xq + mv * K;
    const float* xst = a.xs + mv * nb;
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
        const int64_t g1 = std::min(groups, g0 + chunk);
#pragma omp parallel for schedule(dynamic, tile_chunk(nblk, nthreads)) num_threads(nthreads)
        for (int64_t t = 0; t < nblk; ++t) {
            const int64_t n = t * RB;
            for (int64_t g = g0; g < g1; ++g) {
                const int32_t* xp = packed + g * per_group;
                const float* xsp = (const float*)(xp + nq * ML);
                const int32_t* axp = xp + nq * ML + nb * ML;
                const int rows = (int)std::min<int64_t>(ML, mv - g * ML);
                float* yg = y + g * ML * N;
                if (n + RB <= N)
                    i8_bcast<RB>(W + n * K, K, ws + n, bias ? bias + n : nullptr, xp, xsp, axp, rows, yg + n,
                                 N, g == g1 - 1 && n + 2 * RB <= N);
                else
                    for (int64_t j = n; j < N; ++j)
                        i8_bcast<1>(W + j * K, K, ws + j, bias ? bias + j : nullptr, xp, xsp, axp, rows,
                                    yg + j, N);
            }
            if (tail && g1 == groups)  // the rows past the vectors, while this block is in cache
                i8_rows_span(W, K, ws, bias, xqt, xst, tail, y + mv * N, N, n, std::min(N, n + RB));
        }
    }
}

// ---------------------------------------------------------------- int8 weights, GEMM
// From GEMM_MIN_ROWS rows on, lanes are weight rows, as in a GEMM microkernel (oneDNN's brgemm):
// per call each panel of NP8 weight rows is repacked once so that a vector holds LW rows x 4
// bytes of k, 4 bytes of an activation row are broadcast, and GR x NV8 accumulators take the
// products: fewer loads per product than the loop above. maddubs takes |w| and x with w's sign,
// as above. Each S_b is exact and the float sequence is gemv.h's, so the bits are the same. Below
// ~64 rows the repacking costs more than it saves.
// activation rows x weight vectors per register block, measured best at 512 rows on the Zen 5
#if GQ_AVX512
constexpr int GR = 6, NV8 = 2;  // 4 x 3, 4 x 2, 3 x 3: slower
#else
constexpr int GR = 3, NV8 = 2;  // 4 x 1, 4 x 2, 5 x 2, 2 x 3, 3 x 3: slower
#endif
constexpr int NP8 = LW * NV8;  // weight rows per panel
#ifndef GEMM_MIN_ROWS
#define GEMM_MIN_ROWS 64
#endif

template <int MR>
static inline void i8_gemm_block(const int32_t* wp, const int32_t* awp, const int8_t* xq, int64_t K,
                                 const float* xs, int64_t nb, const float* ws, const float* bias, float* y,
                                 int64_t ldy, int ncols) {
    // the float sums of gemv.h, per activation row and weight vector: in memory, touched once per
    // block, so that the int32 accumulators can have the registers (16 of them without AVX-512;
    // with 32 it measured as fast as registers)
    alignas(64) float f[MR][NV8][LW];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV8; ++v) vf_st(f[i][v], vf_zero());
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t q0 = b * QB8 / 4, q1 = std::min<int64_t>(b * QB8 + QB8, K) / 4;
        vi c[MR][NV8];
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV8; ++v) c[i][v] = vi_zero();
        for (int64_t q = q0; q < q1; ++q) {
            // |w| from the panel, w's sign read from memory by each use: registers for accumulators
            vi aw[NV8];
            for (int v = 0; v < NV8; ++v) aw[v] = vi_load(awp + (q * NV8 + v) * LW);
            for (int i = 0; i < MR; ++i) {
                const vi xb = vi_bcast32(xq + i * K + 4 * q);
                for (int v = 0; v < NV8; ++v)
                    c[i][v] = dot_u8s8(c[i][v], aw[v], sign_s8(xb, vi_load(wp + (q * NV8 + v) * LW)));
            }
        }
        for (int i = 0; i < MR; ++i) {
            const vf s = vf_set(xs[i * nb + b]);
            for (int v = 0; v < NV8; ++v) vf_st(f[i][v], vf_add(vf_ld(f[i][v]), vf_mul(vf_cvt(c[i][v]), s)));
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV8; ++v) {
            const int n = std::min(LW, ncols - LW * v);
            if (n <= 0) break;
            vf out = vf_mul(vf_ld(f[i][v]), vf_load_n(ws + LW * v, n));
            if (bias) out = vf_add(out, vf_load_n(bias + LW * v, n));
            vf_store_n(y + i * ldy + LW * v, out, n);
        }
}

// LW x LW int32 transpose: r[j] lane i <- r[i] lane j
static inline void transpose_lanes(vi* r) {
    vi t[LW];
    for (int i = 0; i < LW; i += 2) {
        t[i] = vi_unpacklo32(r[i], r[i + 1]);
        t[i + 1] = vi_unpackhi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < LW; i += 4) {
        r[i] = vi_unpacklo64(t[i], t[i + 2]);
        r[i + 1] = vi_unpackhi64(t[i], t[i + 2]);
        r[i + 2] = vi_unpacklo64(t[i + 1], t[i + 3]);
        r[i + 3] = vi_unpackhi64(t[i + 1], t[i + 3]);
    }
    // r[4a + b] now holds, per 128-bit lane L, rows 4a..4a+3 of column 4L + b
    for (int bq = 0; bq < 4; ++bq) {
#if GQ_AVX512
        const vi a0 = r[bq], a1 = r[4 + bq], a2 = r[8 + bq], a3 = r[12 + bq];
        const vi u0 = _mm512_shuffle_i32x4(a0, a1, 0x88), u1 = _mm512_shuffle_i32x4(a0, a1, 0xdd);
        const vi u2 = _mm512_shuffle_i32x4(a2, a3, 0x88), u3 = _mm512_shuffle_i32x4(a2, a3, 0xdd);
        t[bq] = _mm512_shuffle_i32x4(u0, u2, 0x88);       // column bq
        t[4 + bq] = _mm512_shuffle_i32x4(u1, u3, 0x88);   // column 4 + bq
        t[8 + bq] = _mm512_shuffle_i32x4(u0, u2, 0xdd);   // column 8 + bq
        t[12 + bq] = _mm512_shuffle_i32x4(u1, u3, 0xdd);  // column 12 + bq
#else
        t[bq] = _mm256_permute2x128_si256(r[bq], r[4 + bq], 0x20);      // column bq
        t[4 + bq] = _mm256_permute2x128_si256(r[bq], r[4 + bq], 0x31);  // column 4 + bq
#endif
    }
    for (int i = 0; i < LW; ++i) r[i] = t[i];
}

// NV x LW rows of bytes at `rows` (row stride K; ncols real, the rest read as zeros) in VNNI's
// layout: wp[q][j] = the 4 bytes of row j at k = 4q.
template <int NV>
static void transpose_panel(const uint8_t* rows, int64_t K, int ncols, int32_t* wp) {
    for (int v = 0; v < NV; ++v)
        for (int64_t k0 = 0; k0 < K; k0 += VB) {
            const int len = (int)std::min<int64_t>(VB, K - k0);  // a multiple of 32
            vi r[LW];
            for (int i = 0; i < LW; ++i)
                r[i] = LW * v + i < ncols ? vi_load_n(rows + (LW * v + i) * K + k0, len) : vi_zero();
            transpose_lanes(r);
            for (int i = 0; i < len / 4; ++i) vi_store(wp + ((k0 / 4 + i) * NV + v) * LW, r[i]);
        }
}

// A panel of NP8 weight rows (ncols real, the rest zeros): wp[q][j] = 4 bytes of row j at k = 4q;
// and awp = |wp| bytewise (maddubs' unsigned operand).
static void pack_panel(const int8_t* W, int64_t K, int ncols, int32_t* wp, int32_t* awp) {
    transpose_panel<NV8>((const uint8_t*)W, K, ncols, wp);
    for (int64_t i = 0; i < K / 4 * NV8; ++i) vi_store(awp + i * LW, abs_s8(vi_load(wp + i * LW)));
}

static void linear_int8_gemm(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
                             const Int8Act& a, int64_t M, float* y, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8, nq = K / 4, panels = (N + NP8 - 1) / NP8;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<int32_t> wp(nq * NP8), awp(nq * NP8);
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t n0 = p * NP8, ncols = std::min<int64_t>(NP8, N - n0);
            pack_panel(W + n0 * K, K, (int)ncols, wp.data(), awp.data());
            int64_t m = 0;
            for (; m + GR <= M; m += GR)
                i8_gemm_block<GR>(wp.data(), awp.data(), a.xq + m * K, K, a.xs + m * nb, nb, ws + n0,
                                  bias ? bias + n0 : nullptr, y + m * N + n0, N, (int)ncols);
            for (; m < M; ++m)
                i8_gemm_block<1>(wp.data(), awp.data(), a.xq + m * K, K, a.xs + m * nb, nb, ws + n0,
                                 bias ? bias + n0 : nullptr, y + m * N + n0, N, (int)ncols);
        }
    }
}

#endif  // !GQ_VNNI

// ---------------------------------------------------------------- int8 weights in panels
// With VNNI the int8 weights are held in panels of 16 rows (gemv.h): a vector holds
// LW rows x 4 bytes of k, as in the GEMM above, but laid out at load, so no call repacks them.
// The bytes are w + 128, dpbusd's unsigned operand, and 4 signed bytes of an activation row are
// broadcast against them: S_b = dpbusd sum - 128 * sum(xq over the block), exact. Lanes are weight
// rows, so no lane sums are reduced: a few activation rows cost little more than one (the tiles
// above reduce 4 x 4 lane sums per block). The float sequence is gemv.h's: the same bits.
bool int8_panels() { return GQ_VNNI; }

int64_t int8_panel_bytes(int64_t N, int64_t K) { return (N + 15) / 16 * 16 * K; }

void pack_int8_panels(const int8_t* W, int64_t N, int64_t K, uint8_t* P, int nthreads) {
    const int64_t np = (N + 15) / 16, nq = K / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < np; ++p)
        for (int j = 0; j < 16; ++j) {  // row 16p + j, 4 bytes at a time
            const int64_t n = 16 * p + j;
            uint32_t* out = (uint32_t*)(P + p * 16 * K) + j;
            for (int64_t q = 0; q < nq; ++q) {
                uint32_t v = 0;
                if (n < N) memcpy(&v, W + n * K + 4 * q, 4);
                out[q * 16] = v ^ 0x80808080u;
            }
        }
}

#if GQ_VNNI
// the vector of rows r0 .. r0 + LW - 1 at k = 4q (r0 a multiple of LW)
static inline const uint8_t* panel_at(const uint8_t* P, int64_t K, int64_t r0, int64_t q) {
    return P + (r0 >> 4) * 16 * K + q * 64 + (r0 & 15) * 4;
}

// MT activation rows against NV vectors of weight rows from r0 (nrows of them real; vectors past
// the last panel read as zeros): y[m][r0 + j]. `prefetch`: 8 KB on in each panel's stream (at its
// end, the panel that follows, which the thread most likely takes next; past the last panel a
// prefetch is wasted at most, and never faults). With few accumulators, U of each (q's residues mod
// U): one dpbusd chain would wait on its own latency.
template <int MT, int NV, bool FULL>
static inline void i8p_sums(const uint8_t* P, int64_t K, int64_t r0, int nv, const int8_t* xq, int64_t q0,
                            int64_t q1, vi (&c)[MT][NV]) {
    constexpr int U = MT * NV >= 8 ? 1 : MT * NV >= 4 ? 2 : 4;  // q1 - q0 is a multiple of 8
    vi cu[U][MT][NV];
    for (int u = 0; u < U; ++u)
        for (int m = 0; m < MT; ++m)
            for (int v = 0; v < NV; ++v) cu[u][m][v] = vi_zero();
    for (int64_t q = q0; q < q1; q += U)
        for (int u = 0; u < U; ++u) {
            vi w[NV];
            for (int v = 0; v < NV; ++v)
                w[v] = FULL || v < nv ? vi_load(panel_at(P, K, r0 + v * LW, q + u)) : vi_zero();
            for (int m = 0; m < MT; ++m) {
                const int8_t* x = xq + m * K + 4 * (q + u);
                if constexpr (NV == 1) {  // the broadcast inside the instruction (AVX-512)
                    cu[u][m][0] = dot_u8s8_bcast(cu[u][m][0], w[0], x);
                } else {  // one broadcast for the NV products
                    const vi xb = vi_bcast32(x);
                    for (int v = 0; v < NV; ++v) cu[u][m][v] = dot_u8s8(cu[u][m][v], w[v], xb);
                }
            }
        }
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
            c[m][v] = cu[0][m][v];
            for (int u = 1; u < U; ++u) c[m][v] = vi_add(c[m][v], cu[u][m][v]);  // exact
        }
}

// The thread's next tile of weights, prefetched into L2 a little at each block of K while the
// blocks of activation rows meet this tile: the first block of rows would otherwise wait on
// memory for the tile that the others then read from the cache.
struct NextTile {
    const char* at = nullptr;  // the next line to prefetch (none from end on)
    const char* end = nullptr;
    int64_t step = 0;  // bytes per block of K
    inline void advance() {
        for (int64_t i = 0; i < step && at < end; i += 64, at += 64) _mm_prefetch(at, _MM_HINT_T1);
    }
};

// the int8 panels' prefetch hint (see P_PREFETCH_MIN_ROWS)
#if GQ_STREAM_NTA
#define P_PREFETCH_HINT _MM_HINT_T0
#else
#define P_PREFETCH_HINT _MM_HINT_T1
#endif

template <int MT, int NV>
static inline void i8p_block(const uint8_t* P, int64_t K, int64_t r0, int64_t nrows, int64_t npad,
                             const float* ws, const float* bias, const int8_t* xq, const float* xs,
                             const int32_t* xis, float* y, int64_t ldy, bool prefetch,
                             NextTile* next = nullptr) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    const int nv = (int)std::min<int64_t>(NV, (npad - r0) / LW);  // vectors inside the panels
    alignas(64) float f[MT][NV][LW];                              // gemv.h's float sums, per row and vector
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) vf_st(f[m][v], vf_zero());
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t q0 = b * QB8 / 4, q1 = std::min<int64_t>(b * QB8 + QB8, K) / 4;
        if (prefetch)  // a block's QB8 x 16 bytes of each panel, 8 KB on
            for (int pp = 0; pp < NV * LW / 16; ++pp)
                for (int64_t i = 0; i < QB8 * 16 / 64; ++i)
                    _mm_prefetch((const char*)panel_at(P, K, r0 + 16 * pp, q0) + 8192 + 64 * i,
                                 P_PREFETCH_HINT);
        if (next) next->advance();
        vi c[MT][NV];
        if (nv == NV)
            i8p_sums<MT, NV, true>(P, K, r0, nv, xq, q0, q1, c);
        else
            i8p_sums<MT, NV, false>(P, K, r0, nv, xq, q0, q1, c);
        for (int m = 0; m < MT; ++m) {
            const vi corr = vi_shl7(vi_set1(xis[m * nb + b]));
            const vf s = vf_set(xs[m * nb + b]);
            for (int v = 0; v < NV; ++v)
                vf_st(f[m][v], vf_add(vf_ld(f[m][v]), vf_mul(vf_cvt(vi_sub(c[m][v], corr)), s)));
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
            const int n = (int)std::min<int64_t>(LW, nrows - LW * v);
            if (n <= 0) break;
            vf out = vf_mul(vf_ld(f[m][v]), vf_load_n(ws + LW * v, n));
            if (bias) out = vf_add(out, vf_load_n(bias + LW * v, n));
            vf_store_n(y + m * ldy + LW * v, out, n);
        }
}

// M activation rows in blocks of MT, then of MT / 2, ..
template <int MT, int NV>
static inline void i8p_span(const uint8_t* P, int64_t K, int64_t r0, int64_t nrows, int64_t npad,
                            const float* ws, const float* bias, const Int8Act& a, int64_t m0, int64_t M,
                            float* y, int64_t ldy, bool prefetch, NextTile* next = nullptr) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    int64_t m = m0;
    for (; m + MT <= M; m += MT) {
        i8p_block<MT, NV>(P, K, r0, nrows, npad, ws, bias, a.xq + m * K, a.xs + m * nb, a.xis + m * nb,
                          y + m * ldy, ldy, prefetch && m == m0, next);
    }
    if constexpr (MT > 1)
        if (m < M)
            i8p_span<MT / 2, NV>(P, K, r0, nrows, npad, ws, bias, a, m, M, y, ldy, prefetch && m == m0, next);
}

// M activation rows in ceil(M / MT) blocks of as near equal sizes as they divide into: a last
// block of one or two rows read the tile from the cache for little arithmetic (16 rows as 6 + 6 +
// 3 + 1 ran slower than as 6 + 5 + 5). A row's bits do not depend on its block.
template <int MT, int NV>
static inline void i8p_even(const uint8_t* P, int64_t K, int64_t r0, int64_t nrows, int64_t npad,
                            const float* ws, const float* bias, const Int8Act& a, int64_t M, float* y,
                            int64_t ldy, NextTile* next) {
    const int64_t nb = (K + QB8 - 1) / QB8, blocks = (M + MT - 1) / MT;
    for (int64_t i = 0, m = 0; i < blocks; ++i) {
        const int64_t mt = (M - m) / (blocks - i);  // the rest shared by the blocks left
        const int8_t* xq = a.xq + m * K;
        const float* xs = a.xs + m * nb;
        const int32_t* xis = a.xis + m * nb;
        float* ym = y + m * ldy;
        switch (mt) {
            case MT:
                i8p_block<MT, NV>(P, K, r0, nrows, npad, ws, bias, xq, xs, xis, ym, ldy, false, next);
                break;
            case MT - 1:
                i8p_block<MT - 1, NV>(P, K, r0, nrows, npad, ws, bias, xq, xs, xis, ym, ldy, false, next);
                break;
            default:
                i8p_span<MT - 2, NV>(P, K, r0, nrows, npad, ws, bias, a, m, m + mt, y, ldy, false, next);
                break;
        }
        m += mt;
    }
}

// activation rows x vectors per block: a panel at a time for a few rows, wider blocks from
// P_GEMM_MIN_ROWS (measured at GPT-J's shapes on the Zen 5; AVX-512 GEMM 4 x 3, 8 x 2, 5 x 3,
// 6 x 3: slower; 256-bit 4 x 3, 4 x 2, 6 x 2: slower)
#if GQ_AVX512
constexpr int P_MT = 8, P_NV = 1, PG_MT = 6, PG_NV = 2, P_GEMM_MIN_ROWS = 10;
#else
constexpr int P_MT = 4, P_NV = 2, PG_MT = 3, PG_NV = 2, P_GEMM_MIN_ROWS = 48;
#endif
// The software prefetch pays from this many rows, where each weight byte costs more arithmetic and
// the stream slows; below it the hardware prefetcher alone keeps the one-row stream at the
// bandwidth, and a software prefetch slowed it (benchmarks/results/gptj-6b-zen5.md). On the Xeon,
// AVX-512's prefetch into L2 took 0.86-0.94x the time of T0's at 3 to 8 rows; the 256-bit build,
// whose stream is slower, ran GPT-J's layers (from SPLIT_MIN_BYTES) in 0.79-0.93x the time with
// none, SmolLM2's small ones 1.18x (they keep it).
constexpr int64_t P_PREFETCH_MIN_ROWS = 3;
constexpr bool P_PREFETCH_LONG_RUNS = GQ_STREAM_NTA || GQ_AVX512;

static void linear_int8_panels(const uint8_t* P, const float* ws, const float* bias, int64_t N, int64_t K,
                               const Int8Act& a, int64_t M, float* y, int nthreads) {
    const bool gemm = M >= P_GEMM_MIN_ROWS;
    const int64_t rows = gemm ? (int64_t)LW * PG_NV : (int64_t)LW * P_NV, npad = (N + 15) / 16 * 16;
    const int64_t nt = (N + rows - 1) / rows;
    if (gemm) {  // runs of tiles, so that a thread's next tile is most often the one that follows
        // the next tile spread over i8p_even's blocks of rows x blocks of K (where a block of
        // rows splits further, the prefetch ends early)
        const int64_t blocks = (M + PG_MT - 1) / PG_MT, nb = (K + QB8 - 1) / QB8;
        split_tiles(nt, nthreads, [&](int64_t t) {
            const int64_t r0 = t * rows, nrows = std::min(rows, N - r0);
            NextTile next;
            if (r0 + rows < npad) {
                next.at = (const char*)P + (r0 + rows) * K;
                next.end = (const char*)P + std::min(npad, r0 + 2 * rows) * K;
                next.step = ((next.end - next.at) / (nb * blocks) + 63) / 64 * 64;
            }
            i8p_even<PG_MT, PG_NV>(P, K, r0, nrows, npad, ws + r0, bias ? bias + r0 : nullptr, a, M, y + r0,
                                   N, &next);
        });
        return;
    }
    const bool prefetch = M >= P_PREFETCH_MIN_ROWS && (P_PREFETCH_LONG_RUNS || npad * K < SPLIT_MIN_BYTES);
#pragma omp parallel for schedule(dynamic, tile_chunk(nt, nthreads)) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t r0 = t * rows, nrows = std::min(rows, N - r0);
        i8p_span<P_MT, P_NV>(P, K, r0, nrows, npad, ws + r0, bias ? bias + r0 : nullptr, a, 0, M, y + r0, N,
                             prefetch);
    }
}
#endif

void linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K, const float* x,
                 int64_t M, float* y, void* scratch, int nthreads) {
#if GQ_VNNI  // W is in panels (int8_panels())
    const Int8Act act = quant_act_int8(x, M, K, scratch, nthreads);
    if (M >= 2 && N % 16 == 0 && K % 64 == 0 && amx_ready())
        linear_int8_amx((const uint8_t*)W, ws, bias, N, K, act, M, y, nthreads);
    else
        linear_int8_panels((const uint8_t*)W, ws, bias, N, K, act, M, y, nthreads);
#else
    const Int8Act a = quant_act_int8(x, M, K, scratch, nthreads);
    if (M >= GEMM_MIN_ROWS) {
        linear_int8_gemm(W, ws, bias, N, K, a, M, y, nthreads);
        return;
    }
    if (M >= BCAST_MIN_ROWS) {
        linear_int8_bcast(W, ws, bias, N, K, a, M, y, nthreads);
        return;
    }
    // On the Xeon (the prefetch into L2) one row of GPT-J's layers (from SPLIT_MIN_BYTES) read
    // faster on the hardware's prefetcher alone: 0.92-0.94x the time (2 rows 1.02x, SmolLM2's small
    // layers 1.25x); AMD's non-temporal prefetch was measured to pay
    const bool prefetch = GQ_STREAM_NTA || M > 1 || N * K < SPLIT_MIN_BYTES;
    const int64_t nt = (N + R8 - 1) / R8;
#pragma omp parallel for schedule(dynamic, tile_chunk(nt, nthreads)) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t n = t * R8;
        if (n + R8 <= N && prefetch)  // (the one-row decode's hot loop: kept free of the span's bookkeeping)
            i8_rows<R8>(W + n * K, K, ws + n, a.xq, a.xs, M, y + n, N, bias ? bias + n : nullptr);
        else if (n + R8 <= N)
            i8_rows<R8, false>(W + n * K, K, ws + n, a.xq, a.xs, M, y + n, N, bias ? bias + n : nullptr);
        else
            i8_rows_span(W, K, ws, bias, a.xq, a.xs, M, y, N, n, N);
    }
#endif
}

// ---------------------------------------------------------------- int4 weights
// The kernels read the panels of gemv.h: per group, 4 chunks of 64 bytes hold the 16 rows' 32
// values, and one chunk's low and high nibbles are two VNNI-layout vectors (16 rows x 4 values,
// or 8 rows x 4 in each half of the chunk at 256 bits). Lanes are weight rows: 4 bytes of an
// activation row are broadcast against a vector, so no lane sums are reduced and a few activation
// rows cost little more than one. The values are unsigned and the activations signed, dpbusd's
// operands as they are; without VNNI maddubs' int16 pair sums add up over a group (8 x 2 x 15 x
// 127 <= 32767) and widen once. The float terms are gemv.h's, group by group into P_(g % 4).
constexpr int NVP = 16 / LW;  // vectors of a panel

int64_t int4_panel_bytes(int64_t N, int64_t K) { return (N + 15) / 16 * (K / 32) * GB4; }

void pack_int4_panels(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, int64_t N, int64_t K,
                      uint8_t* P, int nthreads) {
    const int64_t ng = K / 32, np = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < np; ++p)
        for (int64_t g = 0; g < ng; ++g) {
            uint8_t* b = P + (p * ng + g) * GB4;
            memset(b, 0, GB4);  // padding rows: q = s = m = 0, so their lanes are 0
            for (int j = 0; j < 16 && 16 * p + j < N; ++j) {
                const int64_t n = 16 * p + j;
                const uint8_t* src = W + n * (K / 2) + 16 * g;  // byte i: values i and i + 16
                auto value = [src](int k) { return k < 16 ? src[k] & 15 : src[k - 16] >> 4; };
                for (int c = 0; c < 4; ++c)
                    for (int i = 0; i < 4; ++i)
                        b[64 * c + 4 * j + i] = (uint8_t)(value(8 * c + i) | value(8 * c + 4 + i) << 4);
                memcpy(b + 256 + 2 * j, sc + n * ng + g, 2);
                memcpy(b + 288 + 2 * j, mn + n * ng + g, 2);
            }
        }
}

// gemv.h's c_g for LW weight rows of one activation row: D the group's integer sums (int16 pair
// sums without VNNI), s and mn the rows' scales and mins, xv = xs_g and sv = xsum_g broadcast.
// The few-row loop and the GEMM both take it: the same float operations, the same bits.
static inline vf int4_term(vi D, vf s, vf mn, vf xv, vf sv) {
    const vf d = vf_cvt(GQ_VNNI ? D : vi_widen16(D));
    return vf_add(vf_mul(d, vf_mul(s, xv)), vf_mul(mn, sv));
}

// LW fp16 at p as floats
static inline vf vf_half(const uint8_t* p) {
#if GQ_AVX512
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#endif
}

// The float sums P_i (i = g % 4) of one panel against MT activation rows: in registers, or, where
// MEM, in memory, touched once per group. With 16 registers and maddubs' temporaries, more than
// one row's 4 x NVP sums spill anyway; in memory they leave the registers to 4 rows' int16 sums.
// The AVX-512 VNNI builds (amx too) keep them in memory as well, for their blocks of 12 rows.
constexpr bool I4P_SUMS_IN_MEMORY = (!GQ_AVX512 && !GQ_VNNI) || (GQ_AVX512 && GQ_VNNI);
template <int MT, bool MEM>
struct I4Sums {
    vf r[MEM ? 1 : 4][MEM ? 1 : MT][NVP];
    alignas(MEM ? 64 : 4) float mem[MEM ? 4 : 1][MEM ? MT : 1][MEM ? NVP : 1][MEM ? LW : 1];

    I4Sums() {
        for (int i = 0; i < 4; ++i)
            for (int m = 0; m < MT; ++m)
                for (int v = 0; v < NVP; ++v) set(i, m, v, vf_zero());
    }
    vf get(int i, int m, int v) const {
        if constexpr (MEM)
            return vf_ld(mem[i][m][v]);
        else
            return r[i][m][v];
    }
    void set(int i, int m, int v, vf a) {
        if constexpr (MEM)
            vf_st(mem[i][m][v], a);
        else
            r[i][m][v] = a;
    }
};

// One group of a panel (b: its 320 bytes) against MT activation rows (xq, xs, xsum at the group;
// row stride K, ng): P_I[m][v] += c_g, lane j of vector v for row LW v + j.
template <int I, int MT, bool MEM>
static inline void i4p_group(const uint8_t* b, const int8_t* xq, int64_t K, const float* xs,
                             const float* xsum, int64_t ng, I4Sums<MT, MEM>& P) {
    vi D[MT][NVP];  // without VNNI: int16 pair sums
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NVP; ++v) D[m][v] = vi_zero();
    for (int c = 0; c < 4; ++c)
        for (int v = 0; v < NVP; ++v) {
            const vi w = vi_load(b + 64 * c + VB * v);
            const vi lo = vi_lo(w), hi = vi_hi(w);  // values 8c .. 8c + 3, and 8c + 4 .. 8c + 7
            for (int m = 0; m < MT; ++m) {
                const int8_t* x = xq + m * K + 8 * c;
#if GQ_VNNI
                D[m][v] = dot_u8s8_bcast(dot_u8s8_bcast(D[m][v], lo, x), hi, x + 4);
#else
                D[m][v] = vi_acc16(
                    D[m][v], vi_add16(vi_maddubs(lo, vi_bcast32(x)), vi_maddubs(hi, vi_bcast32(x + 4))));
#endif
            }
        }
    for (int v = 0; v < NVP; ++v) {
        const vf s = vf_half(b + 256 + 2 * LW * v), mv = vf_half(b + 288 + 2 * LW * v);
        for (int m = 0; m < MT; ++m) {
            const vf c = int4_term(D[m][v], s, mv, vf_set(xs[m * ng]), vf_set(xsum[m * ng]));
            P.set(I, m, v, vf_add(P.get(I, m, v), c));
        }
    }
}

// One panel (nrows real rows) against MT activation rows: y[m][j] = (P_0 + P_1) + (P_2 + P_3)
// (+ bias). `ahead`: where to prefetch from, as far ahead of the panel as needed, 4 groups at a time.
template <int MT>
static inline void i4p_panel(const uint8_t* p, int64_t K, int nrows, const int8_t* xq, const float* xs,
                             const float* xsum, const float* bias, float* y, int64_t ldy,
                             const uint8_t* ahead) {
    const int64_t ng = K / 32;
    constexpr bool in_memory = I4P_SUMS_IN_MEMORY && MT > 1;
    I4Sums<MT, in_memory> P;
    int64_t g = 0;
    for (; g + 4 <= ng; g += 4) {  // P_i by name, so that register sums stay in registers
        if (ahead)
            for (int i = 0; i < 4 * GB4; i += 64)
                _mm_prefetch((const char*)(ahead + g * GB4 + i), GQ_STREAM_HINT);
        i4p_group<0>(p + g * GB4, xq + 32 * g, K, xs + g, xsum + g, ng, P);
        i4p_group<1>(p + (g + 1) * GB4, xq + 32 * (g + 1), K, xs + g + 1, xsum + g + 1, ng, P);
        i4p_group<2>(p + (g + 2) * GB4, xq + 32 * (g + 2), K, xs + g + 2, xsum + g + 2, ng, P);
        i4p_group<3>(p + (g + 3) * GB4, xq + 32 * (g + 3), K, xs + g + 3, xsum + g + 3, ng, P);
    }
    // the last ng % 4 groups (a switch: a residue chosen at run time would keep P in memory)
    for (int i = 0; g < ng; ++g, ++i) switch (i) {
            case 0: i4p_group<0>(p + g * GB4, xq + 32 * g, K, xs + g, xsum + g, ng, P); break;
            case 1: i4p_group<1>(p + g * GB4, xq + 32 * g, K, xs + g, xsum + g, ng, P); break;
            default: i4p_group<2>(p + g * GB4, xq + 32 * g, K, xs + g, xsum + g, ng, P); break;
        }
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NVP; ++v) {
            const int n = std::min(LW, nrows - LW * v);
            if (n <= 0) break;
            vf out = vf_add(vf_add(P.get(0, m, v), P.get(1, m, v)), vf_add(P.get(2, m, v), P.get(3, m, v)));
            if (bias) out = vf_add(out, vf_load_n(bias + LW * v, n));
            vf_store_n(y + m * ldy + LW * v, out, n);
        }
}

// M activation rows in blocks of MT, then of MT / 2, .. (with the sums in memory: then one block of
// the rest, MT - 1 rows, ..)
template <int MT>
static inline void i4p_span(const uint8_t* p, int64_t K, int nrows, const int8_t* xq, const float* xs,
                            const float* xsum, const float* bias, float* y, int64_t ldy, int64_t M,
                            const uint8_t* ahead) {
    const int64_t ng = K / 32;
    int64_t m = 0;
    for (; m + MT <= M; m += MT)
        i4p_panel<MT>(p, K, nrows, xq + m * K, xs + m * ng, xsum + m * ng, bias, y + m * ldy, ldy,
                      m == 0 ? ahead : nullptr);
    if constexpr (MT > 1)
        if (m < M)
            i4p_span<I4P_SUMS_IN_MEMORY ? MT - 1 : MT / 2>(p, K, nrows, xq + m * K, xs + m * ng,
                                                           xsum + m * ng, bias, y + m * ldy, ldy, M - m,
                                                           m == 0 ? ahead : nullptr);
}

// activation rows per block below the GEMM. AVX-512, measured on the Zen 5 at 6 and 8 rows: 8 is
// slower by up to a third without VNNI, whose int16 sums and float sums spill; 256-bit VNNI there:
// 4 ~8 % slower than 2. AVX2 on the Zen 3, with the float sums in memory: 4 beat 2 (with them in
// registers) at 3 to 8 rows; 8 rows' int16 sums alone take the 16 registers. The AVX-512 VNNI
// builds (amx below AMX4_MIN_ROWS, where int4 takes the tiles), on the Xeon with the float sums in
// memory: blocks of 12 rows took 0.87-0.89x the time of 4's (in registers) at 3 rows, 0.84-0.86x
// at 6 and 8, 0.79x at 12, 0.95x at 64, the same at 1, 2 and 4, and at SmolLM2's shapes (8 rows'
// sums in registers: no better than in memory); one block of 15 no better than 12 + 3.
constexpr int I4P_MT = GQ_AVX512 && GQ_VNNI ? 12 : GQ_AVX512 || I4P_SUMS_IN_MEMORY ? 4 : 2;
// how far ahead of a panel the software prefetch reads, in bytes: without it AVX2's one-row GEMV
// fell a quarter further behind the bandwidth on the Zen 3; a whole panel ahead (40-160 KB at
// GPT-J's sizes) measured no better on the Zen 5, where AVX-512's one row (the fastest stream)
// gained from 4 KB, 2 rows did not, 4 and 8 lost (benchmarks/results/gptj-6b-zen5.md). On the
// Xeon (the hint into L2) a thread's long runs of panels, in layers from SPLIT_MIN_BYTES, streamed
// faster on the hardware's prefetcher alone, but for AVX-512's one row: 2 to 8 rows took
// 0.83-0.95x the time, the 256-bit builds' one row 0.87-0.94x; SmolLM2's small layers were 5-7 %
// slower without it.
constexpr int64_t I4P_AHEAD = 16384, I4P_AHEAD_ONE_ROW = GQ_AVX512 ? 4096 : I4P_AHEAD;
static inline int64_t i4p_ahead(int64_t M, bool long_runs) {  // (0: none)
    if (long_runs && !GQ_STREAM_NTA && !(M == 1 && GQ_AVX512)) return 0;
    return M == 1 ? I4P_AHEAD_ONE_ROW : I4P_AHEAD;
}

static void linear_int4_panels(const uint8_t* P, const float* bias, int64_t N, int64_t K, const int8_t* xq,
                               const float* xs, const float* xsum, int64_t M, float* y, int nthreads) {
    const int64_t ng = K / 32, np = (N + 15) / 16;
    const bool long_runs = np * ng * GB4 >= SPLIT_MIN_BYTES;
    const int64_t dist = i4p_ahead(M, long_runs);
    const auto panel = [&](int64_t p) {
        const int nrows = (int)std::min<int64_t>(16, N - 16 * p);
        const int64_t at = p * ng * GB4;  // panels follow each other: one stream
        const uint8_t* ahead = dist && at + ng * GB4 + dist <= np * ng * GB4 ? P + at + dist : nullptr;
        i4p_span<I4P_MT>(P + at, K, nrows, xq, xs, xsum, bias ? bias + 16 * p : nullptr, y + 16 * p, N, M,
                         ahead);
    };
    if (long_runs) {
        split_tiles(np, nthreads, panel);
    } else {  // (small layers, the bundled model's: the counter's short runs cost more than they save)
#pragma omp parallel for schedule(dynamic, tile_chunk(np, nthreads)) num_threads(nthreads)
        for (int64_t p = 0; p < np; ++p) panel(p);
    }
}

// ---------------------------------------------------------------- int4 weights, GEMM
// From GEMM4_MIN_ROWS rows on, the panels' nibbles are unpacked once per call into one byte a
// value (NP4 rows, VNNI's layout), and their scales and mins into floats, and 4 bytes of an
// activation row are broadcast against them in register blocks of GR4 rows x NV4 vectors. The
// sum P_i of one residue i = g % 4 is taken at a time (GR4 x NV4 accumulators, not 4x that), so
// the bits are those of the loop above; this pays the unpacking once per call and the float
// terms once per group and register block.
// activation rows x weight vectors per register block, measured best at 512 rows on the Zen 5
#if GQ_AVX512
constexpr int GR4 = 6, NV4 = 2;  // 4 x 2, 5 x 2, 8 x 1, 10 x 1, 3 x 3: slower
#elif GQ_VNNI
// 3 x 2, 4 x 2: slower; 6 x 2 as fast
constexpr int GR4 = 4, NV4 = 3;
#else
// on the Zen 3: 3 x 2 4 % slower, 5 x 2 as fast, 3 x 3 slower
constexpr int GR4 = 4, NV4 = 2;
#endif
// With 16 registers, AVX-VNNI's dpbusd leaves room for more int32 accumulators once the float
// sums P live in memory (touched once per group); maddubs' temporaries do not, nor does it pay
// with 32 registers.
constexpr bool P_IN_MEMORY = GQ_VNNI && !GQ_AVX512;
constexpr int NP4 = LW * NV4;  // weight rows per unpacked panel
// below these the few-row loop is as fast (with VNNI's dpbusd it keeps up longer)
#ifndef GEMM4_MIN_ROWS
#define GEMM4_MIN_ROWS (GQ_AVX512 && GQ_VNNI ? 72 : 64)
#endif

// groups of a panel unpacked at a time: GPT-J's 16384-wide fc_out unpacked whole (320 KB with
// its scales and mins) ran at half speed on a Zen 3 core's 512 KB L2. A multiple of 4, so that
// a group's residue g % 4 is that of its index in the chunk.
constexpr int64_t G4_CHUNK = 128;

// P_i of MR activation rows x NP4 weight rows (pout [MR][NP4]) for the groups g = i, i + 4, ..
// below ng of one chunk (wp, sp, mp, xq, xs and xsum start at it), from zero where `first`, else
// on from pout's sums: the order of gemv.h's sequence.
template <int MR>
static inline void i4_gemm_pass(const int32_t* wp, const float* sp, const float* mp, const int8_t* xq,
                                int64_t K, const float* xs, const float* xsum, int64_t ng, int64_t i,
                                float* pout, bool first) {
    const int64_t ldg = K / 32;  // groups per activation row (xs, xsum)
    vf P[MR][NV4];               // unused where P_IN_MEMORY: the sums are kept in pout
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV4; ++v)
            if constexpr (P_IN_MEMORY) {
                if (first) vf_st(pout + r * NP4 + v * LW, vf_zero());
            } else {
                P[r][v] = first ? vf_zero() : vf_ld(pout + r * NP4 + v * LW);
            }
    for (int64_t g = i; g < ng; g += 4) {
        vi D[MR][NV4];
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV4; ++v) D[r][v] = vi_zero();
#if !GQ_VNNI  // (dpbusd accumulates in place; the VNNI builds keep the loop they were measured with)
#pragma GCC unroll 8
#endif
        for (int j = 0; j < 8; ++j) {  // whole: else g++ moves each accumulator at the back edge
            const int64_t q = 8 * g + j;
            vi w[NV4];
            for (int v = 0; v < NV4; ++v) w[v] = vi_load(wp + (q * NV4 + v) * LW);
            for (int r = 0; r < MR; ++r) {
                const vi xb = vi_bcast32(xq + r * K + 4 * q);
                for (int v = 0; v < NV4; ++v)
#if GQ_VNNI
                    D[r][v] = dot_u8s8(D[r][v], w[v], xb);
#else
                    D[r][v] = vi_acc16(D[r][v], vi_maddubs(w[v], xb));
#endif
            }
        }
        vf s[NV4], m[NV4];
        for (int v = 0; v < NV4; ++v) {
            s[v] = vf_ld(sp + g * NP4 + v * LW);
            m[v] = vf_ld(mp + g * NP4 + v * LW);
        }
        for (int r = 0; r < MR; ++r) {
            const vf xv = vf_set(xs[r * ldg + g]), sv = vf_set(xsum[r * ldg + g]);
            for (int v = 0; v < NV4; ++v) {
                const vf t = int4_term(D[r][v], s[v], m[v], xv, sv);
                if constexpr (P_IN_MEMORY)
                    vf_st(pout + r * NP4 + v * LW, vf_add(vf_ld(pout + r * NP4 + v * LW), t));
                else
                    P[r][v] = vf_add(P[r][v], t);
            }
        }
    }
    if constexpr (!P_IN_MEMORY)
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV4; ++v) vf_st(pout + r * NP4 + v * LW, P[r][v]);
}

// One chunk of groups for MR activation rows of one panel, the sums P_i carried in p [4][MR][NP4];
// after the last chunk, y [MR rows, ncols] = (P_0 + P_1) + (P_2 + P_3) (+ bias)
template <int MR>
static inline void i4_gemm_block(const int32_t* wp, const float* sp, const float* mp, const int8_t* xq,
                                 int64_t K, const float* xs, const float* xsum, int64_t ng, bool first,
                                 bool last, float* p, const float* bias, float* y, int64_t ldy, int ncols) {
    for (int i = 0; i < 4; ++i) i4_gemm_pass<MR>(wp, sp, mp, xq, K, xs, xsum, ng, i, p + i * MR * NP4, first);
    if (!last) return;
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV4; ++v) {
            const int n = std::min(LW, ncols - LW * v);
            if (n <= 0) break;
            const int o = r * NP4 + v * LW, d = MR * NP4;
            vf out = vf_add(vf_add(vf_ld(p + o), vf_ld(p + d + o)),
                            vf_add(vf_ld(p + 2 * d + o), vf_ld(p + 3 * d + o)));
            if (bias) out = vf_add(out, vf_load_n(bias + LW * v, n));
            vf_store_n(y + r * ldy + LW * v, out, n);
        }
}

// Rows [n0, n0 + NP4) of the panels (npad rows in them; zeros past), groups [g0, g1), unpacked:
// wp in VNNI's layout, sp[g][j] and mp[g][j] the scale and min of row n0 + j's group g0 + g. A
// vector of LW rows is one half (256-bit) or the whole (512-bit) of each chunk of a panel.
static void pack_panel4(const uint8_t* P, int64_t K, int64_t npad, int64_t n0, int64_t g0, int64_t g1,
                        int32_t* wp, float* sp, float* mp) {
    const int64_t ng = K / 32;
    for (int v = 0; v < NV4; ++v) {
        const int64_t r = n0 + LW * v;
        if (r >= npad) {
            for (int64_t q = 0; q < 8 * (g1 - g0); ++q) vi_store(wp + (q * NV4 + v) * LW, vi_zero());
            for (int64_t g = 0; g < g1 - g0; ++g) {
                vf_st(sp + g * NP4 + LW * v, vf_zero());
                vf_st(mp + g * NP4 + LW * v, vf_zero());
            }
            continue;
        }
        const uint8_t* base = P + r / 16 * ng * GB4;
        const int half = (int)(r % 16) / LW;
        for (int64_t g = 0; g < g1 - g0; ++g) {
            const uint8_t* b = base + (g0 + g) * GB4;
            for (int c = 0; c < 4; ++c) {
                const vi w = vi_load(b + 64 * c + VB * half);
                const int64_t q = 8 * g + 2 * c;
                vi_store(wp + (q * NV4 + v) * LW, vi_lo(w));
                vi_store(wp + ((q + 1) * NV4 + v) * LW, vi_hi(w));
            }
            vf_st(sp + g * NP4 + LW * v, vf_half(b + 256 + 2 * LW * half));
            vf_st(mp + g * NP4 + LW * v, vf_half(b + 288 + 2 * LW * half));
        }
    }
}

// activation bytes per block of rows that every panel meets in turn: all 512 rows of a prompt's
// chunk at K = 16384 (8 MB) left the cache between panels, and the GEMM ran at half speed
constexpr int64_t X4_BLOCK = 2 << 20;

static void linear_int4_gemm(const uint8_t* P, const float* bias, int64_t N, int64_t K, const int8_t* xq,
                             const float* xs, const float* xsum, int64_t M, float* y, int nthreads) {
    const int64_t ng = K / 32, panels = (N + NP4 - 1) / NP4, npad = (N + 15) / 16 * 16;
    const int64_t cg = std::min(ng, G4_CHUNK), nblocks = (M * K + X4_BLOCK - 1) / X4_BLOCK;
    const int64_t mb = ((M + nblocks - 1) / nblocks + GR4 - 1) / GR4 * GR4;  // even blocks of rows
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<int32_t> wp(8 * cg * NP4);
        std::vector<float> sp(cg * NP4), mp(cg * NP4);
        std::vector<float> sums(std::min(M, mb) * 4 * NP4);  // P_i of each register block, across chunks
        for (int64_t m0 = 0; m0 < M; m0 += mb) {
            const int64_t m1 = std::min(M, m0 + mb);
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < panels; ++p) {
                const int64_t n0 = p * NP4;
                const int ncols = (int)std::min<int64_t>(NP4, N - n0);
                const float* b = bias ? bias + n0 : nullptr;
                for (int64_t g0 = 0; g0 < ng; g0 += cg) {
                    const int64_t g1 = std::min(ng, g0 + cg);
                    const bool first = g0 == 0, last = g1 == ng;
                    pack_panel4(P, K, npad, n0, g0, g1, wp.data(), sp.data(), mp.data());
                    int64_t m = m0;
                    for (; m + GR4 <= m1; m += GR4)
                        i4_gemm_block<GR4>(wp.data(), sp.data(), mp.data(), xq + m * K + 32 * g0, K,
                                           xs + m * ng + g0, xsum + m * ng + g0, g1 - g0, first, last,
                                           sums.data() + (m - m0) * 4 * NP4, b, y + m * N + n0, N, ncols);
                    for (; m < m1; ++m)
                        i4_gemm_block<1>(wp.data(), sp.data(), mp.data(), xq + m * K + 32 * g0, K,
                                         xs + m * ng + g0, xsum + m * ng + g0, g1 - g0, first, last,
                                         sums.data() + (m - m0) * 4 * NP4, b, y + m * N + n0, N, ncols);
                }
            }
        }
    }
}

// int4 batches take the AMX tiles from this many rows (amx.cpp): below it the few-row panels'
// blocks of 12 rows are as fast (on the Xeon they took 0.84x the tiles' time at 16 rows, 0.90x at
// 24, 0.99x at 40, 1.02x at 48); and from this many inputs: each 32 rows' pass over K starts and
// ends with work the tiles do not overlap, which SmolLM2's K of 576 and 1536 did not repay (512
// rows: 1.25x the VNNI GEMM's time there, against 0.90-0.95x at GPT-J's 4096 and 16384).
#ifndef AMX4_MIN_ROWS
#define AMX4_MIN_ROWS 48
#endif
constexpr int64_t AMX4_MIN_K = 4096;

void linear_int4(const uint8_t* P, const float* bias, int64_t N, int64_t K, const float* x, int64_t M,
                 float* y, void* scratch, int nthreads) {
    const int64_t ng = K / 32;
    int8_t* xq = (int8_t*)scratch;
    float* xs = (float*)(xq + M * K);
    float* xsum = xs + M * ng;
    quant_act(x, M, K, QB4, xq, xs, xsum, nullptr, nthreads);
    if (M >= AMX4_MIN_ROWS && K >= AMX4_MIN_K && amx_ready())
        linear_int4_amx(P, bias, N, K, xq, xs, xsum, M, y, nthreads);
    else if (M >= GEMM4_MIN_ROWS)
        linear_int4_gemm(P, bias, N, K, xq, xs, xsum, M, y, nthreads);
    else
        linear_int4_panels(P, bias, N, K, xq, xs, xsum, M, y, nthreads);
}

// ---------------------------------------------------------------- dequantization (prefill)
// int8: ws * w; int4: q * s + m (multiply, then add), rounded to bfloat16 where asked: the
// values of quant.dequantize_weight.
static inline void put1(void* out, int64_t j, float v, int bf16) {
    if (bf16)
        ((uint16_t*)out)[j] = to_bf16(v);
    else
        ((float*)out)[j] = v;
}
#if GQ_AVX512
#define DW 16
typedef __m512 dv;
static inline dv dv_set(float a) { return _mm512_set1_ps(a); }
static inline dv dv_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline dv dv_u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline void put(void* out, int64_t j, dv v, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float*)out + j, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u,
                         _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#define dv_mul _mm512_mul_ps
#define dv_add _mm512_add_ps
#else
#define DW 8
typedef __m256 dv;
static inline dv dv_set(float a) { return _mm256_set1_ps(a); }
static inline dv dv_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline dv dv_u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline void put(void* out, int64_t j, dv v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float*)out + j, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u,
                         _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    u = _mm256_srli_epi32(u, 16);
    _mm_storeu_si128((__m128i*)((uint16_t*)out + j),
                     _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}
#define dv_mul _mm256_mul_ps
#define dv_add _mm256_add_ps
#endif

void dequant_int8(const int8_t* W, const float* ws, int64_t n0, int64_t n1, int64_t K, void* out, int bf16,
                  int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        const dv s = dv_set(ws[n]);
#if GQ_VNNI  // W is in panels (int8_panels()): row n's 4 bytes of each k = 4q, flipped back
        const uint8_t* row = (const uint8_t*)W + n / 16 * 16 * K + n % 16 * 4;
        alignas(16) int8_t w[DW];
        for (int64_t j = 0; j < K; j += DW) {  // K % 32 == 0: whole vectors
            for (int i = 0; i < DW; i += 4) {
                uint32_t v;
                memcpy(&v, row + (j + i) * 16, 4);
                v ^= 0x80808080u;
                memcpy(w + i, &v, 4);
            }
            put(o, j, dv_mul(dv_i8(w), s), bf16);
        }
#else
        const int8_t* wp = W + n * K;
        int64_t j = 0;
        for (; j + DW <= K; j += DW) put(o, j, dv_mul(dv_i8(wp + j), s), bf16);
        for (; j < K; ++j) put1(o, j, (float)wp[j] * ws[n], bf16);
#endif
    }
}

void dequant_int4(const uint8_t* P, int64_t n0, int64_t n1, int64_t K, void* out, int bf16, int nthreads) {
    const int64_t ng = K / 32;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        const int j = (int)(n % 16);
        for (int64_t g = 0; g < ng; ++g) {
            const uint8_t* b = P + (n / 16 * ng + g) * GB4;
            const dv s = dv_set(_cvtsh_ss(((const uint16_t*)(b + 256))[j]));
            const dv m = dv_set(_cvtsh_ss(((const uint16_t*)(b + 288))[j]));
            // row j's 4 bytes of each chunk c: values 8c .. 8c + 3 (low nibbles), 8c + 4 .. (high)
            const __m128i w =
                _mm_setr_epi32(*(const int32_t*)(b + 4 * j), *(const int32_t*)(b + 64 + 4 * j),
                               *(const int32_t*)(b + 128 + 4 * j), *(const int32_t*)(b + 192 + 4 * j));
            const __m128i lo = _mm_and_si128(w, _mm_set1_epi8(15));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(w, 4), _mm_set1_epi8(15));
            alignas(16) uint8_t v[32];  // the 32 values in order
            _mm_store_si128((__m128i*)v, _mm_unpacklo_epi32(lo, hi));
            _mm_store_si128((__m128i*)(v + 16), _mm_unpackhi_epi32(lo, hi));
            for (int k = 0; k < 32; k += DW) put(o, g * 32 + k, dv_add(dv_mul(dv_u8(v + k), s), m), bf16);
        }
    }
}

// ---------------------------------------------------------------- quantization (loading)
// The same arithmetic as quantize_weight's torch code (division, round half to even: nearbyintf
// in the default rounding mode), so both give the same bytes; these loops vectorize.
void quantize_int8(const float* w, int64_t n, int64_t k, int8_t* q, float* scales, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < n; ++r) {
        const float* x = w + r * k;
        float am = 0.f;
#pragma omp simd reduction(max : am)
        for (int64_t j = 0; j < k; ++j) {
            const float a = x[j] < 0 ? -x[j] : x[j];
            am = a > am ? a : am;
        }
        const float s = (am > 1e-30f ? am : 1e-30f) / 127.f;
        scales[r] = s;
        for (int64_t j = 0; j < k; ++j) {
            float v = nearbyintf(x[j] / s);
            v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
            q[r * k + j] = (int8_t)v;
        }
    }
}

void quantize_int4(const float* w, int64_t n, int64_t k, int64_t g, uint8_t* q, uint16_t* scales,
                   uint16_t* mins, int nthreads) {
    const int64_t ng = k / g;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t rg = 0; rg < n * ng; ++rg) {
        const float* x = w + rg * g;  // rows are contiguous, so group rg starts at rg * g
        float lo = x[0], hi = x[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
        for (int64_t j = 0; j < g; ++j) {
            lo = x[j] < lo ? x[j] : lo;
            hi = x[j] > hi ? x[j] : hi;
        }
        // scale and min are stored in fp16: quantize with the rounded values
        const float s0 = (hi - lo) / 15.f;
        const uint16_t s16 = _cvtss_sh(s0 > 1e-7f ? s0 : 1e-7f, 0), m16 = _cvtss_sh(lo, 0);
        const float s = _cvtsh_ss(s16), m = _cvtsh_ss(m16);
        scales[rg] = s16;
        mins[rg] = m16;
        uint8_t* out = q + rg * (g / 2);
        for (int64_t j = 0; j < g / 2; ++j) {
            float a = nearbyintf((x[j] - m) / s), b = nearbyintf((x[j + g / 2] - m) / s);
            a = a < 0.f ? 0.f : (a > 15.f ? 15.f : a);
            b = b < 0.f ? 0.f : (b > 15.f ? 15.f : b);
            out[j] = (uint8_t)((uint8_t)a | ((uint8_t)b << 4));
        }
    }
}

}  // namespace gq
