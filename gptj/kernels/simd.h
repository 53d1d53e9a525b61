// ISA shims: one set of vector types and operations for each instruction-set level. The level
// follows from the compiler flags of the variant being built (gptj/kernels/__init__.py): every
// variant compiles these same sources.
//
//   GQ_AVX512  512-bit vectors (AVX-512 F/BW/VL/DQ), else 256-bit ones (AVX2, FMA, F16C)
//   GQ_VNNI    the u8 x s8 dot product in one instruction (AVX512-VNNI or AVX-VNNI), else
//              maddubs + madd
//   GQ_AMX     int8 tiles for batches (AMX-TILE, AMX-INT8; AVX-512 builds only)
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define GQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GQ_AVX512 0
#else
#error "the kernels need AVX2, FMA and F16C at least"
#endif

#if (GQ_AVX512 && defined(__AVX512VNNI__)) || (!GQ_AVX512 && defined(__AVXVNNI__))
#define GQ_VNNI 1
#else
#define GQ_VNNI 0
#endif

// The hint of the GEMVs' software prefetch of weights, which are read once per token, some KB
// ahead: non-temporal on AMD (GQ_PREFETCH_NTA, set by gptj/kernels/__init__.py), into L2
// elsewhere (Intel fills only L1 on a non-temporal prefetch, which that distance overruns).
#if defined(GQ_PREFETCH_NTA) && GQ_PREFETCH_NTA
#define GQ_STREAM_NTA 1
#define GQ_STREAM_HINT _MM_HINT_NTA
#else
#define GQ_STREAM_NTA 0
#define GQ_STREAM_HINT _MM_HINT_T1
#endif

#if GQ_AVX512 && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define GQ_AMX 1
#else
#define GQ_AMX 0
#endif

