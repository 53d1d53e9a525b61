// int8 weights on AMX tiles (the "amx" variant), for 2 activation rows or more.
// With several activation rows the VNNI loop of gemv.cpp is compute-bound (at 8 rows a step
// costs 1.55x one row). AMX multiplies tiles instead: A = 16 weight rows x 64 bytes, read
// straight from W (stride K); B = the activations of those 64 columns for up to 16 rows,
// repacked once per call into AMX's layout (4 consecutive k of one row side by side); C = 16 x 16
// int32, one per activation block: its exact block sums, scaled as gemv.h says.
#include "gemv.h"
#include "simd.h"

#if GQ_AMX
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>
#endif

namespace gq {

#if !GQ_AMX

bool amx_ready() { return false; }

void linear_int8_amx(const int8_t*, const float*, const float*, int64_t, int64_t, const float*, int64_t,
                     float*, void*, int) {}

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

// Activation rows go in groups of up to 16 (a C tile's width), at most two per pass. Tiles:
// A [16 x 64] and [16 x 32] weights (1, 3: for a last 32 columns); per group g: C (0 | 5),
// B [16 x 4Mg] for 64 columns (2 | 6) and [8 x 4Mg] for 32 (4 | 7).
static void amx_configure(int M0, int M1) {
    TileConfig cfg = {};
    cfg.palette = 1;
    cfg.rows[1] = 16, cfg.colsb[1] = 64;
    cfg.rows[3] = 16, cfg.colsb[3] = 32;
    const int tiles[2][3] = {{0, 2, 4}, {5, 6, 7}};
    for (int g = 0; g < 2; ++g) {
        const uint16_t width = (uint16_t)(4 * (g ? (M1 ? M1 : 1) : M0));
        cfg.rows[tiles[g][0]] = 16, cfg.colsb[tiles[g][0]] = width;
        cfg.rows[tiles[g][1]] = 16, cfg.colsb[tiles[g][1]] = width;
        cfg.rows[tiles[g][2]] = 8, cfg.colsb[tiles[g][2]] = width;
    }
    // GCC 12 does not see _tile_loadconfig read cfg and drops the stores above without this
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

// One group's C tile, scaled by its block scales `sc` (lanes m) into acc: acc + float(S) * xs.
static inline void amx_accumulate(int32_t (&c)[16][16], __m512 sc, __m512 (&acc)[16]) {
    for (int i = 0; i < 16; ++i)
        acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[i])), sc));
}

static inline void amx_store(const __m512 (&acc)[16], const float* ws, const float* bias, int rows, float* y,
                             int64_t ldy) {
    alignas(64) float out[16];
    for (int i = 0; i < 16; ++i) {
        _mm512_store_ps(out, acc[i]);
        for (int m = 0; m < rows; ++m) {
            float v = out[m] * ws[i];
            if (bias) v = v + bias[i];
            y[m * ldy + i] = v;
        }
    }
}

// 16 weight rows against G groups of activation rows (M0 rows, then M1); xb[g]: group g's
// activations repacked (per 32 columns, 8 rows of [Mg][4] bytes); xst[g]: its block scales
// [nb][16], lanes m (zero past Mg).
template <int G>
static inline void i8_amx_tile(const int8_t* W, int64_t K, const float* ws, int8_t* const* xb,
                               float* const* xst, int M0, int M1, float* y, int64_t ldy, const float* bias) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    alignas(64) int32_t c[16][16] = {};
    __m512 acc0[16], acc1[16];
    for (int i = 0; i < 16; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * QB8, end = K - k0 < QB8 ? K : k0 + QB8;
        _tile_zero(0);
        if (G == 2) _tile_zero(5);
        int64_t k = k0;
        for (; k + 64 <= end; k += 64) {
            _tile_loadd(1, W + k, K);
            _tile_loadd(2, xb[0] + k * M0, 4 * M0);
            _tile_dpbssd(0, 1, 2);
            if (G == 2) {
                _tile_loadd(6, xb[1] + k * M1, 4 * M1);
                _tile_dpbssd(5, 1, 6);
            }
        }
        if (k < end) {  // a last 32
            _tile_loadd(3, W + k, K);
            _tile_loadd(4, xb[0] + k * M0, 4 * M0);
            _tile_dpbssd(0, 3, 4);
            if (G == 2) {
                _tile_loadd(7, xb[1] + k * M1, 4 * M1);
                _tile_dpbssd(5, 3, 7);
            }
        }
        _tile_stored(0, c, 64);
        amx_accumulate(c, _mm512_loadu_ps(xst[0] + b * 16), acc0);
        if (G == 2) {
            _tile_stored(5, c, 64);
            amx_accumulate(c, _mm512_loadu_ps(xst[1] + b * 16), acc1);
        }
    }
    amx_store(acc0, ws, bias, M0, y, ldy);
    if (G == 2) amx_store(acc1, ws, bias, M1, y + M0 * ldy, ldy);
}

