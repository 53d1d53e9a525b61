// int8 weights on AMX tiles (the "amx" variant), for 2 activation rows or more, and int4 from
// AMX4_MIN_ROWS (below, after the int8 kernels). The int8 weights are in
// the panels of the VNNI builds (gemv.h), which are already AMX's B operand: a panel's 16 k-quads
// of 16 rows x 4 bytes are one B tile of 16 x 64 bytes at stride 64, read as one contiguous KB. A
// is the quantized activations as they are (16 rows x 64 bytes at stride K), so nothing is
// repacked per call. tdpbsud multiplies A's signed bytes by B's unsigned w + 128, so each block's
// exact sum is S_b = C - 128 * sum(xq over the block), then gemv.h's float sequence: the same bits
// as every other path.
//
// Blocking: 2 x 2 tiles (32 activation rows against 32 weight rows, 4 C tiles) per 64 k, so each
// tile loaded serves two products; up to 16 activation rows, 1 x 4 (amx_quad_blocks). Each thread
// owns a range of those units of panels and walks K in chunks whose activations stay in the caches
// across its units; the float sums of a chunk live in y between chunks, in block order, so the
// chunking does not change a bit.
#include "gemv.h"
#include "simd.h"

#if GQ_AMX
#include <omp.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>
#endif

namespace gq {

#if !GQ_AMX

bool amx_ready() { return false; }

void linear_int8_amx(const uint8_t*, const float*, const float*, int64_t, int64_t, const Int8Act&, int64_t,
                     float*, int) {}

void linear_int4_amx(const uint8_t*, const float*, int64_t, int64_t, const int8_t*, const float*,
                     const float*, int64_t, float*, int) {}

#else

bool amx_ready() {  // Linux hands out AMX state only on request (once per process)
    static const bool ok =
        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return ok;
}

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles 0..7, each rows[t] rows of colsb[t] bytes.
static void amx_load_config(const int (&rows)[8], const int (&colsb)[8] = {64, 64, 64, 64, 64, 64, 64, 64}) {
    TileConfig cfg = {};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = (uint8_t)rows[t], cfg.colsb[t] = (uint16_t)colsb[t];
    // GCC 12 does not see _tile_loadconfig read cfg and drops the stores above without this
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

// Tiles: C[a][w] = 2a + w (activation group a against panel w), A[a] = 4 + a (ma[a] activation
// rows x 64 bytes), B[w] = 6 + w (16 k-quads x 64 bytes of a panel).
static void amx_configure(int ma0, int ma1) {
    const int ma1_rows = ma1 ? ma1 : 1;
    amx_load_config({ma0, ma0, ma1_rows, ma1_rows, ma0, ma1_rows, 16, 16});
}

// Block b's C tiles of one activation group (c[w]: ma rows x 16 panel rows, W panels) folded into
// its float sums: acc[m][16w + j] = acc + float(S_b) * xs_b, S_b = C - 128 * sum(xq). xs, xis:
// the group's block scales and sums, row m at m * nb.
template <int W>
static inline void amx_fold(const int32_t (*c)[16][16], int ma, const float* xs, const int32_t* xis,
                            int64_t nb, int64_t b, float (*acc)[64]) {
    for (int m = 0; m < ma; ++m) {
        const __m512i corr = _mm512_set1_epi32(xis[m * nb + b] * 128);
        const __m512 s = _mm512_set1_ps(xs[m * nb + b]);
        for (int w = 0; w < W; ++w) {
            float* f = acc[m] + 16 * w;
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[w][m]), corr));
            _mm512_store_ps(f, _mm512_add_ps(_mm512_load_ps(f), _mm512_mul_ps(sum, s)));
        }
    }
}

// The 4 panels' streams are prefetched AMX_AHEAD bytes ahead from AMX_PREFETCH_MIN_ROWS rows: the
// hardware's prefetcher alone left 8 rows reading at 1.25x a streaming read on the Xeon (1.15x with
// it); at 2 and 4 rows it gained nothing. 2 KB ahead measured the same, 8 and 16 KB slower, and
// into L2 (T1) slower.
constexpr int64_t AMX_AHEAD = 4096;
constexpr int AMX_PREFETCH_MIN_ROWS = 6;

