// The GEMV kernels of gemv.h: activation quantization, int8 and int4 weights (any number of
// rows; int8 weights in rows, or in 16-row panels where the build has VNNI and no AMX; int8
// batches may go to amx.cpp instead), dequantization for prefill GEMMs, and weight quantization
// for loading.
#include "gemv.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace gq {

// x [M,K] fp32 -> xq [M,K] int8, xs [M,nb] scale, and per block (where not null) xsum [M,nb] =
// xs * sum(xq) (int4) or xis [M,nb] = sum(xq) (int8), for nb = ceil(K/qb) blocks of qb values
// (the last one K - (nb-1)*qb, a multiple of 32). 256-bit code in every variant.
// gpv = 0: xq in the order of x. gpv > 0 (int4, qb = 32): the order the int4 kernel reads, in
// spans of gpv blocks (t <= gpv in the last span): the first 16 values of each of the span's
// blocks, then the last 16 of each, matching the low and high nibbles of one weight vector.
static void quant_act(const float* x, int64_t M, int64_t K, int qb, int gpv, int8_t* xq, float* xs,
                      float* xsum, int32_t* xis, int nthreads) {
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
        if (gpv) {
            const int64_t first = b / gpv * gpv, t = nb - first < gpv ? nb - first : gpv;
            lo = xq + row * K + first * 32 + 16 * (b - first);
            hi = lo + 16 * t;
        }
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

// ---------------------------------------------------------------- int8 weights
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

template <int R, int MT>
static inline void i8_tile(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           const int32_t* xis, float* y, int64_t ldy, const float* bias) {
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
            vi w[NV];
            for (int i = 0; i < NV; ++i)
                w[i] = len == QB8     ? vi_load(W + r * K + k0 + i * VB)
                       : i * VB < len ? vi_load_n(W + r * K + k0 + i * VB, len - i * VB)
                                      : vi_zero();
            // prefetch the next tile (the rows that follow; hint: simd.h): one core's demand
            // misses and the hardware prefetcher alone do not keep enough reads in flight
            for (int i = 0; i < QB8 / 64; ++i)
                _mm_prefetch((const char*)(W + R * K + (b * R + r) * QB8 + i * 64), GQ_STREAM_HINT);
            for (int m = 0; m < MT; ++m)
                for (int i = 0; i < NV; ++i) d[r][m] = dot_s8s8(d[r][m], w[i], x[m][i]);
        }
        if constexpr (MT == FW / 4) {  // a vector's 128-bit lanes are the MT rows: one fold for all
            vi t[MT];
            for (int m = 0; m < MT; ++m) t[m] = sum_lanes4(d[0][m], d[1][m], d[2][m], d[3][m]);
            vi sums = vi_fold_each(t);  // lane 4 m + r: S_b of activation row m, weight row r
#if GQ_VNNI
            sums = vi_sub(sums, vi_shl7(vi_lanes(xis + b, nb)));
#endif
            acc_all = vf_add(acc_all, vf_mul(vf_cvt(sums), vf_lanes(xs + b, nb)));
        } else {
            for (int m = 0; m < MT; ++m) {
                __m128i sums = vi_fold(sum_lanes4(d[0][m], d[1][m], d[2][m], d[3][m]));
#if GQ_VNNI
                sums = _mm_sub_epi32(sums, _mm_set1_epi32(128 * xis[m * nb + b]));
#endif
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
    (void)xis;
}

template <int R>
static inline void i8_rows(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           const int32_t* xis, int64_t M, float* y, int64_t ldy, const float* bias) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    int64_t m = 0;
    for (; m + M8 <= M; m += M8)
        i8_tile<R, M8>(W, K, ws, xq + m * K, xs + m * nb, xis + m * nb, y + m * ldy, ldy, bias);
    for (; m < M; ++m) i8_tile<R, 1>(W, K, ws, xq + m * K, xs + m * nb, xis + m * nb, y + m * ldy, ldy, bias);
}

// Weight rows [n, end) against M activation rows: tiles of R8 weight rows, then single rows.
static inline void i8_rows_span(const int8_t* W, int64_t K, const float* ws, const float* bias,
                                const int8_t* xq, const float* xs, const int32_t* xis, int64_t M, float* y,
                                int64_t ldy, int64_t n, int64_t end) {
    for (int64_t j = n; j < end;) {
        const float* bj = bias ? bias + j : nullptr;
        if (j + R8 <= end) {
            i8_rows<R8>(W + j * K, K, ws + j, xq, xs, xis, M, y + j, ldy, bj);
            j += R8;
        } else {
            i8_rows<1>(W + j * K, K, ws + j, xq, xs, xis, M, y + j, ldy, bj);
            ++j;
        }
    }
}

Int8Act quant_act_int8(const float* x, int64_t M, int64_t K, void* scratch, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    Int8Act a;
    a.xq = (int8_t*)scratch;
    a.xs = (float*)(a.xq + M * K);
    a.xis = (int32_t*)(a.xs + M * nb);
    quant_act(x, M, K, QB8, 0, a.xq, a.xs, nullptr, a.xis, nthreads);
    return a;
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
// from here on the loop above loses (measured at GPT-J's shapes): with AVX512-VNNI, once more than
// half a vector of rows is real; otherwise once a vector is full
#if GQ_AVX512 && GQ_VNNI
#define BCAST_MIN_ROWS (ML / 2 + 1)
#else
#define BCAST_MIN_ROWS ML
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
// y[m][r] for m < rows.
template <int R>
static inline void i8_bcast(const int8_t* W, int64_t K, const float* ws, const float* bias, const int32_t* xp,
                            const float* xsp, const int32_t* xip, int rows, float* y, int64_t ldy,
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
            const vi xv = vi_load(xp + q * ML);
            for (int r = 0; r < R; ++r) s[r] = dot_s8s8(s[r], vi_bcast32(W + r * K + 4 * q), xv);
        }
        const vf xs = vf_ld(xsp + b * ML);
#if GQ_VNNI
        const vi corr = vi_load(xip + b * ML);  // 128 * sum(xq) of each row's block, from dpbusd's w + 128
#else
        (void)xip;
#endif
        for (int r = 0; r < R; ++r) {
#if GQ_VNNI
            s[r] = vi_sub(s[r], corr);
#endif
            acc[r] = vf_add(acc[r], vf_mul(vf_cvt(s[r]), xs));
        }
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
    // packed activations: per group, [nq][ML] int32, then its scales [nb][ML] and 128 * block sums
    const int64_t per_group = nq * ML + 2 * nb * ML;
    static thread_local std::vector<int32_t> buf;
    if ((int64_t)buf.size() < groups * per_group) buf.resize(groups * per_group);
    int32_t* packed = buf.data();
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; ++g) {
        int32_t* xp = packed + g * per_group;
        float* xsp = (float*)(xp + nq * ML);
        int32_t* xip = xp + nq * ML + nb * ML;
        for (int j = 0; j < ML; ++j) {
            const int64_t m = g * ML + j;
            for (int64_t q = 0; q < nq; ++q)
                xp[q * ML + j] = m < mv ? *(const int32_t*)(a.xq + m * K + 4 * q) : 0;
            for (int64_t b = 0; b < nb; ++b) {
                xsp[b * ML + j] = m < mv ? a.xs[m * nb + b] : 0.f;
                xip[b * ML + j] = m < mv ? 128 * a.xis[m * nb + b] : 0;
            }
        }
    }
    // chunks of groups whose packed activations stay in the last-level cache (4 MB of them): all
    // weight rows pass over each chunk, so the weights are read from memory once per chunk
    const int64_t chunk = std::max<int64_t>(1, (4 << 20) / (per_group * 4));
    const int64_t nblk = (N + RB - 1) / RB;
    const int8_t* xqt = a.xq + mv * K;
    const float* xst = a.xs + mv * nb;
    const int32_t* xit = a.xis + mv * nb;
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
        const int64_t g1 = std::min(groups, g0 + chunk);
#pragma omp parallel for schedule(dynamic, tile_chunk(nblk, nthreads)) num_threads(nthreads)
        for (int64_t t = 0; t < nblk; ++t) {
            const int64_t n = t * RB;
            for (int64_t g = g0; g < g1; ++g) {
                const int32_t* xp = packed + g * per_group;
                const float* xsp = (const float*)(xp + nq * ML);
                const int32_t* xip = xp + nq * ML + nb * ML;
                const int rows = (int)std::min<int64_t>(ML, mv - g * ML);
                float* yg = y + g * ML * N;
                if (n + RB <= N)
                    i8_bcast<RB>(W + n * K, K, ws + n, bias ? bias + n : nullptr, xp, xsp, xip, rows, yg + n,
                                 N, g == g1 - 1 && n + 2 * RB <= N);
                else
                    for (int64_t j = n; j < N; ++j)
                        i8_bcast<1>(W + j * K, K, ws + j, bias ? bias + j : nullptr, xp, xsp, xip, rows,
                                    yg + j, N);
            }
            if (tail && g1 == groups)  // the rows past the vectors, while this block is in cache
                i8_rows_span(W, K, ws, bias, xqt, xst, xit, tail, y + mv * N, N, n, std::min(N, n + RB));
        }
    }
}