// M >= 2 rows; N % 16 == 0. scratch as for linear_int8. Each thread takes 16 weight rows at a
// time through every pass of 32 activation rows, so the weights come from memory once (later
// passes find them in L2).
void linear_int8_amx(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
                     const float* x, int64_t M, float* y, void* scratch, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8, ng = (M + 15) / 16;
    const Int8Act a = quant_act_int8(x, M, K, scratch, nthreads);
    const int8_t* xq = a.xq;
    const float* xs = a.xs;
    static thread_local std::vector<int8_t> xb_buf;  // repacked activations, transposed scales
    static thread_local std::vector<float> xst_buf;
    if ((int64_t)xb_buf.size() < ng * 16 * K) xb_buf.resize(ng * 16 * K);
    if ((int64_t)xst_buf.size() < ng * 16 * nb) xst_buf.resize(ng * 16 * nb);
    // group g: rows 16g.. (16 or what is left); xb: its activations, xst: its block scales.
    // (Plain locals: the other threads would see their own thread_local buffers.)
    int8_t* const xb_all = xb_buf.data();
    float* const xst_all = xst_buf.data();
    auto xb = [=](int64_t g) { return xb_all + g * 16 * K; };
    auto xst = [=](int64_t g) { return xst_all + g * 16 * nb; };
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K >= 65536)
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t first = g * 16, rows = M - first < 16 ? M - first : 16;
        for (int64_t k4 = 0; k4 < K / 4; ++k4)  // xb(g)[k/32][(k%32)/4][m][k%4] = xq[first+m][k]
            for (int64_t m = 0; m < rows; ++m)
                memcpy(xb(g) + (k4 / 8) * 32 * rows + (k4 % 8) * 4 * rows + m * 4,
                       xq + (first + m) * K + k4 * 4, 4);
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t m = 0; m < 16; ++m) xst(g)[b * 16 + m] = m < rows ? xs[(first + m) * nb + b] : 0.f;
    }
    const int64_t nt = N / 16;
    const int64_t chunk = nt / (16 * nthreads) > 1 ? nt / (16 * nthreads) : 1;
#pragma omp parallel num_threads(nthreads)
    {
        int configured = -1;  // the pass whose row counts the tiles hold
#pragma omp for schedule(dynamic, chunk)
        for (int64_t t = 0; t < nt; ++t) {
            const float* bt = bias ? bias + t * 16 : nullptr;
            for (int64_t g = 0; g < ng; g += 2) {  // a pass: groups g and g + 1
                const int M0 = M - g * 16 < 16 ? (int)(M - g * 16) : 16;
                const int M1 = g + 1 < ng ? (M - (g + 1) * 16 < 16 ? (int)(M - (g + 1) * 16) : 16) : 0;
                const int shape = M0 * 32 + M1;
                if (shape != configured) amx_configure(M0, M1), configured = shape;
                int8_t* const pxb[2] = {xb(g), M1 ? xb(g + 1) : nullptr};
                float* const pxs[2] = {xst(g), M1 ? xst(g + 1) : nullptr};
                if (M1)
                    i8_amx_tile<2>(W + t * 16 * K, K, ws + t * 16, pxb, pxs, M0, M1, y + g * 16 * N + t * 16,
                                   N, bt);
                else
                    i8_amx_tile<1>(W + t * 16 * K, K, ws + t * 16, pxb, pxs, M0, M1, y + g * 16 * N + t * 16,
                                   N, bt);
            }
        }
        _tile_release();
    }
}

#endif

}  // namespace gq
