// Weight-only quantized GEMV kernels (int8 per output row, int4 in groups of 32), shared by
// gemv.cpp, amx.cpp and the decode step. Formats: gptj/quant.py.
//
// The activations x [M, K] are quantized per block of values (int8 weights: blocks of 128, the
// last one K % 128 where that is not 0; int4: blocks of 32, the weight groups):
//     amax = max |x|,  xs = amax / 127,  inv = amax > 0 ? 127 / amax : 0,  xq = round(x * inv)
// (round half to even), so each block's dot product with the weights is exact in int32. The
// float operations after it are a fixed sequence of float32 multiplies and adds (the library is
// built with -ffp-contract=off), the same in every variant and for any number of rows, so plain
// torch float32 ops reproduce the result bit for bit (tests/kernels/reference.py):
//   int8: acc = 0; for each block b in order: acc = acc + float(S_b) * xs_b
//         y = acc * ws (+ bias)                      S_b = sum over b of W * xq
//   int4: c_g = float(D_g) * (s_g * xs_g) + m_g * (xs_g * float(X_g))
//         P_i = sum of c_g over g = i, i + 4, i + 8, ... in order (i = 0..3)
//         y = (P_0 + P_1) + (P_2 + P_3) (+ bias)     D_g = sum over g of q * xq, X_g = sum of xq
// How the integer sums are formed differs with the number of rows and the layout (int8 in rows:
// lanes = k for a few rows, lanes = activation rows from 16, lanes = weight rows from 64, AMX
// tiles; int8 and int4 in panels: lanes = weight rows; int4 on AMX: a tile per group) and never
// changes them.
#pragma once

#include <stdint.h>

namespace gq {

constexpr int QB8 = 128;  // int8 weights: activation block
constexpr int QB4 = 32;   // int4 weights: group and activation block
constexpr int GB4 = 320;  // int4 panels: bytes of a group (4 x 64 of nibbles, 16 fp16 scales, 16 mins)

// The activations quantized for int8 weights: xq [M,K], xs [M,nb] scales, xis [M,nb] block sums.
struct Int8Act {
    int8_t* xq;
    float* xs;
    int32_t* xis;
};
Int8Act quant_act_int8(const float* x, int64_t M, int64_t K, void* scratch, int nthreads);

// bytes of scratch the linear kernels need for M rows of K inputs
int64_t linear_scratch_bytes(int64_t M, int64_t K);

// y [M,N] = x [M,K] W^T (+ bias). K % 32 == 0. W: int8 [N,K], or where int8_panels() its panels.
void linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K, const float* x,
                 int64_t M, float* y, void* scratch, int nthreads);
void linear_int4(const uint8_t* P, const float* bias, int64_t N, int64_t K, const float* x, int64_t M,
                 float* y, void* scratch, int nthreads);

// int4 weights as the kernels read them: the rows in panels of 16 (the last padded with zero rows),
// each a group of 32 values after another, GB4 = 320 bytes a group: 4 chunks of 64 bytes, then
// the 16 rows' fp16 scales, then their 16 mins. Byte 4j + i of chunk c holds row j's value 8c + i
// in its low nibble and value 8c + 4 + i in its high one. pack_int4_panels makes them from W
// uint8 [N, K/2] (group g: bytes 16 g .., byte i = q[i] | q[i + 16] << 4) and fp16 sc, mn [N, K/32]
// (w = s * q + m) into int4_panel_bytes(N, K) bytes.
int64_t int4_panel_bytes(int64_t N, int64_t K);
void pack_int4_panels(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, int64_t N, int64_t K,
                      uint8_t* P, int nthreads);

// int8 weights as the kernels of builds with VNNI (AMX's too) read them (int8_panels()): the
// rows in panels of 16 (the last padded with zero rows), each [K/4][16][4] bytes: panel p, k = 4q,
// row 16p + j holds w[16p + j][4q .. 4q + 3] + 128 (w ^ 0x80). pack_int8_panels makes them from
// W int8 [N, K] into int8_panel_bytes(N, K) bytes.
bool int8_panels();
int64_t int8_panel_bytes(int64_t N, int64_t K);
void pack_int8_panels(const int8_t* W, int64_t N, int64_t K, uint8_t* P, int nthreads);

// AMX tiles for int8 and int4 batches (amx.cpp): whether this build has them and Linux grants them, and
// the kernel on panels P (M >= 2, N % 16 == 0, K % 64 == 0)
bool amx_ready();
void linear_int8_amx(const uint8_t* P, const float* ws, const float* bias, int64_t N, int64_t K,
                     const Int8Act& a, int64_t M, float* y, int nthreads);
// and int4 batches on the panels P, from the activations quantized in groups (xs, xsum: [M, K/32])
void linear_int4_amx(const uint8_t* P, const float* bias, int64_t N, int64_t K, const int8_t* xq,
                     const float* xs, const float* xsum, int64_t M, float* y, int nthreads);

// Rows [n0, n1) of W dequantized into out [(n1-n0), K], bfloat16 (bf16 != 0) or float32: the
// values torch's dequantize_weight gives. W in the layout linear_int8 / linear_int4 read.
void dequant_int8(const int8_t* W, const float* ws, int64_t n0, int64_t n1, int64_t K, void* out, int bf16,
                  int nthreads);
void dequant_int4(const uint8_t* P, int64_t n0, int64_t n1, int64_t K, void* out, int bf16, int nthreads);

// Weight quantization (loading): the bytes quant.quantize_weight's torch code gives.
void quantize_int8(const float* w, int64_t n, int64_t k, int8_t* q, float* scales, int nthreads);
void quantize_int4(const float* w, int64_t n, int64_t k, int64_t g, uint8_t* q, uint16_t* scales,
                   uint16_t* mins, int nthreads);

}  // namespace gq