// ---------------------------------------------------------------- int8 weights, GEMM
// g++'s default schedule spills and shuffles the 4 x 3 AVX512-VNNI register block in the inner
// loop; scheduling before register allocation, with register pressure in view, keeps it in place.
// Only here: the same flags slow the 256-bit VNNI GEMM and the int4 GEMM. (With VNNI and no AMX
// the weights are in panels, below: this GEMM then serves the amx build where Linux refuses AMX.)
#if defined(__GNUC__) && !defined(__clang__) && GQ_AVX512 && GQ_VNNI
#pragma GCC push_options
#pragma GCC optimize("schedule-insns", "sched-pressure")
#define GQ_GEMM_SCHED 1
#endif
// From GEMM_MIN_ROWS rows on, lanes are weight rows, as in a GEMM microkernel (oneDNN's brgemm):
// per call each panel of NP8 weight rows is repacked once so that a vector holds LW rows x 4
// bytes of k (VNNI's layout), 4 bytes of an activation row are broadcast, and GR x NV8
// accumulators take the products: fewer loads per product than the loop above, and with VNNI no
// flip per product. VNNI flips the activations to unsigned (x + 128) once, and subtracts 128 *
// (each weight row's block sum) per block; maddubs takes |w| and x with w's sign, as above. Each
// S_b is exact and the float sequence is gemv.h's, so the bits are the same. Below ~64 rows the
// repacking costs more than it saves.
constexpr int LW = VB / 4;  // weight rows per vector
// activation rows x weight vectors per register block, measured best at 512 rows on the Zen 5
#if GQ_AVX512 && GQ_VNNI
constexpr int GR = 4, NV8 = 3;  // 6 x 2, 5 x 2, 3 x 4: slower
#elif GQ_AVX512
constexpr int GR = 6, NV8 = 2;  // 4 x 3, 4 x 2, 3 x 3: slower
#elif GQ_VNNI
constexpr int GR = 4, NV8 = 3;  // 16 registers; 3 x 2, 6 x 2, 5 x 2: slower
#else
constexpr int GR = 3, NV8 = 2;  // 4 x 1, 4 x 2, 5 x 2, 2 x 3, 3 x 3: slower
#endif
constexpr int NP8 = LW * NV8;  // weight rows per panel
#ifndef GEMM_MIN_ROWS
#define GEMM_MIN_ROWS 64
#endif