// The KB of each of W panels' streams (from P, K bytes of each row) AMX_AHEAD bytes past k's.
template <int W>
static inline void amx_prefetch_panels(const uint8_t* P, int64_t K, int64_t k) {
    if (k * 16 + AMX_AHEAD >= 16 * K) return;
    for (int w = 0; w < W; ++w)
        for (int l = 0; l < 1024; l += 64)
            _mm_prefetch((const char*)(P + w * 16 * K + k * 16 + AMX_AHEAD + l), _MM_HINT_T0);
}

// Blocks [b0, b1) of GA groups of activation rows (ma[a] rows each, from xq) against GW panels
// (from P), into their float sums acc, block after block (amx_fold).
template <int GA, int GW>
static void amx_blocks(const uint8_t* P, int64_t K, const int8_t* xq, const float* xs, const int32_t* xis,
                       int64_t nb, int64_t b0, int64_t b1, const int (&ma)[2], float (*acc)[64],
                       bool prefetch) {
    alignas(64) int32_t cc[2][GA][GW][16][16];
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t end = std::min<int64_t>(K, b * QB8 + QB8);
        int32_t(&c)[GA][GW][16][16] = cc[b & 1];
        _tile_zero(0);
        if (GW == 2) _tile_zero(1);
        if (GA == 2) _tile_zero(2);
        if (GA == 2 && GW == 2) _tile_zero(3);
        for (int64_t k = b * QB8; k < end; k += 64) {
            if (prefetch) amx_prefetch_panels<GW>(P, K, k);
            _tile_loadd(6, P + k * 16, 64);
            if (GW == 2) _tile_loadd(7, P + 16 * K + k * 16, 64);
            _tile_loadd(4, xq + k, K);
            _tile_dpbsud(0, 4, 6);
            if (GW == 2) _tile_dpbsud(1, 4, 7);
            if (GA == 2) {
                _tile_loadd(5, xq + 16 * K + k, K);
                _tile_dpbsud(2, 5, 6);
                if (GW == 2) _tile_dpbsud(3, 5, 7);
            }
        }
        _tile_stored(0, c[0][0], 64);
        if (GW == 2) _tile_stored(1, c[0][GW - 1], 64);
        if (GA == 2) _tile_stored(2, c[GA - 1][0], 64);
        if (GA == 2 && GW == 2) _tile_stored(3, c[GA - 1][GW - 1], 64);
        for (int a = 0; a < GA; ++a)
            amx_fold<GW>(c[a], ma[a], xs + 16 * a * nb, xis + 16 * a * nb, nb, b, acc + 16 * a);
    }
}

// Up to 16 activation rows (a decoding batch) against 4 panels a pass: four independent chains of
// products per block and 4 KB of panels loaded per 64 k, where 2 panels left the stream behind
// the memory. Tiles: C[w] = w, A = 4, B = 5, 6, 7, and 5 again for the fourth panel.
static void amx_configure_quad(int ma) { amx_load_config({ma, ma, ma, ma, ma, 16, 16, 16}); }

static void amx_quad_blocks(const uint8_t* P, int64_t K, const int8_t* xq, const float* xs,
                            const int32_t* xis, int64_t nb, int64_t b0, int64_t b1, int ma, float (*acc)[64],
                            bool prefetch) {
    alignas(64) int32_t cc[2][4][16][16];
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t end = std::min<int64_t>(K, b * QB8 + QB8);
        int32_t(&c)[4][16][16] = cc[b & 1];
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = b * QB8; k < end; k += 64) {
            if (prefetch) amx_prefetch_panels<4>(P, K, k);
            _tile_loadd(4, xq + k, K);
            _tile_loadd(5, P + k * 16, 64);
            _tile_loadd(6, P + 16 * K + k * 16, 64);
            _tile_loadd(7, P + 32 * K + k * 16, 64);
            _tile_dpbsud(0, 4, 5);
            _tile_dpbsud(1, 4, 6);
            _tile_dpbsud(2, 4, 7);
            _tile_loadd(5, P + 48 * K + k * 16, 64);
            _tile_dpbsud(3, 4, 5);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        amx_fold<4>(c, ma, xs, xis, nb, b, acc);
    }
}

// K in chunks of this many bytes of activations (M rows x the chunk), which stay in the caches
// while a thread's panels pass them (1 MB ones ran 6 % slower at 512 rows: y carried the sums more).
constexpr int64_t AMX_CHUNK_BYTES = 1 << 22;