namespace gq {

// ---------------------------------------------------------------- scalars

static inline uint16_t to_bf16(float f) {  // round to nearest even (as torch's .to(bfloat16))
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float bf16_to_float(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- vectors
// vf: FW floats; vi: VB bytes.
#if GQ_AVX512
typedef __m512 vf;
typedef __m512i vi;
#define VB 64
#define FW 16
static inline vf vf_zero() { return _mm512_setzero_ps(); }
static inline vf vf_set(float a) { return _mm512_set1_ps(a); }
static inline vf vf_ld(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vf_ld(const uint16_t* p) {  // bfloat16 -> float32
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void vf_st(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_cvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vf_round(vf a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vf_pow2(vf n) {  // 2^n for whole n in the float exponent's range
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// 128-bit lane i of a
static inline __m128 vf_lane(vf a, int i) {
    switch (i) {
        case 0: return _mm512_castps512_ps128(a);
        case 1: return _mm512_extractf32x4_ps(a, 1);
        case 2: return _mm512_extractf32x4_ps(a, 2);
        default: return _mm512_extractf32x4_ps(a, 3);
    }
}
// the sums of four vectors' lanes
static inline __m128 vf_sum4(const vf* a) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(w), _mm512_extractf32x8_ps(w, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
// 4 floats, each to the 4 lanes of its 128-bit lane
static inline vf vf_expand4(__m128 v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(v));
}
// t (<= 4) floats from p, each to 4 lanes; lanes past 4t are 0 (nothing read there)
static inline vf vf_expand_f(const float* p, int t) {
    return vf_expand4(t == 4 ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps((__mmask8)((1 << t) - 1), p));
}

static inline vi vi_load(const void* p) { return _mm512_loadu_si512(p); }
// the first n bytes at p (n <= 64), zeros after: reads nothing beyond them
static inline vi vi_load_n(const void* p, int n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~0ULL : (1ULL << n) - 1, p);
}
static inline vi vi_zero() { return _mm512_setzero_si512(); }
static inline void vi_store(void* p, vi a) { _mm512_storeu_si512(p, a); }
static inline vi vi_set1_8(char c) { return _mm512_set1_epi8(c); }
static inline vi vi_set1(int32_t a) { return _mm512_set1_epi32(a); }
static inline vi vi_shl7(vi a) { return _mm512_slli_epi32(a, 7); }
// the first n floats at p (n <= 16), zeros after; and stored: nothing read or written past them
static inline vf vf_load_n(const float* p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1), p);
}
static inline void vf_store_n(float* p, vf v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1), v);
}
static inline vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vi_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vi vi_bcast32(const int8_t* p) {
    return _mm512_set1_epi32(*(const int32_t*)p);
}  // 4 bytes, every lane
static inline vi vi_flip(vi a) { return _mm512_xor_si512(a, _mm512_set1_epi8((char)0x80)); }
static inline vi vi_lo(vi a) { return _mm512_and_si512(a, _mm512_set1_epi8(0x0f)); }
static inline vi vi_hi(vi a) { return _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi8(0x0f)); }
static inline vi vi_unpacklo32(vi a, vi b) { return _mm512_unpacklo_epi32(a, b); }
static inline vi vi_unpackhi32(vi a, vi b) { return _mm512_unpackhi_epi32(a, b); }
static inline vi vi_unpacklo64(vi a, vi b) { return _mm512_unpacklo_epi64(a, b); }
static inline vi vi_unpackhi64(vi a, vi b) { return _mm512_unpackhi_epi64(a, b); }
static inline __m128i vi_fold(vi a) {  // the sum of a's 128-bit lanes
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
// 128-bit lane m of the result: the sum of t[m]'s 128-bit lanes (m < 4)
static inline vi vi_fold_each(const vi* t) {
    const vi u01 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const vi u23 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}
// p[m * stride] in every lane of 128-bit lane m
static inline vf vf_lanes(const float* p, int64_t stride) {
    return vf_expand4(_mm_setr_ps(p[0], p[stride], p[2 * stride], p[3 * stride]));
}
static inline vi vi_lanes(const int32_t* p, int64_t stride) {
    return _mm512_castps_si512(
        vf_expand4(_mm_castsi128_ps(_mm_setr_epi32(p[0], p[stride], p[2 * stride], p[3 * stride]))));
}
#if GQ_VNNI
// dpbusd as inline asm that updates acc in place: with the intrinsic, g++ 12 copies every
// accumulator of a GEMM register block in and out around each dpbusd (two moves per product
// instruction), which slowed the int8 and int4 GEMMs by a fifth or more. Same instruction.
static inline vi dot_u8s8(vi acc, vi u, vi s) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
}
// the same with 4 signed bytes at s broadcast to every lane by the instruction (EVEX's {1to16})
static inline vi dot_u8s8_bcast(vi acc, vi u, const int8_t* s) {
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t*)s));
    return acc;
}
#else
// u * s pairs summed in int16: exact where 2 * u * |s| <= 32767 (int4: u <= 15, |s| <= 127)
static inline vi dot_u8s8(vi acc, vi u, vi s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
#endif
// u * s pairs as int16 (maddubs, which saturates: exact while 2 * u * |s| <= 32767), int16 sums,
// and the int16 pairs of a summed into int32
static inline vi vi_maddubs(vi u, vi s) { return _mm512_maddubs_epi16(u, s); }
static inline vi vi_add16(vi a, vi b) { return _mm512_add_epi16(a, b); }
static inline vi vi_widen16(vi a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
// |w| and x with w's sign (x where w is 0: its product is 0): maddubs' u8 x s8 form of w * x
static inline vi abs_s8(vi w) { return _mm512_abs_epi8(w); }
static inline vi sign_s8(vi x, vi w) { return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), vi_zero(), x); }
#else
typedef __m256 vf;
typedef __m256i vi;
#define VB 32
#define FW 8
static inline vf vf_zero() { return _mm256_setzero_ps(); }
static inline vf vf_set(float a) { return _mm256_set1_ps(a); }
static inline vf vf_ld(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vf_ld(const uint16_t* p) {  // bfloat16 -> float32
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline void vf_st(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_cvt(vi a) { return _mm256_cvtepi32_ps(a); }
static inline float vf_sum(vf a) { return hsum256(a); }
static inline vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vf_pow2(vf n) {  // 2^n for whole n in the float exponent's range
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline __m128 vf_lane(vf a, int i) {
    return i ? _mm256_extractf128_ps(a, 1) : _mm256_castps256_ps128(a);
}
static inline __m128 vf_sum4(const vf* a) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
static inline vf vf_expand4(__m128 v) {  // 2 floats, each to the 4 lanes of its 128-bit lane
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
static inline vf vf_expand_f(const float* p, int t) {
    return vf_expand4(t == 2 ? _mm_castpd_ps(_mm_load_sd((const double*)p)) : _mm_load_ss(p));
}

static inline vi vi_load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vi vi_load_n(const void* p, int n) {  // n = 16, or 32 and more: a whole vector
    return n >= 32 ? vi_load(p) : _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128((const __m128i*)p));
}
static inline vi vi_zero() { return _mm256_setzero_si256(); }
static inline void vi_store(void* p, vi a) { _mm256_storeu_si256((__m256i*)p, a); }
static inline vi vi_set1_8(char c) { return _mm256_set1_epi8(c); }
static inline vi vi_set1(int32_t a) { return _mm256_set1_epi32(a); }
static inline vi vi_shl7(vi a) { return _mm256_slli_epi32(a, 7); }
// the first n floats at p (n <= 8), zeros after; and stored: nothing read or written past them
static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vf_load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
static inline void vf_store_n(float* p, vf v, int n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
static inline vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi vi_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vi vi_bcast32(const int8_t* p) { return _mm256_set1_epi32(*(const int32_t*)p); }
static inline vi vi_flip(vi a) { return _mm256_xor_si256(a, _mm256_set1_epi8((char)0x80)); }
static inline vi vi_lo(vi a) { return _mm256_and_si256(a, _mm256_set1_epi8(0x0f)); }
static inline vi vi_hi(vi a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0f)); }
static inline vi vi_unpacklo32(vi a, vi b) { return _mm256_unpacklo_epi32(a, b); }
static inline vi vi_unpackhi32(vi a, vi b) { return _mm256_unpackhi_epi32(a, b); }
static inline vi vi_unpacklo64(vi a, vi b) { return _mm256_unpacklo_epi64(a, b); }
static inline vi vi_unpackhi64(vi a, vi b) { return _mm256_unpackhi_epi64(a, b); }
static inline __m128i vi_fold(vi a) {
    return _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
}
static inline vi vi_fold_each(const vi* t) {  // lane m: the sum of t[m]'s lanes (m < 2)
    return _mm256_add_epi32(_mm256_permute2x128_si256(t[0], t[1], 0x20),
                            _mm256_permute2x128_si256(t[0], t[1], 0x31));
}
static inline vf vf_lanes(const float* p, int64_t stride) {
    return _mm256_set_m128(_mm_set1_ps(p[stride]), _mm_set1_ps(p[0]));
}
static inline vi vi_lanes(const int32_t* p, int64_t stride) {
    return _mm256_set_m128i(_mm_set1_epi32(p[stride]), _mm_set1_epi32(p[0]));
}
#if GQ_VNNI
// in-place asm as above; {vex}: AVX-VNNI's encoding, not AVX512-VNNI's (EVEX)
static inline vi dot_u8s8(vi acc, vi u, vi s) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
    return acc;
}
static inline vi dot_u8s8_bcast(vi acc, vi u, const int8_t* s) { return dot_u8s8(acc, u, vi_bcast32(s)); }
#else
static inline vi dot_u8s8(vi acc, vi u, vi s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif
static inline vi vi_maddubs(vi u, vi s) { return _mm256_maddubs_epi16(u, s); }
static inline vi vi_add16(vi a, vi b) { return _mm256_add_epi16(a, b); }
static inline vi vi_widen16(vi a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
static inline vi abs_s8(vi w) { return _mm256_sign_epi8(w, w); }
static inline vi sign_s8(vi x, vi w) { return _mm256_sign_epi8(x, w); }
#endif

// acc + t in int16 lanes, acc then pinned in a register: over a chain of these exact sums g++
// otherwise builds a tree that spills, or moves each sum at a loop's back edge
static inline vi vi_acc16(vi acc, vi t) {
    acc = vi_add16(acc, t);
    asm("" : "+v"(acc));
    return acc;
}

// 32-bit lane (i, r) = 4 i + r: the sum of the four 32-bit lanes of 128-bit lane i of a_r (exact)
static inline vi sum_lanes4(vi a0, vi a1, vi a2, vi a3) {
    const vi t0 = vi_add(vi_unpacklo32(a0, a1), vi_unpackhi32(a0, a1));
    const vi t1 = vi_add(vi_unpacklo32(a2, a3), vi_unpackhi32(a2, a3));
    return vi_add(vi_unpacklo64(t0, t1), vi_unpackhi64(t0, t1));
}

// Signed int8 weights w times signed int8 activations x, summed per 4 bytes into acc. VNNI:
// dpbusd(w + 128, x), and the caller subtracts 128 * sum(x). Otherwise maddubs(|w|, sign(x, w)):
// |w| <= 128 and |x| <= 127 keep each int16 pair sum exact.
static inline vi dot_s8s8(vi acc, vi w, vi x) {
#if GQ_VNNI
    return dot_u8s8(acc, vi_flip(w), x);
#else
    return dot_u8s8(acc, abs_s8(w), sign_s8(x, w));
#endif
}

}  // namespace gq