template <int MR>
static inline void i8_gemm_block(const int32_t* wp, const int32_t* comp, const int32_t* awp,
                                 const uint8_t* xu, int64_t K, const float* xs, int64_t nb, const float* ws,
                                 const float* bias, float* y, int64_t ldy, int ncols) {
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
#if GQ_VNNI
            vi w[NV8];
            for (int v = 0; v < NV8; ++v) w[v] = vi_load(wp + (q * NV8 + v) * LW);
            for (int i = 0; i < MR; ++i) {
                const vi xb = vi_bcast32((const int8_t*)(xu + i * K + 4 * q));
                for (int v = 0; v < NV8; ++v) c[i][v] = dot_u8s8(c[i][v], xb, w[v]);
            }
#else
            // |w| from the panel, w's sign read from memory by each use: registers for accumulators
            vi aw[NV8];
            for (int v = 0; v < NV8; ++v) aw[v] = vi_load(awp + (q * NV8 + v) * LW);
            for (int i = 0; i < MR; ++i) {
                const vi xb = vi_bcast32((const int8_t*)(xu + i * K + 4 * q));
                for (int v = 0; v < NV8; ++v)
                    c[i][v] = dot_u8s8(c[i][v], aw[v], sign_s8(xb, vi_load(wp + (q * NV8 + v) * LW)));
            }
#endif
        }
        vi cv[NV8];
        for (int v = 0; v < NV8; ++v) cv[v] = GQ_VNNI ? vi_load(comp + (b * NV8 + v) * LW) : vi_zero();
        for (int i = 0; i < MR; ++i) {
            const vf s = vf_set(xs[i * nb + b]);
            for (int v = 0; v < NV8; ++v)
                vf_st(f[i][v], vf_add(vf_ld(f[i][v]), vf_mul(vf_cvt(vi_sub(c[i][v], cv[v])), s)));
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
// with VNNI comp[b][j] = 128 * the sum of row j over block b, without it awp = |wp| bytewise.
static void pack_panel(const int8_t* W, int64_t K, int ncols, int32_t* wp, int32_t* comp, int32_t* awp) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    transpose_panel<NV8>((const uint8_t*)W, K, ncols, wp);
    if (!GQ_VNNI) {  // x is not flipped there: nothing to subtract; maddubs takes |w|
        for (int64_t i = 0; i < K / 4 * NV8; ++i) vi_store(awp + i * LW, abs_s8(vi_load(wp + i * LW)));
        return;
    }
    const vi ones = vi_set1_8(1);
    for (int64_t b = 0; b < nb; ++b)
        for (int v = 0; v < NV8; ++v) {
            vi sum = vi_zero();
            for (int64_t q = b * QB8 / 4; q < std::min<int64_t>(b * QB8 + QB8, K) / 4; ++q)
                sum = dot_u8s8(sum, ones, vi_load(wp + (q * NV8 + v) * LW));
            vi_store(comp + (b * NV8 + v) * LW, vi_shl7(sum));
        }
}

static void linear_int8_gemm(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
                             const Int8Act& a, int64_t M, float* y, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8, nq = K / 4, panels = (N + NP8 - 1) / NP8;
#if GQ_VNNI
    static thread_local std::vector<uint8_t> xbuf;
    if ((int64_t)xbuf.size() < M * K + VB) xbuf.resize(M * K + VB);
    uint8_t* xu = xbuf.data();
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t m = 0; m < M; ++m)  // K is a multiple of 32: whole 32-byte pieces
        for (int64_t j = 0; j < K; j += 32)
            _mm256_storeu_si256((__m256i*)(xu + m * K + j),
                                _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(a.xq + m * K + j)),
                                                 _mm256_set1_epi8((char)0x80)));
#else
    const uint8_t* xu = (const uint8_t*)a.xq;  // maddubs takes x as it is, with w's sign
#endif
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<int32_t> wp(nq * NP8), comp(nb * NP8), awp(GQ_VNNI ? 0 : nq * NP8);
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t n0 = p * NP8, ncols = std::min<int64_t>(NP8, N - n0);
            pack_panel(W + n0 * K, K, (int)ncols, wp.data(), comp.data(), awp.data());
            int64_t m = 0;
            for (; m + GR <= M; m += GR)
                i8_gemm_block<GR>(wp.data(), comp.data(), awp.data(), xu + m * K, K, a.xs + m * nb, nb,
                                  ws + n0, bias ? bias + n0 : nullptr, y + m * N + n0, N, (int)ncols);
            for (; m < M; ++m)
                i8_gemm_block<1>(wp.data(), comp.data(), awp.data(), xu + m * K, K, a.xs + m * nb, nb,
                                 ws + n0, bias ? bias + n0 : nullptr, y + m * N + n0, N, (int)ncols);
        }
    }
}

#ifdef GQ_GEMM_SCHED
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- int8 weights in panels
// With VNNI (and no AMX) the int8 weights are held in panels of 16 rows (gemv.h): a vector holds
// LW rows x 4 bytes of k, as in the GEMM above, but laid out at load, so no call repacks them.
// The bytes are w + 128, dpbusd's unsigned operand, and 4 signed bytes of an activation row are
// broadcast against them: S_b = dpbusd sum - 128 * sum(xq over the block), exact. Lanes are weight
// rows, so no lane sums are reduced: a few activation rows cost little more than one (the tiles
// above reduce 4 x 4 lane sums per block). The float sequence is gemv.h's: the same bits.
bool int8_panels() { return GQ_VNNI && !GQ_AMX; }

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
// the last panel read as zeros): y[m][r0 + j]. `prefetch`: the NV vectors that follow (the tile a
// thread most likely takes next), one block ahead. With few accumulators, U of each (q's residues
// mod U): one dpbusd chain would wait on its own latency.
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