// M >= 2 rows; N % 16 == 0, K % 64 == 0; P: the panels of W.
void linear_int8_amx(const uint8_t* P, const float* ws, const float* bias, int64_t N, int64_t K,
                     const Int8Act& a, int64_t M, float* y, int nthreads) {
    // a thread's unit: 4 panels for up to 16 rows (amx_quad_blocks), else 2
    const int64_t nb = (K + QB8 - 1) / QB8, np = N / 16, per = M <= 16 ? 4 : 2, nunits = (np + per - 1) / per;
    const int64_t chunk = std::max<int64_t>(4, AMX_CHUNK_BYTES / (M * QB8));
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t p0 = nunits * t / nt, p1 = nunits * (t + 1) / nt;
        alignas(64) float acc[32][64];
        int configured = -1;  // the (ma0, ma1) the tiles hold, or 1024 + ma for amx_quad_blocks
        for (int64_t b0 = 0; b0 < nb && p0 < p1; b0 += chunk) {
            const int64_t b1 = std::min(nb, b0 + chunk);
            for (int64_t pr = p0; pr < p1; ++pr) {
                const int64_t r0 = 16 * per * pr;
                const int gw = (int)std::min<int64_t>(per, np - per * pr), cols = 16 * gw;
                const uint8_t* Pp = P + r0 * K;
                for (int64_t m0 = 0; m0 < M; m0 += 32) {
                    const int ma[2] = {(int)std::min<int64_t>(16, M - m0),
                                       (int)std::clamp<int64_t>(M - m0 - 16, 0, 16)};
                    const int rows = ma[0] + ma[1];
                    const int shape = gw == 4 ? 1024 + ma[0] : ma[0] * 32 + ma[1];
                    if (shape != configured) {
                        if (gw == 4)
                            amx_configure_quad(ma[0]);
                        else
                            amx_configure(ma[0], ma[1]);
                        configured = shape;
                    }
                    float* yp = y + m0 * N + r0;
                    for (int m = 0; m < rows; ++m)  // the sums so far: in y after the first chunk
                        for (int j = 0; j < cols; j += 16)
                            _mm512_store_ps(acc[m] + j,
                                            b0 ? _mm512_loadu_ps(yp + m * N + j) : _mm512_setzero_ps());
                    // the panels come from memory for the first rows, then from the caches
                    const bool ahead = m0 == 0 && rows >= AMX_PREFETCH_MIN_ROWS;
                    const int8_t* xq = a.xq + m0 * K;
                    const float* xs = a.xs + m0 * nb;
                    const int32_t* xis = a.xis + m0 * nb;
                    if (gw == 4)
                        amx_quad_blocks(Pp, K, xq, xs, xis, nb, b0, b1, ma[0], acc, ahead);
                    else if (ma[1] && gw == 2)
                        amx_blocks<2, 2>(Pp, K, xq, xs, xis, nb, b0, b1, ma, acc, ahead);
                    else if (ma[1])
                        amx_blocks<2, 1>(Pp, K, xq, xs, xis, nb, b0, b1, ma, acc, ahead);
                    else if (gw >= 2) {  // (a last unit of 3 panels: 2, then 1)
                        amx_blocks<1, 2>(Pp, K, xq, xs, xis, nb, b0, b1, ma, acc, ahead);
                        if (gw == 3)
                            amx_blocks<1, 1>(Pp + 32 * K, K, xq, xs, xis, nb, b0, b1, ma,
                                             (float(*)[64])(&acc[0][32]), ahead);
                    } else
                        amx_blocks<1, 1>(Pp, K, xq, xs, xis, nb, b0, b1, ma, acc, ahead);
                    const bool last = b1 == nb;
                    for (int m = 0; m < rows; ++m)
                        for (int j = 0; j < cols; j += 16) {
                            __m512 v = _mm512_load_ps(acc[m] + j);
                            if (last) {
                                v = _mm512_mul_ps(v, _mm512_loadu_ps(ws + r0 + j));
                                if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + r0 + j));
                            }
                            _mm512_storeu_ps(yp + m * N + j, v);
                        }
                }
            }
        }
        _tile_release();
    }
}

// ---------------------------------------------------------------- int4 weights
// A group of an int4 panel (gemv.h: 4 chunks of 64 bytes, chunk c's low nibbles the k-quad 2c of
// 16 rows, its high ones 2c + 1) unpacked to one byte a value is a B tile of 8 k-quads x 64 bytes,
// and the group's 32 activation bytes of 16 rows an A tile: one tdpbsud gives each pair its exact
// D_g (q is 0..15, so no correction). A unit's panels are unpacked once per block of activation
// rows, their scales and mins widened to floats beside them. What remains per group is gemv.h's
// float term for every pair, into P_(g % 4): the VNNI GEMM's 8 dpbusd per 16 pairs and group go to
// the tiles, its 6 float operations stay.

// Tiles: C[a][w] = 2a + w, A[a] = 4 + a (ma[a] rows x 32 bytes), B[w] = 6 + w (8 k-quads x 64 bytes).
static void amx4_configure(int ma0, int ma1) {
    const int ma1_rows = ma1 ? ma1 : 1;
    amx_load_config({ma0, ma0, ma1_rows, ma1_rows, ma0, ma1_rows, 8, 8}, {64, 64, 64, 64, 32, 32, 64, 64});
}

// A group's unpacked bytes for a unit of up to 2 panels: B tiles, then the panels' scales and mins.
struct alignas(64) Amx4Group {
    uint8_t b[2][8][64];
    float s[2][16], mn[2][16];
};

// Panels [p, p + gw) of P (ng groups each) unpacked into u[0 .. ng).
static void amx4_unpack(const uint8_t* P, int64_t ng, int64_t p, int gw, Amx4Group* u) {
    const __m512i low = _mm512_set1_epi8(15);
    for (int64_t g = 0; g < ng; ++g)
        for (int w = 0; w < gw; ++w) {
            const uint8_t* b = P + ((p + w) * ng + g) * GB4;
            for (int c = 0; c < 4; ++c) {
                const __m512i v = _mm512_loadu_si512(b + 64 * c);
                _mm512_store_si512(u[g].b[w][2 * c], _mm512_and_si512(v, low));
                _mm512_store_si512(u[g].b[w][2 * c + 1], _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
            }
            _mm512_store_ps(u[g].s[w], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 256))));
            _mm512_store_ps(u[g].mn[w], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 288))));
        }
}

// gemv.h's term of a group for one C tile (c: ma activation rows x 16 weight rows) into the sums
// acc[m][j] (those of the group's residue g % 4): acc + (float(D) * (s * xs) + mn * xsum), s and mn
// the panel's, xs and xsum row m's at m * ng.
static inline void amx4_fold(const int32_t (*c)[16], const float* s_, const float* mn_, int ma,
                             const float* xs, const float* xsum, int64_t ng, float (*acc)[32]) {
    const __m512 s = _mm512_load_ps(s_), mn = _mm512_load_ps(mn_);
    for (int m = 0; m < ma; ++m) {
        const __m512 xv = _mm512_set1_ps(xs[m * ng]), sv = _mm512_set1_ps(xsum[m * ng]);
        const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(c[m]));
        const __m512 t = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(s, xv)), _mm512_mul_ps(mn, sv));
        _mm512_store_ps(acc[m], _mm512_add_ps(_mm512_load_ps(acc[m]), t));
    }
}

// GA groups of activation rows (ma[a] each, at xq, xs, xsum: row stride K, ng) against a unit's GW
// unpacked panels u, every group of K; acc[i][m][col]: the sums P_i. As in ggml's AMX kernels, each
// tile's fold of the group before is placed between its zeroing and its next product, so that the
// vector units fold while the tiles multiply (folding a whole group after its products ran ~2x
// slower: a tile's zero, product and store wait on each other).
template <int GA, int GW>
static void amx4_unit(const Amx4Group* u, int64_t K, int64_t ng, const int8_t* xq, const float* xs,
                      const float* xsum, const int (&ma)[2], float (*acc)[32][32]) {
    alignas(64) int32_t cc[2][GA][GW][16][16];
    // tile (a, w)'s sums of group g into acc
    const auto fold = [&](int64_t g, int a, int w) {
        amx4_fold(cc[g & 1][a][w], u[g].s[w], u[g].mn[w], ma[a], xs + 16 * a * ng + g, xsum + 16 * a * ng + g,
                  ng, (float(*)[32])(&acc[g & 3][16 * a][16 * w]));
    };
    // tile (a, w) of group g: zero it, fold its sums of group g - 1, multiply, store
    const auto step = [&](int64_t g, int a, int w) {
        const int t = 2 * a + w;
        switch (t) {  // (tile numbers are immediates)
            case 0: _tile_zero(0); break;
            case 1: _tile_zero(1); break;
            case 2: _tile_zero(2); break;
            default: _tile_zero(3); break;
        }
        if (g > 0) fold(g - 1, a, w);
        switch (t) {
            case 0:
                _tile_dpbsud(0, 4, 6);
                _tile_stored(0, cc[g & 1][a][w], 64);
                break;
            case 1:
                _tile_dpbsud(1, 4, 7);
                _tile_stored(1, cc[g & 1][a][w], 64);
                break;
            case 2:
                _tile_dpbsud(2, 5, 6);
                _tile_stored(2, cc[g & 1][a][w], 64);
                break;
            default:
                _tile_dpbsud(3, 5, 7);
                _tile_stored(3, cc[g & 1][a][w], 64);
                break;
        }
    };
    for (int64_t g = 0; g < ng; ++g) {
        _tile_loadd(6, u[g].b[0], 64);
        _tile_loadd(4, xq + 32 * g, K);
        step(g, 0, 0);
        if (GA == 2) {
            _tile_loadd(5, xq + 16 * K + 32 * g, K);
            step(g, 1, 0);
        }
        if (GW == 2) {
            _tile_loadd(7, u[g].b[1], 64);
            step(g, 0, 1);
            if (GA == 2) step(g, 1, 1);
        }
    }
    for (int a = 0; a < GA; ++a)
        for (int w = 0; w < GW; ++w) fold(ng - 1, a, w);
}