template <int MT, int NV>
static inline void i8p_block(const uint8_t* P, int64_t K, int64_t r0, int64_t nrows, int64_t npad,
                             const float* ws, const float* bias, const int8_t* xq, const float* xs,
                             const int32_t* xis, float* y, int64_t ldy, bool prefetch) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    const int nv = (int)std::min<int64_t>(NV, (npad - r0) / LW);  // vectors inside the panels
    alignas(64) float f[MT][NV][LW];                              // gemv.h's float sums, per row and vector
    for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) vf_st(f[m][v], vf_zero());
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t q0 = b * QB8 / 4, q1 = std::min<int64_t>(b * QB8 + QB8, K) / 4;
        if (prefetch)  // this block of the next tile's panels: QB8 x 16 bytes each
            for (int pp = 0; pp < NV * LW / 16; ++pp)
                for (int64_t i = 0; i < QB8 * 16 / 64; ++i)
                    _mm_prefetch((const char*)panel_at(P, K, r0 + NV * LW + 16 * pp, q0) + 64 * i,
                                 _MM_HINT_T0);
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
                            float* y, int64_t ldy, bool prefetch) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    int64_t m = m0;
    for (; m + MT <= M; m += MT) {
        i8p_block<MT, NV>(P, K, r0, nrows, npad, ws, bias, a.xq + m * K, a.xs + m * nb, a.xis + m * nb,
                          y + m * ldy, ldy, prefetch && m == m0);
    }
    if constexpr (MT > 1)
        if (m < M)
            i8p_span<MT / 2, NV>(P, K, r0, nrows, npad, ws, bias, a, m, M, y, ldy, prefetch && m == m0);
}

// activation rows x vectors per block: a panel at a time for a few rows, wider blocks from
// P_GEMM_MIN_ROWS (measured at GPT-J's shapes on the Zen 5; AVX-512 GEMM 4 x 3, 8 x 2, 5 x 3,
// 6 x 3: slower; 256-bit 4 x 3, 4 x 2, 6 x 2: slower)
#if GQ_AVX512
constexpr int P_MT = 8, P_NV = 1, PG_MT = 6, PG_NV = 2, P_GEMM_MIN_ROWS = 10;
#else
constexpr int P_MT = 4, P_NV = 2, PG_MT = 3, PG_NV = 2, P_GEMM_MIN_ROWS = 48;
#endif

static void linear_int8_panels(const uint8_t* P, const float* ws, const float* bias, int64_t N, int64_t K,
                               const Int8Act& a, int64_t M, float* y, int nthreads) {
    const bool gemm = M >= P_GEMM_MIN_ROWS;
    const int64_t rows = gemm ? (int64_t)LW * PG_NV : (int64_t)LW * P_NV, npad = (N + 15) / 16 * 16;
    const int64_t nt = (N + rows - 1) / rows;
#pragma omp parallel for schedule(dynamic, gemm ? 1 : tile_chunk(nt, nthreads)) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t r0 = t * rows, nrows = std::min(rows, N - r0);
        const float* b = bias ? bias + r0 : nullptr;
        if (gemm)
            i8p_span<PG_MT, PG_NV>(P, K, r0, nrows, npad, ws + r0, b, a, 0, M, y + r0, N, false);
        else
            i8p_span<P_MT, P_NV>(P, K, r0, nrows, npad, ws + r0, b, a, 0, M, y + r0, N,
                                 r0 + 2 * rows <= npad);
    }
}
#endif

void linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K, const float* x,
                 int64_t M, float* y, void* scratch, int nthreads) {
#if GQ_VNNI && !GQ_AMX  // W is in panels (int8_panels())
    linear_int8_panels((const uint8_t*)W, ws, bias, N, K, quant_act_int8(x, M, K, scratch, nthreads), M, y,
                       nthreads);
#else
    if (M >= 2 && N % 16 == 0 && amx_ready()) {
        linear_int8_amx(W, ws, bias, N, K, x, M, y, scratch, nthreads);
        return;
    }
    const Int8Act a = quant_act_int8(x, M, K, scratch, nthreads);
    if (M >= GEMM_MIN_ROWS) {
        linear_int8_gemm(W, ws, bias, N, K, a, M, y, nthreads);
        return;
    }
    if (M >= BCAST_MIN_ROWS) {
        linear_int8_bcast(W, ws, bias, N, K, a, M, y, nthreads);
        return;
    }
    const int64_t nt = (N + R8 - 1) / R8;
#pragma omp parallel for schedule(dynamic, tile_chunk(nt, nthreads)) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t n = t * R8;
        if (n + R8 <= N)  // (the one-row decode's hot loop: kept free of the span's bookkeeping)
            i8_rows<R8>(W + n * K, K, ws + n, a.xq, a.xs, a.xis, M, y + n, N, bias ? bias + n : nullptr);
        else
            i8_rows_span(W, K, ws, bias, a.xq, a.xs, a.xis, M, y, N, n, N);
    }
#endif
}

// ---------------------------------------------------------------- int4 weights
// The kernel reads the tiled layout (gemv.h), one sequential stream per thread: per tile of 4
// weight rows, per block of 4 groups, the rows' nibbles (64 bytes each, group g's 16 bytes with
// q[j] | q[j + 16] << 4 at byte j), then their 16 scales and 16 mins (fp16, row r group i at
// 4 r + i). A step is one weight vector a row: GPV = VB/16 groups, its low nibbles pairing with
// the first halves of those groups' activations and its high nibbles with the second halves
// (quant_act stores xq in that order), group i of the step in 128-bit lane i. The 4 rows' lane
// sums reduce into one vector of D, which a permutation puts in lane GPV r + i (row r, group i).
// The terms c_g of gemv.h follow lane by lane; the four sums P_0..P_3 (groups g % 4 = i) are NP
// = 4 / GPV accumulators: step j of a block (groups GPV j ..) adds into accumulator j.
#define GPV (VB / 16)
#define NP (4 / GPV)
#if GQ_AVX512
#define M4 4
#else
#define M4 2
#endif
constexpr int TBLK = 320;  // bytes of a whole block: 4 x 64 nibbles, 16 scales, 16 mins