// activation bytes per block of rows that every unit meets in turn, beside a unit's unpacked
// panels (up to 640 KB at K = 16384) in a core's L2
constexpr int64_t AMX4_X_BLOCK = 1 << 20;

void linear_int4_amx(const uint8_t* P, const float* bias, int64_t N, int64_t K, const int8_t* xq,
                     const float* xs, const float* xsum, int64_t M, float* y, int nthreads) {
    const int64_t ng = K / 32, np = (N + 15) / 16, nunits = (np + 1) / 2;
    const int64_t nblocks = (M * K + AMX4_X_BLOCK - 1) / AMX4_X_BLOCK;
    const int64_t mb = ((M + nblocks - 1) / nblocks + 31) / 32 * 32;  // even blocks of 32 rows
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<Amx4Group> units(ng);  // (aligned: C++17 new honours alignas)
        Amx4Group* u = units.data();
        alignas(64) float acc[4][32][32];
        int configured = -1;
        for (int64_t m0 = 0; m0 < M; m0 += mb) {
            const int64_t m1 = std::min(M, m0 + mb);
#pragma omp for schedule(dynamic, 1)
            for (int64_t un = 0; un < nunits; ++un) {
                const int gw = (int)std::min<int64_t>(2, np - 2 * un);
                const int64_t n0 = 32 * un;
                const int ncols = (int)std::min<int64_t>(16 * gw, N - n0);
                amx4_unpack(P, ng, 2 * un, gw, u);
                for (int64_t r = m0; r < m1; r += 32) {
                    const int ma[2] = {(int)std::min<int64_t>(16, m1 - r),
                                       (int)std::clamp<int64_t>(m1 - r - 16, 0, 16)};
                    const int rows = ma[0] + ma[1];
                    if (ma[0] * 32 + ma[1] != configured) {
                        amx4_configure(ma[0], ma[1]);
                        configured = ma[0] * 32 + ma[1];
                    }
                    memset(acc, 0, sizeof acc);
                    const int8_t* x = xq + r * K;
                    const float *s = xs + r * ng, *sum = xsum + r * ng;
                    if (ma[1] && gw == 2)
                        amx4_unit<2, 2>(u, K, ng, x, s, sum, ma, acc);
                    else if (ma[1])
                        amx4_unit<2, 1>(u, K, ng, x, s, sum, ma, acc);
                    else if (gw == 2)
                        amx4_unit<1, 2>(u, K, ng, x, s, sum, ma, acc);
                    else
                        amx4_unit<1, 1>(u, K, ng, x, s, sum, ma, acc);
                    for (int m = 0; m < rows; ++m)
                        for (int j = 0; j < ncols; j += 16) {
                            const __mmask16 k =
                                (__mmask16)(ncols - j >= 16 ? 0xffff : (1u << (ncols - j)) - 1);
                            __m512 v = _mm512_add_ps(
                                _mm512_add_ps(_mm512_load_ps(acc[0][m] + j), _mm512_load_ps(acc[1][m] + j)),
                                _mm512_add_ps(_mm512_load_ps(acc[2][m] + j), _mm512_load_ps(acc[3][m] + j)));
                            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n0 + j));
                            _mm512_mask_storeu_ps(y + (r + m) * N + n0 + j, k, v);
                        }
                }
            }
        }
        _tile_release();
    }
}

#endif

}  // namespace gq