int64_t int4_tile_bytes(int64_t K) {
    const int64_t ng = K / 32, t = ng % 4;
    return ng / 4 * TBLK + (t ? 64 * t + 64 : 0);
}

// One weight row's part of D (lo, hi: its nibbles) with one activation row (xl, xh), and D of
// 4 rows from their parts, lane 4 i + r. Without VNNI the parts are int16 sums: a pair of
// products <= 2 * 15 * 127, two pairs (lo + hi) <= 7620; AVX2 adds 2 and 4 of them (<= 30480)
// before widening.
static inline vi row_part(vi lo, vi hi, vi xl, vi xh) {
#if GQ_VNNI
    return dot_u8s8(dot_u8s8(vi_zero(), lo, xl), hi, xh);
#elif GQ_AVX512
    return _mm512_add_epi16(_mm512_maddubs_epi16(lo, xl), _mm512_maddubs_epi16(hi, xh));
#else
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
#endif
}

static inline vi reduce_rows(const vi* p) {
#if GQ_VNNI
    return sum_lanes4(p[0], p[1], p[2], p[3]);
#elif GQ_AVX512
    vi d[4];
    for (int r = 0; r < 4; ++r) d[r] = _mm512_madd_epi16(p[r], _mm512_set1_epi16(1));
    return sum_lanes4(d[0], d[1], d[2], d[3]);
#else
    const vi h = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
    return _mm256_madd_epi16(h, _mm256_set1_epi16(1));
#endif
}

// lanes GPV r + i: p[i] for i < t (0 past t), the same for every r
static inline vf broadcast_by_row(const float* p, int t) {
#if GQ_AVX512
    return _mm512_broadcast_f32x4(t == 4 ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps((__mmask8)((1 << t) - 1), p));
#else
    if (t == 2) return _mm256_castpd_ps(_mm256_broadcast_sd((const double*)p));
    return _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(_mm_load_ss(p))));
#endif
}

// lane 4 i + r -> lane GPV r + i
static inline vi by_row(vi d) {
#if GQ_AVX512
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                                    d);
#else
    return _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#endif
}

// lanes 0..3: (P_0 + P_1) + (P_2 + P_3) of rows 0..3, from the accumulators (lanes GPV r + i)
static inline __m128 row_sums(const vf* acc) {
#if GQ_AVX512
    const __m512 a =
        _mm512_add_ps(acc[0], _mm512_permute_ps(acc[0], _MM_SHUFFLE(2, 3, 0, 1)));  // P0+P1, P2+P3
    const __m512 b = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, b));
#else
    const __m256 p01 =
        _mm256_add_ps(acc[0], _mm256_permute_ps(acc[0], _MM_SHUFFLE(2, 3, 0, 1)));  // lane 2r: P0+P1
    const __m256 p23 =
        _mm256_add_ps(acc[1], _mm256_permute_ps(acc[1], _MM_SHUFFLE(2, 3, 0, 1)));  // lane 2r: P2+P3
    const __m256 b = _mm256_add_ps(p01, p23);
    return _mm256_castps256_ps128(_mm256_permutevar8x32_ps(b, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
#endif
}

// A block's 16 fp16 (row r, group i at 4 r + i) as the steps' lanes: out[j] lane GPV r + i holds
// group GPV j + i. AVX2 steps take 2 groups: dwords 2r + j, gathered by one permutation.
static inline void block_lanes(const uint16_t* p, vf* out) {
#if GQ_AVX512
    out[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
    const __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)p),
                                                  _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
#endif
}

// One step of a tile: the 4 rows' nibbles at w (row stride ws, len bytes a row: 16 per group, len
// < VB only in the last block), the MT activation rows' halves at xq + m K (len bytes each), their
// scales xs and xsum at + m ng: acc[m] += float(D) * (s * xs) + mins * xsum (lanes GPV r + i).
template <int MT>
static inline void i4_step(const uint8_t* w, int64_t ws, int len, const int8_t* xq, int64_t K,
                           const float* xs, const float* xsum, int64_t ng, vf s, vf mv, vf (&acc)[MT]) {
    vi xl[MT], xh[MT], part[MT][4];
    for (int m = 0; m < MT; ++m) {
        xl[m] = len == VB ? vi_load(xq + m * K) : vi_load_n(xq + m * K, len);
        xh[m] = len == VB ? vi_load(xq + m * K + VB) : vi_load_n(xq + m * K + len, len);
    }
    for (int r = 0; r < 4; ++r) {
        const vi wv = len == VB ? vi_load(w + r * ws) : vi_load_n(w + r * ws, len);
        const vi lo = vi_lo(wv), hi = vi_hi(wv);
        for (int m = 0; m < MT; ++m) part[m][r] = row_part(lo, hi, xl[m], xh[m]);
    }
    for (int m = 0; m < MT; ++m) {
        const vf xv = broadcast_by_row(xs + m * ng, len / 16), sv = broadcast_by_row(xsum + m * ng, len / 16);
        const vf d = vf_cvt(by_row(reduce_rows(part[m])));
        acc[m] = vf_add(acc[m], vf_add(vf_mul(d, vf_mul(s, xv)), vf_mul(mv, sv)));
    }
}

// One tile T (4 weight rows, the first `rows` real; tb bytes) against MT activation rows.
template <int MT>
static inline void i4_tile(const uint8_t* T, int64_t tb, int64_t K, const int8_t* xq, const float* xs,
                           const float* xsum, float* y, int64_t ldy, const float* bias, int rows) {
    const int64_t ng = K / 32, full = ng / 4, t = ng % 4;
    vf acc[NP][MT];
    for (int j = 0; j < NP; ++j)
        for (int m = 0; m < MT; ++m) acc[j][m] = vf_zero();
    for (int64_t b = 0; b < full; ++b) {
        const uint8_t* p = T + b * TBLK;
        // the same block of the next tile (hint: simd.h): the hardware prefetcher alone falls
        // behind once several activation rows make a block slow (measured: up to 2.5x slower)
        for (int i = 0; i < TBLK; i += 64) _mm_prefetch((const char*)(p + tb + i), GQ_STREAM_HINT);
        vf s[NP], mv[NP];
        block_lanes((const uint16_t*)(p + 256), s);
        block_lanes((const uint16_t*)(p + 288), mv);
        for (int j = 0; j < NP; ++j)
            i4_step<MT>(p + j * VB, 64, VB, xq + b * 128 + j * 2 * VB, K, xs + 4 * b + GPV * j,
                        xsum + 4 * b + GPV * j, ng, s[j], mv[j], acc[j]);
    }
    if (t) {  // the last block, of t groups
        const uint8_t* p = T + full * TBLK;
        vf s[NP], mv[NP];
        block_lanes((const uint16_t*)(p + 64 * t), s);
        block_lanes((const uint16_t*)(p + 64 * t + 32), mv);
        for (int j = 0; j < NP && GPV * j < t; ++j) {
            const int len = 16 * (int)std::min<int64_t>(GPV, t - GPV * j);
            i4_step<MT>(p + j * VB, 16 * t, len, xq + full * 128 + j * 2 * VB, K, xs + 4 * full + GPV * j,
                        xsum + 4 * full + GPV * j, ng, s[j], mv[j], acc[j]);
        }
    }
    for (int m = 0; m < MT; ++m) {
        vf a[NP];
        for (int j = 0; j < NP; ++j) a[j] = acc[j][m];
        alignas(16) float out[4];
        _mm_store_ps(out, row_sums(a));
        for (int r = 0; r < rows; ++r) y[m * ldy + r] = bias ? out[r] + bias[r] : out[r];
    }
}

// Where row n's group g lies in the tiles: its 16 nibble bytes, its scale and its min.
struct Int4At {
    const uint8_t* q;
    const uint16_t* s;
    const uint16_t* m;
};
static inline Int4At int4_at(const uint8_t* T, int64_t tb, int64_t ng, int64_t n, int64_t g) {
    const int64_t b = g / 4, i = g % 4, t = std::min<int64_t>(4, ng - 4 * b), r = n % 4;
    const uint8_t* p = T + n / 4 * tb + b * TBLK;
    const uint16_t* sp = (const uint16_t*)(p + 64 * t) + 4 * r + i;
    return {p + 16 * t * r + 16 * i, sp, sp + 16};
}

void pack_int4_tiles(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, int64_t N, int64_t K,
                     uint8_t* T, int nthreads) {
    const int64_t ng = K / 32, tb = int4_tile_bytes(K), nt = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t tile = 0; tile < nt; ++tile) {
        uint8_t* p = T + tile * tb;
        for (int64_t g = 0; g < ng; g += 4, p += TBLK) {
            const int t = (int)std::min<int64_t>(4, ng - g);  // groups in this block
            // zeros where no row or group is (the padding rows of a last tile; a last block's
            // slots past its t groups): D = 0 and s = m = 0 there, so those lanes add 0
            if (t < 4 || 4 * tile + 4 > N) memset(p, 0, 64 * t + 64);
            uint16_t* s = (uint16_t*)(p + 64 * t);
            for (int64_t r = 0, n = 4 * tile; r < 4 && n < N; ++r, ++n) {
                memcpy(p + 16 * t * r, W + n * (K / 2) + 16 * g, 16 * t);
                memcpy(s + 4 * r, sc + n * ng + g, 2 * t);
                memcpy(s + 16 + 4 * r, mn + n * ng + g, 2 * t);
            }
        }
    }
}

// ---------------------------------------------------------------- int4 weights, GEMM
// From GEMM4_MIN_ROWS rows on, as for int8: lanes are weight rows. Per call each panel of NP4
// rows is unpacked from the tiles to one byte a value (0..15) in VNNI's layout, with its scales
// and mins as floats, and 4 bytes of an activation row are broadcast against it. The values are
// unsigned, the activations signed: dpbusd's operands as they are, with nothing to flip or
// subtract; without VNNI maddubs' int16 pair sums add up over a group (8 x 2 x 15 x 127 <= 32767)
// and widen once. The float terms are gemv.h's, group by group, and the sum P_i of one residue
// i = g % 4 is taken at a time (GR4 x NV4 accumulators, not 4x that), so the bits are those of
// the tiles' loop above. The tiles' loop reduces lanes and converts per 4 rows and group; this
// pays that once per group and register block.
// activation rows x weight vectors per register block, measured best at 512 rows on the Zen 5
#if GQ_AVX512
constexpr int GR4 = 6, NV4 = 2;  // 4 x 2, 5 x 2, 8 x 1, 10 x 1, 3 x 3: slower
#elif GQ_VNNI
constexpr int GR4 = 4, NV4 = 3;  // 3 x 2, 4 x 2: slower; 6 x 2 as fast
#else
constexpr int GR4 = 3, NV4 = 2;  // 2 x 2, 4 x 1, 5 x 1, 4 x 2: slower
#endif
// With 16 registers, AVX-VNNI's dpbusd leaves room for more int32 accumulators once the float
// sums P live in memory (touched once per group); maddubs' temporaries do not, nor does it pay
// with 32 registers.
constexpr bool P_IN_MEMORY = GQ_VNNI && !GQ_AVX512;
constexpr int NP4 = LW * NV4;  // weight rows per panel: whole tiles
// below these the tiles' loop is as fast (with VNNI's dpbusd it keeps up longer)
#ifndef GEMM4_MIN_ROWS
#define GEMM4_MIN_ROWS (GQ_AVX512 && GQ_VNNI ? 72 : 64)
#endif

// P_i of MR activation rows x NP4 weight rows (pout [MR][NP4]) for the groups g = i, i + 4, ..
template <int MR>
static inline void i4_gemm_pass(const int32_t* wp, const float* sp, const float* mp, const int8_t* xq,
                                int64_t K, const float* xs, const float* xsum, int64_t ng, int64_t i,
                                float* pout) {
    vf P[MR][NV4];  // unused where P_IN_MEMORY: the sums are kept in pout
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV4; ++v)
            if constexpr (P_IN_MEMORY)
                vf_st(pout + r * NP4 + v * LW, vf_zero());
            else
                P[r][v] = vf_zero();
    for (int64_t g = i; g < ng; g += 4) {
        vi D[MR][NV4];
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV4; ++v) D[r][v] = vi_zero();
        for (int64_t q = 8 * g; q < 8 * g + 8; ++q) {
            vi w[NV4];
            for (int v = 0; v < NV4; ++v) w[v] = vi_load(wp + (q * NV4 + v) * LW);
            for (int r = 0; r < MR; ++r) {
                const vi xb = vi_bcast32(xq + r * K + 4 * q);
                for (int v = 0; v < NV4; ++v)
#if GQ_VNNI
                    D[r][v] = dot_u8s8(D[r][v], w[v], xb);
#else
                    D[r][v] = vi_add16(D[r][v], vi_maddubs(w[v], xb));
#endif
            }
        }
        vf s[NV4], m[NV4];
        for (int v = 0; v < NV4; ++v) {
            s[v] = vf_ld(sp + g * NP4 + v * LW);
            m[v] = vf_ld(mp + g * NP4 + v * LW);
        }
        for (int r = 0; r < MR; ++r) {
            const vf xv = vf_set(xs[r * ng + g]), sv = vf_set(xsum[r * ng + g]);
            for (int v = 0; v < NV4; ++v) {
#if GQ_VNNI
                const vf d = vf_cvt(D[r][v]);
#else
                const vf d = vf_cvt(vi_widen16(D[r][v]));
#endif
                const vf t = vf_add(vf_mul(d, vf_mul(s[v], xv)), vf_mul(m[v], sv));
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

// y [MR rows, ncols] of one panel: (P_0 + P_1) + (P_2 + P_3) (+ bias)
template <int MR>
static inline void i4_gemm_block(const int32_t* wp, const float* sp, const float* mp, const int8_t* xq,
                                 int64_t K, const float* xs, const float* xsum, const float* bias, float* y,
                                 int64_t ldy, int ncols) {
    const int64_t ng = K / 32;
    alignas(64) float p[4][MR * NP4];
    for (int i = 0; i < 4; ++i) i4_gemm_pass<MR>(wp, sp, mp, xq, K, xs, xsum, ng, i, p[i]);
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV4; ++v) {
            const int n = std::min(LW, ncols - LW * v);
            if (n <= 0) break;
            const int o = r * NP4 + v * LW;
            vf out =
                vf_add(vf_add(vf_ld(p[0] + o), vf_ld(p[1] + o)), vf_add(vf_ld(p[2] + o), vf_ld(p[3] + o)));
            if (bias) out = vf_add(out, vf_load_n(bias + LW * v, n));
            vf_store_n(y + r * ldy + LW * v, out, n);
        }
}

// A group's 16 nibble bytes (byte k: values k and k + 16) as its 32 values, one byte each
static inline void unpack_group(const uint8_t* q, uint8_t* out) {
    const __m128i b = _mm_loadu_si128((const __m128i*)q), lo = _mm_set1_epi8(15);
    _mm_storeu_si128((__m128i*)out, _mm_and_si128(b, lo));
    _mm_storeu_si128((__m128i*)(out + 16), _mm_and_si128(_mm_srli_epi16(b, 4), lo));
}

// Rows [n0, n0 + ncols) of the tiles as a panel: wp in VNNI's layout (rows: scratch of NP4 x K
// bytes), sp[g][j] and mp[g][j] the scale and min of row n0 + j's group g (zeros past ncols).
// Whole tiles' whole blocks are read in their own order, their 16 scales and 16 mins converted
// 4 at a time and transposed to groups x rows; the rest goes group by group through int4_at.
static void pack_panel4(const uint8_t* T, int64_t K, int64_t n0, int ncols, uint8_t* rows, int32_t* wp,
                        float* sp, float* mp) {
    const int64_t ng = K / 32, tb = int4_tile_bytes(K);
    for (int j0 = 0; j0 < NP4; j0 += 4) {  // a tile of 4 rows (NP4 is whole tiles; n0 starts one)
        const uint8_t* tile = T + (n0 + j0) / 4 * tb;
        for (int64_t g0 = 0; g0 < ng; g0 += 4) {  // a block of 4 groups
            const uint8_t* p = tile + g0 / 4 * TBLK;
            const int t = (int)std::min<int64_t>(4, ng - g0);
            if (j0 + 4 > ncols || t < 4) {  // the panel's last rows, the last partial block
                for (int r = 0; r < 4; ++r)
                    for (int i = 0; i < t; ++i) {
                        const int j = j0 + r;
                        const int64_t g = g0 + i;
                        uint8_t* out = rows + j * K + 32 * g;
                        if (j >= ncols) {
                            memset(out, 0, 32);
                            sp[g * NP4 + j] = mp[g * NP4 + j] = 0.f;
                            continue;
                        }
                        const Int4At at = int4_at(T, tb, ng, n0 + j, g);
                        unpack_group(at.q, out);
                        sp[g * NP4 + j] = _cvtsh_ss(*at.s);
                        mp[g * NP4 + j] = _cvtsh_ss(*at.m);
                    }
                continue;
            }
            // whole: row r's group i at p + 64 r + 16 i; scales (then mins) of (r, i) at 4 r + i
            for (int r = 0; r < 4; ++r)
                for (int i = 0; i < 4; ++i)
                    unpack_group(p + 64 * r + 16 * i, rows + (j0 + r) * K + 32 * (g0 + i));
            const uint16_t* h = (const uint16_t*)(p + 256);
            for (int k = 0; k < 2; ++k, h += 16) {  // scales, then mins: rows x groups -> groups x rows
                __m128 c0 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)h));
                __m128 c1 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(h + 4)));
                __m128 c2 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(h + 8)));
                __m128 c3 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(h + 12)));
                _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
                float* d = (k ? mp : sp) + g0 * NP4 + j0;
                _mm_storeu_ps(d, c0);
                _mm_storeu_ps(d + NP4, c1);
                _mm_storeu_ps(d + 2 * NP4, c2);
                _mm_storeu_ps(d + 3 * NP4, c3);
            }
        }
    }
    transpose_panel<NV4>(rows, K, NP4, wp);
}

static void linear_int4_gemm(const uint8_t* T, const float* bias, int64_t N, int64_t K, const int8_t* xq,
                             const float* xs, const float* xsum, int64_t M, float* y, int nthreads) {
    const int64_t ng = K / 32, panels = (N + NP4 - 1) / NP4;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<uint8_t> rows(NP4 * K);
        std::vector<int32_t> wp(K / 4 * NP4);
        std::vector<float> sp(ng * NP4), mp(ng * NP4);
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t n0 = p * NP4;
            const int ncols = (int)std::min<int64_t>(NP4, N - n0);
            pack_panel4(T, K, n0, ncols, rows.data(), wp.data(), sp.data(), mp.data());
            const float* b = bias ? bias + n0 : nullptr;
            int64_t m = 0;
            for (; m + GR4 <= M; m += GR4)
                i4_gemm_block<GR4>(wp.data(), sp.data(), mp.data(), xq + m * K, K, xs + m * ng, xsum + m * ng,
                                   b, y + m * N + n0, N, ncols);
            for (; m < M; ++m)
                i4_gemm_block<1>(wp.data(), sp.data(), mp.data(), xq + m * K, K, xs + m * ng, xsum + m * ng,
                                 b, y + m * N + n0, N, ncols);
        }
    }
}

void linear_int4(const uint8_t* T, const float* bias, int64_t N, int64_t K, const float* x, int64_t M,
                 float* y, void* scratch, int nthreads) {
    const int64_t ng = K / 32;
    int8_t* xq = (int8_t*)scratch;
    float* xs = (float*)(xq + M * K);
    float* xsum = xs + M * ng;
    if (M >= GEMM4_MIN_ROWS) {  // xq in the order of x
        quant_act(x, M, K, QB4, 0, xq, xs, xsum, nullptr, nthreads);
        linear_int4_gemm(T, bias, N, K, xq, xs, xsum, M, y, nthreads);
        return;
    }
    quant_act(x, M, K, QB4, GPV, xq, xs, xsum, nullptr, nthreads);
    const int64_t nt = (N + 3) / 4, tb = int4_tile_bytes(K);
#pragma omp parallel for schedule(dynamic, tile_chunk(nt, nthreads)) num_threads(nthreads)
    for (int64_t tile = 0; tile < nt; ++tile) {
        const int64_t n = tile * 4;
        const int rows = (int)std::min<int64_t>(4, N - n);
        const float* b = bias ? bias + n : nullptr;
        int64_t m = 0;
        for (; m + M4 <= M; m += M4)
            i4_tile<M4>(T + tile * tb, tb, K, xq + m * K, xs + m * ng, xsum + m * ng, y + m * N + n, N, b,
                        rows);
        for (; m < M; ++m)
            i4_tile<1>(T + tile * tb, tb, K, xq + m * K, xs + m * ng, xsum + m * ng, y + m * N + n, N, b,
                       rows);
    }
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
static inline __m512i du_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
}
static inline dv dv_lo(__m512i b) { return _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))); }
static inline dv dv_hi(__m512i b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)); }
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
static inline __m256i du_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}
static inline dv dv_lo(__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))); }
static inline dv dv_hi(__m256i b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }
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
        const int8_t* wp = W + n * K;
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        const dv s = dv_set(ws[n]);
        int64_t j = 0;
        for (; j + DW <= K; j += DW) put(o, j, dv_mul(dv_i8(wp + j), s), bf16);
        for (; j < K; ++j) put1(o, j, (float)wp[j] * ws[n], bf16);
    }
}

void dequant_int4(const uint8_t* T, int64_t n0, int64_t n1, int64_t K, void* out, int bf16, int nthreads) {
    const int64_t ng = K / 32, tb = int4_tile_bytes(K);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        for (int64_t g = 0; g < ng; ++g) {
            const Int4At at = int4_at(T, tb, ng, n, g);
            const dv vs = dv_set(_cvtsh_ss(*at.s)), vm = dv_set(_cvtsh_ss(*at.m));
            for (int j = 0; j < 16; j += DW) {  // byte j: value j (low nibble), value j + 16 (high)
                const auto b = du_u8(at.q + j);
                put(o, g * 32 + j, dv_add(dv_mul(dv_lo(b), vs), vm), bf16);
                put(o, g * 32 + 16 + j, dv_add(dv_mul(dv_hi(b), vs), vm), bf16);
            }
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
