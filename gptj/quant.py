"""Weight-only quantization of nn.Linear layers: int8 per output row, int4 in groups.

Formats (portable, plain row-major tensors: what a safetensors file holds):

* int8: ``qweight`` int8 [out, in], symmetric, ``scales`` float32 [out]: w = scales[n] * q.
* int4: ``qweight`` uint8 [out, in // 2], ``scales`` float16 [out, in // G], ``mins`` float16
  [out, in // G] (G = group size, 32 by default), asymmetric: w = s * q + m, q in 0..15, with
  s = (max - min) / 15 and m = min of the group, both rounded to fp16 (GGUF's Q4_1, which
  this format holds exactly). Within a group, byte j holds value j in its low nibble and value
  j + G/2 in its high nibble. Older checkpoints (G = 128 or 64, uint8 ``zeros`` z with
  w = s * (q - z)) are converted when loaded: m = -s * z, regrouped to 32.
* ``bias`` float32 [out] when the layer has one.

A loader makes the module with ``QuantizedLinear.empty(...)`` and fills those buffers, or calls
``QuantizedLinear.from_state(tensors)``, which uses the tensors as they are (memory-mapped ones
stay mapped; older int4 ones are converted). The group size and mode follow from the shapes
and dtypes.

Kernels, chosen by measurement (benchmarks/bench_linear.py) on a 2-core AVX-512/AMX Xeon VM
whose two cores read memory at 21-31 GB/s:

* decode (at most ``DECODE_MAX_ROWS`` rows): our own GEMV in C++, built with the system compiler
  on first use and cached under ~/.cache/gptj/kernels. It quantizes the activations to int8 per
  block (int4: of 32, its group; int8: of 128, the last one shorter) and runs an integer dot product
  (AVX-512 VNNI, AVX-VNNI or AVX2 maddubs), and prefetches the next tile of rows into L2. It
  takes any in_features that is a multiple of 32. At one row it streams int8 weights at 26-30
  GB/s and int4 at 23-26 GB/s, against 20-24 and 15-18 GB/s for torch's ``_weight_int8pack_mm``
  and ``_weight_int4pack_mm_for_cpu`` (with bf16 activations; float32 ones are 2-20x slower).
  Without a compiler or AVX2, or for shapes it does not take, those torch ops serve instead.
  Batches of int8 rows (a batch's decode step, a short prompt) run on AMX tiles where the CPU
  has them: the VNNI loop turns compute-bound past a few rows (8 rows cost 1.55x one), tiles
  keep 8 rows at ~1.1x and 16 at ~1.3x of one row's time, and beat dequantize + GEMM up to
  ~384 rows (``AMX_INT8_DECODE_MAX_ROWS``).
* prefill (more rows): dequantize to bfloat16 (float32 where the CPU has no bf16 matrix units)
  into a reused buffer, in big chunks of rows, and run a GEMM (AMX here): 512 rows of a
  16384x4096 layer take ~55 ms (bf16 F.linear: ~45), against 410-440 ms for the torch GEMV ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

MODES = ("bf16", "int8", "int4")
GROUP_SIZE = 32  # int4; the kernel takes this group size only
_KB = 32  # the kernel takes in_features that are a multiple of this
# Most rows that go through the decode kernel; above, dequantize + GEMM wins. Measured on
# 16384x4096: the two cross at 48-56 rows for int8 and int4; 32 leaves a margin.
# GPTJ_QUANT_DECODE_MAX_ROWS overrides.
DECODE_MAX_ROWS = {"int8": 32, "int4": 32}
# With AMX the int8 kernel multiplies tiles and beats dequantize + GEMM up to ~384 rows here.
AMX_INT8_DECODE_MAX_ROWS = 256
# Whether torch's _weight_int8pack_mm runs on a device type (learnt on first use).
_GPU_INT8_MM: dict[str, bool] = {}
# Prefill dequantizes at most this many bytes of weight at once, into a reused per-thread
# buffer. Big chunks measured best: GEMMs over fewer output rows (1-2k) ran up to 2x slower on
# 2 threads; 128 MB holds any GPT-J layer but the lm_head (4 chunks) in one.
_CHUNK_BYTES = 128 << 20


# ---------------------------------------------------------------------------- quantization


def _group_size(in_features: int, group_size: int) -> int:
    """The requested group size, or the largest of 128/64/32 not above it that divides in_features."""
    if in_features % group_size == 0 and group_size % 2 == 0:
        return group_size
    for g in (128, 64, 32):
        if g <= group_size and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs in_features ({in_features}) divisible by 32")


def quantize_weight(weight: Tensor, mode: str, group_size: int = GROUP_SIZE) -> dict[str, Tensor]:
    """Quantizes one [out, in] weight to the buffers of a QuantizedLinear ("int8" or "int4").

    Works a slice of rows at a time, in float32, so memory stays near the size of the result."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    w = weight.detach().cpu()  # a GPU weight (a tied embedding) is quantized here too; .to() takes it back
    n, k = w.shape
    step = max(1, (1 << 22) // max(k, 1))  # ~4M values at a time: no full float32 copy
    lib, threads = native_kernel(), torch.get_num_threads()
    if mode == "int8":
        q = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, dtype=torch.float32)
        for r0 in range(0, n, step):
            part = w[r0 : r0 + step].float()
            if lib is not None:  # same result, 5-10x faster: GPT-J loads quantize 6B weights
                part = part.contiguous()
                lib.gq_quantize_int8(
                    part.data_ptr(), part.shape[0], k, q[r0:].data_ptr(), scales[r0:].data_ptr(), threads
                )
                continue
            s = part.abs().amax(dim=1).clamp(min=1e-30) / 127.0
            q[r0 : r0 + step] = torch.round(part / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[r0 : r0 + step] = s
        return {"qweight": q, "scales": scales}
    if mode == "int4":
        g = _group_size(k, group_size)
        ng = k // g
        q = torch.empty(n, k // 2, dtype=torch.uint8)
        scales = torch.empty(n, ng, dtype=torch.float16)
        mins = torch.empty(n, ng, dtype=torch.float16)
        for r0 in range(0, n, step):
            if lib is not None:
                part = w[r0 : r0 + step].float().contiguous()
                lib.gq_quantize_int4(
                    part.data_ptr(), part.shape[0], k, g, q[r0:].data_ptr(), scales[r0:].data_ptr(),
                    mins[r0:].data_ptr(), threads,
                )  # fmt: skip
                continue
            part = w[r0 : r0 + step].float().reshape(-1, ng, g)
            lo, hi = part.amin(dim=-1), part.amax(dim=-1)
            # scale and min are stored in fp16: quantize with the rounded values
            s16 = ((hi - lo) / 15.0).clamp(min=1e-7).to(torch.float16)
            m16 = lo.to(torch.float16)
            qi = torch.round((part - m16.float()[..., None]) / s16.float()[..., None]).clamp_(0, 15).to(torch.uint8)
            rows = qi.shape[0]
            q[r0 : r0 + rows] = (qi[..., : g // 2] | (qi[..., g // 2 :] << 4)).reshape(rows, k // 2)
            scales[r0 : r0 + rows] = s16
            mins[r0 : r0 + rows] = m16
        return {"qweight": q, "scales": scales, "mins": mins}
    raise ValueError(f"unknown quantization mode {mode!r}: expected 'int8' or 'int4'")


def dequantize_weight(buffers: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """The [out, in] weight that the buffers of a QuantizedLinear stand for (torch ops only).

    Also takes the older int4 buffers (``zeros`` instead of ``mins``)."""
    q, scales = buffers["qweight"], buffers["scales"]
    if q.dtype == torch.int8:
        return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)
    vals = _unpack_int4(q, scales.shape[1])
    s = scales.to(torch.float32)[..., None]
    if "mins" in buffers:
        w = vals * s + buffers["mins"].to(torch.float32)[..., None]
    else:
        w = (vals - buffers["zeros"].to(torch.float32)[..., None]) * s
    return w.reshape(q.shape[0], 2 * q.shape[1]).to(dtype)


def _unpack_int4(q: Tensor, groups: int) -> Tensor:
    """float32 [out, groups, G] values 0..15 of an int4 ``qweight`` [out, in // 2]."""
    p = q.reshape(q.shape[0], groups, -1)
    return torch.cat([p & 15, p >> 4], dim=-1).to(torch.float32)


def convert_int4_zeros(
    qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int = GROUP_SIZE
) -> dict[str, Tensor]:
    """The int4 buffers (``qweight``, ``scales``, ``mins``) for those of the older format, whose
    uint8 zero points z gave w = s * (q - z): m = -s * z (rounded to fp16). Groups are split to
    `group_size` where it divides the old group size (each part keeps the group's s and m)."""
    n, half = qweight.shape
    ng = scales.shape[1]
    if ng == 0 or 2 * half % ng or zeros.shape != scales.shape:
        raise ValueError(f"int4 buffers do not fit: qweight {list(qweight.shape)}, scales {list(scales.shape)}, "
                         f"zeros {list(zeros.shape)}")  # fmt: skip
    g = 2 * half // ng
    new_g = group_size if g % group_size == 0 and group_size % 2 == 0 else g
    mins = (-(scales.float() * zeros.float())).to(torch.float16)
    if new_g == g:
        return {"qweight": qweight, "scales": scales, "mins": mins}
    vals = _unpack_int4(qweight, ng).to(torch.uint8).reshape(n, -1, new_g)
    packed = (vals[..., : new_g // 2] | (vals[..., new_g // 2 :] << 4)).reshape(n, half)
    r = g // new_g
    return {"qweight": packed, "scales": scales.repeat_interleave(r, dim=1), "mins": mins.repeat_interleave(r, dim=1)}


# ---------------------------------------------------------------------------- native kernel

_KERNEL_SRC = r"""
// Weight-only quantized GEMV kernels (int8 per-row, int4 grouped) for x86-64.
// Activations are quantized on the fly to int8 per block of values (int8: 128, the last block
// shorter where 128 does not divide K; int4: 32, its group size), so the inner loop
// is an integer dot product (VNNI dpbusd, or maddubs on plain AVX2). K: a multiple of 32.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GQ_ISA 3
#elif defined(__AVX2__) && defined(__AVXVNNI__)
#define GQ_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GQ_ISA 1
#else
#error "need AVX2+FMA+F16C"
#endif

extern "C" int gq_isa(void) { return GQ_ISA; }

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// x [M,K] fp32 -> xq [M,K] int8, xs [M,nb] scale, and per block (where not null) xsum [M,nb] =
// xs * sum(xq) (int4) or xis [M,nb] = sum(xq) (int8), for nb = ceil(K/qb) blocks of qb values
// (the last one K - (nb-1)*qb, a multiple of 32).
// gpv = 0: xq in the order of x. gpv > 0 (int4, qb = 32): the order the int4 kernel reads, in
// spans of gpv blocks (t <= gpv in the last span): the first 16 values of each of the span's
// blocks, then the last 16 of each, matching the low and high nibbles of one weight vector.
static void quant_act(const float* x, int64_t M, int64_t K, int qb, int gpv, int8_t* xq, float* xs, float* xsum,
                      int32_t* xis, int nthreads) {
    const int64_t nb = (K + qb - 1) / qb;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K >= 65536)
    for (int64_t mb = 0; mb < M * nb; ++mb) {
        const int64_t row = mb / nb, b = mb % nb, off = row * K + b * qb;
        const int len = K - b * qb < qb ? (int)(K - b * qb) : qb;
        const float* xp = x + off;
        __m256 amax = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int j = 0; j < len; j += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xp + j), absmask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float am = _mm_cvtss_f32(m4);
        float s = am / 127.f;
        float inv = am > 0 ? 127.f / am : 0.f;
        __m256 vinv = _mm256_set1_ps(inv);
        __m256i isum = _mm256_setzero_si256();
        int8_t* lo = xq + off;  // where values 0..15 of each 32 go, and values 16..31
        int8_t* hi = lo + 16;
        if (gpv) {
            const int64_t first = b / gpv * gpv, t = nb - first < gpv ? nb - first : gpv;
            lo = xq + row * K + first * 32 + 16 * (b - first);
            hi = lo + 16 * t;
        }
        for (int j = 0; j < len; j += 32) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j), vinv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 8), vinv));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 16), vinv));
            __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + j + 24), vinv));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
            __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
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

// ---------------------------------------------------------------- vector helpers
// vf: float vector, vi: VB bytes. AVX-512 builds use 512-bit vectors, the others 256-bit ones.
#if GQ_ISA == 3
#define R_T 4
#define M_T 4
typedef __m512 vf;
typedef __m512i vi;
#define VB 64
static inline vf vf_zero() { return _mm512_setzero_ps(); }
static inline vf vf_set(float a) { return _mm512_set1_ps(a); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_cvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vi vi_load(const void* p) { return _mm512_loadu_si512(p); }
// the first n bytes at p (n <= 64), zeros after: reads nothing beyond them
static inline vi vi_load_n(const void* p, int n) { return _mm512_maskz_loadu_epi8(n >= 64 ? ~0ULL : (1ULL << n) - 1, p); }
static inline vi vi_zero() { return _mm512_setzero_si512(); }
static inline vi vi_flip(vi a) { return _mm512_xor_si512(a, _mm512_set1_epi8((char)0x80)); }
static inline vi vi_lo(vi a) { return _mm512_and_si512(a, _mm512_set1_epi8(0x0f)); }
static inline vi vi_hi(vi a) { return _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi8(0x0f)); }
static inline vi dot_u8s8(vi acc, vi u, vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
// 4 floats, each to 4 consecutive lanes
static inline vf vf_expand4(__m128 v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_castps128_ps512(v));
}
// t (<= 4) fp16 / fp32 values from p, each to 4 lanes; lanes past 4t are 0 (nothing read there)
static inline vf vf_expand_h(const uint16_t* p, int t) {
    return vf_expand4(_mm_cvtph_ps(t == 4 ? _mm_loadl_epi64((const __m128i*)p) : _mm_maskz_loadu_epi16((__mmask8)((1 << t) - 1), p)));
}
static inline vf vf_expand_f(const float* p, int t) {
    return vf_expand4(t == 4 ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps((__mmask8)((1 << t) - 1), p));
}
#else
#define R_T 2
#define M_T 2
typedef __m256 vf;
typedef __m256i vi;
#define VB 32
static inline vf vf_zero() { return _mm256_setzero_ps(); }
static inline vf vf_set(float a) { return _mm256_set1_ps(a); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_cvt(vi a) { return _mm256_cvtepi32_ps(a); }
static inline float vf_sum(vf a) { return hsum256(a); }
static inline vi vi_load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vi vi_load_n(const void* p, int n) {  // n = 16, or 32 and more: a whole vector
    return n >= 32 ? vi_load(p) : _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128((const __m128i*)p));
}
static inline vi vi_zero() { return _mm256_setzero_si256(); }
static inline vi vi_flip(vi a) { return _mm256_xor_si256(a, _mm256_set1_epi8((char)0x80)); }
static inline vi vi_lo(vi a) { return _mm256_and_si256(a, _mm256_set1_epi8(0x0f)); }
static inline vi vi_hi(vi a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0f)); }
#if GQ_ISA == 2
static inline vi dot_u8s8(vi acc, vi u, vi s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
// u <= 15 here (int4): 2*15*127 fits int16
static inline vi dot_u8s8(vi acc, vi u, vi s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif
static inline vf vf_expand4(__m128 v) {  // 2 floats, each to 4 lanes
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
static inline vf vf_expand_h(const uint16_t* p, int t) {
    const uint32_t u = t == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 16 : p[0];
    return vf_expand4(_mm_cvtph_ps(_mm_cvtsi32_si128((int)u)));
}
static inline vf vf_expand_f(const float* p, int t) {
    return vf_expand4(t == 2 ? _mm_castpd_ps(_mm_load_sd((const double*)p)) : _mm_load_ss(p));
}
#endif

// dot of signed int8 weights with signed int8 activations, in the form the ISA prefers
static inline vi dot_s8s8(vi acc, vi w, vi x) {
#if GQ_ISA == 1
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                                                   _mm256_set1_epi16(1)));
#else
    return dot_u8s8(acc, vi_flip(w), x);  // caller subtracts 128 * sum(x)
#endif
}

// ---------------------------------------------------------------- int8 weights
// W int8 [N,K] row-major, ws fp32 [N]; activations in blocks of QB8 = 128 (the last one shorter).
//   y[m,n] = fma(ws[n], acc, bias[n]),  acc = fma(S_b, xs[m,b], acc) over blocks b in order,
// S_b = sum over block b of W[n,k] * xq[m,k], exact in int32. Every path (one row or many, VNNI,
// AVX2, AMX) computes exactly these float operations from exactly these integers, so a row's
// result does not depend on which rows share its call (a request's tokens are the same alone
// or batched with others).
// VNNI: dpbusd(u8, s8) with u8 = W ^ 0x80 = W + 128, then subtract 128 * sum(xq) (xis holds it).
// Plain AVX2: maddubs(|W|, sign(xq, W)); |xq| <= 127 and |W| <= 127 keep int16 pairs unsaturated.
// Tiles of R (<= 4) weight rows x MT activation rows: each weight vector is loaded once per
// tile; the R rows' lane sums of a block reduce together into one 4-lane vector.
#define QB8 128

// lanes 0..3: the sums of a0's, a1's, a2's, a3's lanes
static inline __m128i reduce4_epi32(vi a0, vi a1, vi a2, vi a3) {
#if GQ_ISA == 3
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i w = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(w), _mm512_extracti64x4_epi64(w, 1));
#else
    const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
    const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
    const __m256i h = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
#endif
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <int R, int MT>
static inline void i8_tile(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           const int32_t* xis, float* y, int64_t ldy, const float* bias) {
    constexpr int NV = QB8 / VB;
    const int64_t nb = (K + QB8 - 1) / QB8;
    __m128 acc[MT];  // lane r: weight row r
    for (int m = 0; m < MT; ++m) acc[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * QB8;
        const int len = K - k0 < QB8 ? (int)(K - k0) : QB8;  // the last block: zeros past K
        vi x[MT][NV];
        for (int m = 0; m < MT; ++m)
            for (int i = 0; i < NV; ++i)
                x[m][i] = len == QB8 ? vi_load(xq + m * K + k0 + i * VB)
                          : i * VB < len ? vi_load_n(xq + m * K + k0 + i * VB, len - i * VB) : vi_zero();
        vi d[4][MT];
        for (int r = 0; r < 4; ++r) {
            for (int m = 0; m < MT; ++m) d[r][m] = vi_zero();
            if (r >= R) continue;
            vi w[NV];
            for (int i = 0; i < NV; ++i)
                w[i] = len == QB8 ? vi_load(W + r * K + k0 + i * VB)
                       : i * VB < len ? vi_load_n(W + r * K + k0 + i * VB, len - i * VB) : vi_zero();
            // prefetch the next tile (the rows that follow) into L2: one core's demand misses
            // and the hardware prefetcher alone do not keep enough reads in flight
            for (int i = 0; i < QB8 / 64; ++i)
                _mm_prefetch((const char*)(W + R * K + (b * R + r) * QB8 + i * 64), _MM_HINT_T1);
            for (int m = 0; m < MT; ++m)
                for (int i = 0; i < NV; ++i) d[r][m] = dot_s8s8(d[r][m], w[i], x[m][i]);
        }
        for (int m = 0; m < MT; ++m) {
            __m128i sums = reduce4_epi32(d[0][m], d[1][m], d[2][m], d[3][m]);
#if GQ_ISA != 1
            sums = _mm_sub_epi32(sums, _mm_set1_epi32(128 * xis[m * nb + b]));
#endif
            acc[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(xs[m * nb + b]), acc[m]);
        }
    }
    for (int m = 0; m < MT; ++m) {
        alignas(16) float out[4];
        _mm_store_ps(out, acc[m]);
        for (int r = 0; r < R; ++r) y[m * ldy + r] = fmaf(ws[r], out[r], bias ? bias[r] : 0.f);
    }
}

template <int R>
static inline void i8_rows(const int8_t* W, int64_t K, const float* ws, const int8_t* xq, const float* xs,
                           const int32_t* xis, int64_t M, float* y, int64_t ldy, const float* bias) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    int64_t m = 0;
    for (; m + M_T <= M; m += M_T)
        i8_tile<R, M_T>(W, K, ws, xq + m * K, xs + m * nb, xis + m * nb, y + m * ldy, ldy, bias);
    for (; m < M; ++m) i8_tile<R, 1>(W, K, ws, xq + m * K, xs + m * nb, xis + m * nb, y + m * ldy, ldy, bias);
}

// the activations quantized into scratch: xq [M,K] int8, xs [M,nb] scales, xis [M,nb] block sums
struct Int8Act {
    int8_t* xq;
    float* xs;
    int32_t* xis;
};
static Int8Act quant_act_int8(const float* x, int64_t M, int64_t K, void* scratch, int nthreads) {
    const int64_t nb = (K + QB8 - 1) / QB8;
    Int8Act a;
    a.xq = (int8_t*)scratch;
    a.xs = (float*)(a.xq + M * K);
    a.xis = (int32_t*)(a.xs + M * nb);
    quant_act(x, M, K, QB8, 0, a.xq, a.xs, nullptr, a.xis, nthreads);
    return a;
}

static void linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K, const float* x,
                        int64_t M, float* y, void* scratch, int nthreads) {
    const Int8Act a = quant_act_int8(x, M, K, scratch, nthreads);
    const int64_t nt = (N + R_T - 1) / R_T;
    // dynamic chunks: a thread that loses its core to another process does not stall the call
    const int64_t chunk = nt / (16 * nthreads) > 1 ? nt / (16 * nthreads) : 1;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t n = t * R_T;
        if (n + R_T <= N)
            i8_rows<R_T>(W + n * K, K, ws + n, a.xq, a.xs, a.xis, M, y + n, N, bias ? bias + n : nullptr);
        else
            for (int64_t j = n; j < N; ++j)
                i8_rows<1>(W + j * K, K, ws + j, a.xq, a.xs, a.xis, M, y + j, N, bias ? bias + j : nullptr);
    }
}

#if GQ_ISA == 3 && defined(__AMX_TILE__) && defined(__AMX_INT8__)
// ---------------------------------------------------------------- int8 weights, AMX (2 rows or more)
// With several activation rows the VNNI loop above is compute-bound (at 8 rows a step costs
// 1.55x one row). AMX multiplies tiles instead: A = 16 weight rows x 64 bytes, read straight
// from W (stride K); B = the activations of those 64 columns for up to 16 rows, repacked once
// per call into AMX's layout (4 consecutive k of one row side by side); C = 16 x 16 int32, one
// per activation block: its exact block sums, scaled as the VNNI path scales them.
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>
#define GQ_AMX 1

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static bool amx_usable() {  // Linux hands out AMX state only on request (once per process)
    static int ok = -1;
    if (ok < 0) {
        const char* env = getenv("GPTJ_AMX");  // GPTJ_AMX=0: the VNNI loop only (to compare)
        ok = !(env && strcmp(env, "0") == 0) && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                        18 /* XFEATURE_XTILEDATA */) == 0;
    }
    return ok == 1;
}

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

// One group's C tile, scaled by its block scales `sc` (lanes m) into acc.
static inline void amx_accumulate(int32_t (&c)[16][16], __m512 sc, __m512 (&acc)[16]) {
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[i])), sc, acc[i]);
}

static inline void amx_store(const __m512 (&acc)[16], const float* ws, const float* bias, int rows, float* y,
                             int64_t ldy) {
    alignas(64) float out[16];
    for (int i = 0; i < 16; ++i) {
        _mm512_store_ps(out, acc[i]);
        for (int m = 0; m < rows; ++m) y[m * ldy + i] = fmaf(ws[i], out[m], bias ? bias[i] : 0.f);
    }
}

// 16 weight rows against G groups of activation rows (M0 rows, then M1); xb[g]: group g's
// activations repacked (per 32 columns, 8 rows of [Mg][4] bytes); xst[g]: its block scales
// [nb][16], lanes m (zero past Mg).
template <int G>
static inline void i8_amx_tile(const int8_t* W, int64_t K, const float* ws, int8_t* const* xb, float* const* xst,
                               int M0, int M1, float* y, int64_t ldy, const float* bias) {
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
static void linear_int8_amx(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
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
                memcpy(xb(g) + (k4 / 8) * 32 * rows + (k4 % 8) * 4 * rows + m * 4, xq + (first + m) * K + k4 * 4, 4);
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
                    i8_amx_tile<2>(W + t * 16 * K, K, ws + t * 16, pxb, pxs, M0, M1, y + g * 16 * N + t * 16, N, bt);
                else
                    i8_amx_tile<1>(W + t * 16 * K, K, ws + t * 16, pxb, pxs, M0, M1, y + g * 16 * N + t * 16, N, bt);
            }
        }
        _tile_release();
    }
}
#endif

extern "C" int gq_amx(void) {  // whether int8 calls of 2 or more rows use AMX tiles
#ifdef GQ_AMX
    return amx_usable();
#else
    return 0;
#endif
}

// K % 32 == 0. scratch: M*K int8 + 2*M*ceil(K/128) 32-bit values for the quantized activations.
extern "C" void gq_linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K,
                               const float* x, int64_t M, float* y, void* scratch, int nthreads) {
#ifdef GQ_AMX
    if (M >= 2 && N % 16 == 0 && amx_usable()) {
        linear_int8_amx(W, ws, bias, N, K, x, M, y, scratch, nthreads);
        return;
    }
#endif
    linear_int8(W, ws, bias, N, K, x, M, y, scratch, nthreads);
}

// ---------------------------------------------------------------- int4 weights
// W uint8 [N, K/2]: group g (32 values) is bytes g*16 .. g*16+15, byte j = q[j] | q[j+16] << 4.
// sc, mn fp16 [N, K/32]: w = s * q + m, q in 0..15.
// y[m,n] = sum_g s_g*xs_g*dot_g(q, xq) + sum_g m_g*xsum_g   (xsum_g = xs_g * sum_g(xq)).
// One weight vector (VB bytes) holds GPV = VB/16 groups: its low nibbles pair with the first
// halves of those groups' activations, its high nibbles with the second halves (quant_act
// stores xq in that order). dpbusd sums 4 bytes into a 32-bit lane, so lanes 4i..4i+3 hold
// group i: one vector of per-lane scales s_g*xs_g applies the GPV groups' scales at once.
#define GPV (VB / 16)

// one step: weight vector c (t <= GPV groups; t < GPV only for the last, partial one)
template <int R, int MT>
static inline void i4_step(const uint8_t* W, int64_t K, const uint16_t* sc, const int8_t* xq, const float* xs,
                           int64_t c, int t, vf (&acc)[R][MT]) {
    const int64_t ng = K / 32;
    vi xl[MT], xh[MT];
    vf xv[MT];
    for (int m = 0; m < MT; ++m) {
        const int8_t* xp = xq + m * K + c * 2 * VB;
        xl[m] = t == GPV ? vi_load(xp) : vi_load_n(xp, 16 * t);
        xh[m] = t == GPV ? vi_load(xp + VB) : vi_load_n(xp + 16 * t, 16 * t);
        xv[m] = vf_expand_f(xs + m * ng + c * GPV, t);
    }
    for (int r = 0; r < R; ++r) {
        const uint8_t* wp = W + r * (K / 2) + c * VB;
        const vi w = t == GPV ? vi_load(wp) : vi_load_n(wp, 16 * t);
        _mm_prefetch((const char*)(W + R * (K / 2) + (c * R + r) * VB), _MM_HINT_T1);  // next tile, into L2
        const vi lo = vi_lo(w), hi = vi_hi(w);
        const vf sv = vf_expand_h(sc + r * ng + c * GPV, t);
        for (int m = 0; m < MT; ++m) {
            const vi d = dot_u8s8(dot_u8s8(vi_zero(), lo, xl[m]), hi, xh[m]);
            acc[r][m] = vf_fma(vf_cvt(d), vf_mul(sv, xv[m]), acc[r][m]);
        }
    }
}

template <int R, int MT>
static inline void i4_tile(const uint8_t* W, int64_t K, const uint16_t* sc, const uint16_t* mn, const int8_t* xq,
                           const float* xs, const float* xsum, float* y, int64_t ldy, const float* bias) {
    const int64_t ng = K / 32, nc = ng / GPV;
    float comp[R][MT];  // sum_g m_g * xsum_g
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MT; ++m) {
            __m256 ca = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 8 <= ng; g += 8)
                ca = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + r * ng + g))),
                                     _mm256_loadu_ps(xsum + m * ng + g), ca);
            float v = hsum256(ca);
            for (; g < ng; ++g) v += _cvtsh_ss(mn[r * ng + g]) * xsum[m * ng + g];
            comp[r][m] = v;
        }
    vf acc[R][MT];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MT; ++m) acc[r][m] = vf_zero();
    for (int64_t c = 0; c < nc; ++c) i4_step<R, MT>(W, K, sc, xq, xs, c, GPV, acc);
    if (nc * GPV < ng) i4_step<R, MT>(W, K, sc, xq, xs, nc, (int)(ng - nc * GPV), acc);
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) {
            float v = vf_sum(acc[r][m]) + comp[r][m];
            if (bias) v += bias[r];
            y[m * ldy + r] = v;
        }
}

template <int R>
static inline void i4_rows(const uint8_t* W, int64_t K, const uint16_t* sc, const uint16_t* mn, const int8_t* xq,
                           const float* xs, const float* xsum, int64_t M, float* y, int64_t ldy, const float* bias) {
    const int64_t ng = K / 32;
    int64_t m = 0;
    for (; m + M_T <= M; m += M_T)
        i4_tile<R, M_T>(W, K, sc, mn, xq + m * K, xs + m * ng, xsum + m * ng, y + m * ldy, ldy, bias);
    for (; m < M; ++m) i4_tile<R, 1>(W, K, sc, mn, xq + m * K, xs + m * ng, xsum + m * ng, y + m * ldy, ldy, bias);
}

// scratch: M*K int8 + 2*M*(K/32) fp32
extern "C" void gq_linear_int4(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, const float* bias,
                               int64_t N, int64_t K, const float* x, int64_t M, float* y, void* scratch, int nthreads) {
    const int64_t ng = K / 32;
    int8_t* xq = (int8_t*)scratch;
    float* xs = (float*)(xq + M * K);
    float* xsum = xs + M * ng;
    quant_act(x, M, K, 32, GPV, xq, xs, xsum, nullptr, nthreads);
    const int64_t nt = (N + R_T - 1) / R_T;
    const int64_t chunk = nt / (16 * nthreads) > 1 ? nt / (16 * nthreads) : 1;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t n = t * R_T;
        if (n + R_T <= N)
            i4_rows<R_T>(W + n * (K / 2), K, sc + n * ng, mn + n * ng, xq, xs, xsum, M, y + n, N,
                         bias ? bias + n : nullptr);
        else
            for (int64_t j = n; j < N; ++j)
                i4_rows<1>(W + j * (K / 2), K, sc + j * ng, mn + j * ng, xq, xs, xsum, M, y + j, N,
                           bias ? bias + j : nullptr);
    }
}

// ---------------------------------------------------------------- dequantization (prefill)
// Rows [n0, n1) of W into out [(n1-n0), K] as bf16 (bf16 != 0) or fp32, for a GEMM.
static inline uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static inline void put1(void* out, int64_t j, float v, int bf16) {
    if (bf16)
        ((uint16_t*)out)[j] = to_bf16(v);
    else
        ((float*)out)[j] = v;
}
#if GQ_ISA == 3
#define DW 16
typedef __m512 dv;
static inline dv dv_set(float a) { return _mm512_set1_ps(a); }
static inline dv dv_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline __m512i du_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline dv dv_lo(__m512i b) { return _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))); }
static inline dv dv_hi(__m512i b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)); }
static inline void put(void* out, int64_t j, dv v, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float*)out + j, v);
        return;
    }
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + j), (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#endif
}
#define dv_mul _mm512_mul_ps
#define dv_fma _mm512_fmadd_ps
#else
#define DW 8
typedef __m256 dv;
static inline dv dv_set(float a) { return _mm256_set1_ps(a); }
static inline dv dv_i8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256i du_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline dv dv_lo(__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))); }
static inline dv dv_hi(__m256i b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }
static inline void put(void* out, int64_t j, dv v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float*)out + j, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    u = _mm256_srli_epi32(u, 16);
    _mm_storeu_si128((__m128i*)((uint16_t*)out + j), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}
#define dv_mul _mm256_mul_ps
#define dv_fma _mm256_fmadd_ps
#endif

extern "C" void gq_dequant_int8(const int8_t* W, const float* ws, int64_t n0, int64_t n1, int64_t K, void* out,
                                int bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wp = W + n * K;
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        const dv s = dv_set(ws[n]);
        int64_t j = 0;
        for (; j + DW <= K; j += DW) put(o, j, dv_mul(s, dv_i8(wp + j)), bf16);
        for (; j < K; ++j) put1(o, j, ws[n] * wp[j], bf16);
    }
}

extern "C" void gq_dequant_int4(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, int64_t n0, int64_t n1,
                                int64_t K, void* out, int bf16, int nthreads) {
    const int64_t ng = K / 32;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        void* o = (char*)out + (n - n0) * K * (bf16 ? 2 : 4);
        for (int64_t g = 0; g < ng; ++g) {
            const dv vs = dv_set(_cvtsh_ss(sc[n * ng + g])), vm = dv_set(_cvtsh_ss(mn[n * ng + g]));
            const uint8_t* wp = W + n * (K / 2) + g * 16;
            for (int j = 0; j < 16; j += DW) {  // byte j: value j (low nibble), value j + 16 (high)
                const auto b = du_u8(wp + j);
                put(o, g * 32 + j, dv_fma(dv_lo(b), vs, vm), bf16);
                put(o, g * 32 + 16 + j, dv_fma(dv_hi(b), vs, vm), bf16);
            }
        }
    }
}

// ---------------------------------------------------------------- quantization (loading)
// The same arithmetic as quantize_weight's torch code (division, round half to even: nearbyintf
// in the default rounding mode), so both give the same bytes; these loops vectorize.
extern "C" void gq_quantize_int8(const float* w, int64_t n, int64_t k, int8_t* q, float* scales, int nthreads) {
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

extern "C" void gq_quantize_int4(const float* w, int64_t n, int64_t k, int64_t g, uint8_t* q, uint16_t* scales,
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
"""

_lib: ctypes.CDLL | None = None
_lib_tried = False
_lib_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptj" / "kernels"


def _build(cxx: str, flags: list[str], source: str = _KERNEL_SRC, stem: str = "gq") -> Path:
    """Compiles `source` into the cache (once per source, compiler, flags and CPU)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    flag_text = " ".join(sorted(_cpu_flags()))
    key = hashlib.sha256("\0".join([source, cxx, version, *flags, flag_text]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{stem}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / f"{stem}.cpp"
        src.write_text(source)
        lib = Path(tmp) / f"{stem}.so"
        cmd = [cxx, *flags, "-shared", "-fPIC", "-fopenmp", "-std=c++17", str(src), "-o", str(lib)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: concurrent builders both end with a whole file
    return out


def load_native(source: str, stem: str, setup: Callable[[ctypes.CDLL], ctypes.CDLL], what: str) -> ctypes.CDLL | None:
    """Builds C++ `source` (which may include _KERNEL_SRC) into the cache and opens it with
    `setup(ctypes.CDLL(path))`; None where it cannot be had (GPTJ_QUANT_KERNEL=0, not x86-64
    Linux with AVX2/FMA/F16C, no compiler, or every build failed: logged, naming `what`)."""
    if os.environ.get("GPTJ_QUANT_KERNEL", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        log.warning("gptj: no C++ compiler; %s", what)
        return None
    err: Exception | None = None
    # -march=native picks AVX-512 VNNI / AVX-VNNI where present; plain AVX2 if that fails
    for flags in (["-O3", "-march=native"], ["-O3", "-mavx2", "-mfma", "-mf16c"]):
        try:
            # after torch: its libgomp serves our OpenMP too (same soname)
            return setup(ctypes.CDLL(str(_build(cxx, flags, source, stem))))
        except Exception as e:  # any failure means: use the torch ops
            err = e
    log.warning("gptj: native build failed; %s: %s", what, err)
    return None


def _load_kernel() -> ctypes.CDLL | None:
    return load_native(_KERNEL_SRC, "gq", _setup, "using torch's quantized ops (slower decode)")


def _open(path: Path) -> ctypes.CDLL:
    return _setup(ctypes.CDLL(str(path)))


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the kernel functions' arguments (for _KERNEL_SRC and libraries that include it)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gq_linear_int8.argtypes = [p, p, p, i64, i64, p, i64, p, p, i32]
    lib.gq_linear_int4.argtypes = [p, p, p, p, i64, i64, p, i64, p, p, i32]
    lib.gq_dequant_int8.argtypes = [p, p, i64, i64, i64, p, i32, i32]
    lib.gq_dequant_int4.argtypes = [p, p, p, i64, i64, i64, p, i32, i32]
    lib.gq_quantize_int8.argtypes = [p, i64, i64, p, p, i32]
    lib.gq_quantize_int4.argtypes = [p, i64, i64, i64, p, p, p, i32]
    for fn in (lib.gq_linear_int8, lib.gq_linear_int4, lib.gq_dequant_int8, lib.gq_dequant_int4,
               lib.gq_quantize_int8, lib.gq_quantize_int4):  # fmt: skip
        fn.restype = None
    lib.gq_isa.restype = ctypes.c_int
    lib.gq_amx.restype = ctypes.c_int
    return lib


def native_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library (built on first call), or None where it cannot be had."""
    global _lib, _lib_tried
    if not _lib_tried:
        with _lib_lock:
            if not _lib_tried:
                _lib = _load_kernel()
                _lib_tried = True
    return _lib


def decode_max_rows(mode: str) -> int:
    """Most rows that take the decode kernel (GPTJ_QUANT_DECODE_MAX_ROWS overrides)."""
    if "GPTJ_QUANT_DECODE_MAX_ROWS" in os.environ:
        return int(os.environ["GPTJ_QUANT_DECODE_MAX_ROWS"])
    lib = native_kernel()
    if mode == "int8" and lib is not None and lib.gq_amx():
        return AMX_INT8_DECODE_MAX_ROWS
    return DECODE_MAX_ROWS[mode]


def kernel_name() -> str:
    """Which decode kernel serves: 'avx512-vnni' (+amx: int8 batches on AMX tiles), 'avx-vnni',
    'avx2' or 'torch'."""
    lib = native_kernel()
    if lib is None:
        return "torch"
    return {3: "avx512-vnni", 2: "avx-vnni", 1: "avx2"}[lib.gq_isa()] + ("+amx" if lib.gq_amx() else "")


def _gemm_dtype() -> torch.dtype:
    # bf16 GEMMs run on AMX / AVX512-BF16 (~1.5 TFLOP/s here, 6x float32); elsewhere float32
    global _GEMM_DTYPE
    if _GEMM_DTYPE is None:
        flags = _cpu_flags()
        _GEMM_DTYPE = torch.bfloat16 if flags & {"amx_bf16", "avx512_bf16"} else torch.float32
    return _GEMM_DTYPE


_GEMM_DTYPE: torch.dtype | None = None
_workspace = threading.local()


def _buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """A per-thread scratch tensor, kept between calls: fresh large allocations page-fault."""
    key = f"buf_{dtype}"
    buf = getattr(_workspace, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_workspace, key, buf)
    return buf[:numel]


def _scratch(nbytes: int) -> int:
    """The address of a per-thread scratch buffer of at least nbytes, kept between calls."""
    buf = getattr(_workspace, "scratch", None)
    if buf is None or buf.numel() < nbytes:
        buf = _workspace.scratch = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf.data_ptr()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------- modules


class QuantizedLinear(nn.Module):
    """A Linear layer with int8 or int4 weights; takes and returns float32 or bfloat16."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str,
        bias: bool = True,
        group_size: int = GROUP_SIZE,
    ) -> None:
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"unknown quantization mode {mode!r}: expected 'int8' or 'int4'")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        n, k = out_features, in_features
        if mode == "int8":
            self.group_size = k
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32))
        else:
            self.group_size = g = _group_size(k, group_size)
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(n, k // g, dtype=torch.float16))
            self.register_buffer("mins", torch.empty(n, k // g, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(n, dtype=torch.float32) if bias else None)
        self._int4pack: tuple[Tensor, Tensor] | None = None  # torch-op fallback, made on demand

    # -- construction

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, mode: str, bias: bool = True, group_size: int = GROUP_SIZE
    ) -> QuantizedLinear:
        """A module with uninitialized buffers, for a loader to fill (load_state_dict or copy_)."""
        return cls(in_features, out_features, mode, bias, group_size)

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], prefix: str = "") -> QuantizedLinear:
        """A module over the tensors ``{prefix}qweight``, ``scales`` (``mins``, ``bias``), not copied.

        Older int4 tensors (``zeros`` instead of ``mins``) are converted (see convert_int4_zeros)."""
        q, scales = state[prefix + "qweight"], state[prefix + "scales"]
        bias = state.get(prefix + "bias")
        if q.dtype == torch.int8:
            mode, n, k, g = "int8", q.shape[0], q.shape[1], q.shape[1]
        elif q.dtype == torch.uint8:
            mode, n, k = "int4", q.shape[0], 2 * q.shape[1]
            if prefix + "mins" not in state and prefix + "zeros" in state:
                converted = convert_int4_zeros(q, scales, state[prefix + "zeros"])
                if bias is not None:
                    converted["bias"] = bias
                state, prefix = converted, ""
                q, scales = state["qweight"], state["scales"]
            if scales.dim() != 2 or scales.shape[1] == 0 or k % scales.shape[1]:
                raise ValueError(f"{prefix}scales: shape {list(scales.shape)} does not fit qweight {list(q.shape)}")
            g = k // scales.shape[1]
        else:
            raise ValueError(f"{prefix}qweight has dtype {q.dtype}: expected int8 or uint8")
        mod = cls(k, n, mode, bias is not None, g)
        for name in ("qweight", "scales", "mins", "bias"):
            if getattr(mod, name, None) is not None:
                t = state[prefix + name]
                if t.shape != getattr(mod, name).shape or t.dtype != getattr(mod, name).dtype:
                    raise ValueError(f"{prefix}{name}: {t.dtype} {list(t.shape)} does not fit a {mode} layer")
                setattr(mod, name, t if name != "bias" else t.contiguous())
        return mod

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None, mode: str, group_size: int = GROUP_SIZE
    ) -> QuantizedLinear:
        n, k = weight.shape
        mod = cls(k, n, mode, bias is not None, group_size)
        for name, t in quantize_weight(weight, mode, mod.group_size).items():
            setattr(mod, name, t)
        if bias is not None:
            mod.bias = bias.detach().to(torch.float32, copy=True)
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._int4pack = None
        keys = [prefix + name for name in ("qweight", "scales", "zeros")]
        if self.mode == "int4" and prefix + "mins" not in state_dict and all(k in state_dict for k in keys):
            # an older int4 checkpoint: convert (state_dict is load_state_dict's own copy)
            q, scales, zeros = (state_dict.pop(k) for k in keys)
            for name, t in convert_int4_zeros(q, scales, zeros, self.group_size).items():
                state_dict[prefix + name] = t
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] weight this layer stands for."""
        return dequantize_weight(self._buffers, dtype)  # type: ignore[arg-type]

    # -- forward

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.forward_gpu(x)
        rows = x.numel() // self.in_features if self.in_features else 0
        return self.forward_decode(x) if rows <= decode_max_rows(self.mode) else self.forward_prefill(x)

    def forward_gpu(self, x: Tensor) -> Tensor:
        """On CUDA: torch's int8 GEMV for a few rows where the device has it, else this layer's
        weight dequantized for the call (one layer's full-precision weight exists at a time)."""
        x2 = x.reshape(-1, self.in_features)
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        xt = x2.to(dt).contiguous()
        y = None
        if (
            self.mode == "int8"
            and x2.shape[0] <= DECODE_MAX_ROWS["int8"]
            and _GPU_INT8_MM.get(x.device.type, True)
        ):
            try:
                y = torch._weight_int8pack_mm(xt, self.qweight, self.scales.to(dt))
            except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
                _GPU_INT8_MM[x.device.type] = False
        if y is None:
            y = F.linear(xt, dequantize_weight(self._buffers, dt))  # type: ignore[arg-type]
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _kernel_fits(self) -> bool:
        ok = self.in_features % _KB == 0 and self.qweight.is_contiguous() and self.scales.is_contiguous()
        return ok and (self.mode == "int8" or (self.group_size == GROUP_SIZE and self.mins.is_contiguous()))

    def forward_decode(self, x: Tensor) -> Tensor:
        """The GEMV path: our kernel, or torch's int8/int4 op without it."""
        x2 = x.reshape(-1, self.in_features)
        lib = native_kernel()
        if lib is not None and self._kernel_fits():
            y = self._native_gemv(lib, x2)
        elif self.mode == "int8":
            # bf16 activations: the op is 2x (M=1) to 20x (M=64) slower with float32 ones here,
            # but its bf16 kernel gives garbage (or crashes) where in_features % 16 != 0
            dt = torch.bfloat16 if self.in_features % 16 == 0 else torch.float32
            y = torch._weight_int8pack_mm(x2.to(dt).contiguous(), self.qweight, self.scales.to(dt))
            if self.bias is not None:
                y = y.float() + self.bias
        else:
            y = self._torch_int4_gemv(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _native_gemv(self, lib: ctypes.CDLL, x2: Tensor) -> Tensor:
        m, k, n = x2.shape[0], self.in_features, self.out_features
        xf = x2.to(torch.float32).contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        scratch = _scratch(m * k + 8 * m * (k // _KB))
        threads = torch.get_num_threads()
        if self.mode == "int8":
            lib.gq_linear_int8(
                self.qweight.data_ptr(), self.scales.data_ptr(), _ptr(self.bias), n, k,
                xf.data_ptr(), m, y.data_ptr(), scratch, threads,
            )  # fmt: skip
        else:
            lib.gq_linear_int4(
                self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), _ptr(self.bias), n, k,
                xf.data_ptr(), m, y.data_ptr(), scratch, threads,
            )  # fmt: skip
        return y

    def _torch_int4_gemv(self, x2: Tensor) -> Tensor:
        g = self.group_size
        if g not in (32, 64, 128, 256) or self.out_features % 16:
            return self._gemm(x2)  # shapes the op does not take
        if self._int4pack is None:
            # torch's layout: its own packing, and w = (q - 8) * s + zero per [group, row]
            vals = torch.cat([self.qweight.view(self.out_features, -1, g // 2) & 15,
                              self.qweight.view(self.out_features, -1, g // 2) >> 4], dim=-1)  # fmt: skip
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                vals.reshape(self.out_features, self.in_features).to(torch.int32), 1
            )
            s = self.scales.float()
            zero = self.mins.float() + 8.0 * s
            sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._int4pack = (packed, sz)
        packed, sz = self._int4pack
        xt = x2.to(torch.bfloat16).contiguous()  # as for int8: far slower with float32
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xt, packed, g, sz)
        return y.float() if self.bias is None else y.float() + self.bias

    def forward_prefill(self, x: Tensor) -> Tensor:
        """The GEMM path: dequantize a chunk of rows at a time into a reused buffer."""
        y = self._gemm(x.reshape(-1, self.in_features))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _gemm(self, x2: Tensor) -> Tensor:
        dt = _gemm_dtype()
        n, k = self.out_features, self.in_features
        xc = x2.to(dt).contiguous()
        step = max(1, min(n, _CHUNK_BYTES // (k * dt.itemsize)))
        buf = _buffer(step * k, dt)
        lib = native_kernel() if self._kernel_fits() else None
        out = torch.empty(x2.shape[0], n, dtype=dt) if step < n else None
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            w = buf[: (n1 - n0) * k].view(n1 - n0, k)
            self._dequant_rows(lib, n0, n1, w)
            if out is None:
                out = F.linear(xc, w)
            else:
                out[:, n0:n1] = F.linear(xc, w)
        assert out is not None
        y = out.float()
        return y if self.bias is None else y.add_(self.bias)

    def _dequant_rows(self, lib: ctypes.CDLL | None, n0: int, n1: int, out: Tensor) -> None:
        bf16 = int(out.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        if lib is not None and out.dtype in (torch.float32, torch.bfloat16):
            k = self.in_features
            if self.mode == "int8":
                lib.gq_dequant_int8(
                    self.qweight.data_ptr(), self.scales.data_ptr(), n0, n1, k, out.data_ptr(), bf16, threads
                )
            else:
                lib.gq_dequant_int4(
                    self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), n0, n1, k,
                    out.data_ptr(), bf16, threads,
                )  # fmt: skip
            return
        part = {"qweight": self.qweight[n0:n1], "scales": self.scales[n0:n1]}
        if self.mode == "int4":
            part["mins"] = self.mins[n0:n1]
        out.copy_(dequantize_weight(part, out.dtype))


class BF16Linear(nn.Linear):
    """An nn.Linear stored in bfloat16 that casts its input and returns the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def quantize_linear(linear: nn.Linear, mode: str, group_size: int = GROUP_SIZE) -> nn.Module:
    """A quantized copy of `linear`: QuantizedLinear for "int8"/"int4", BF16Linear for "bf16".

    `linear` itself is left unchanged (its weight may be tied to an embedding)."""
    if mode == "bf16":
        new = BF16Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        return new
    # quantize_weight works on the CPU; the layer goes back where the original lived
    return QuantizedLinear.from_weight(linear.weight, linear.bias, mode, group_size).to(linear.weight.device)


def quantize_model(model: nn.Module, mode: str, skip: Callable[[str], bool] | None = None) -> nn.Module:
    """Replaces every nn.Linear in `model` (lm_head included) with its quantized form, in place.

    `skip(name)` keeps a layer as it is. Each original layer is dropped as soon as its replacement
    is in place, so only one full-precision matrix extra exists at a time. Returns the model (or
    the replacement, when `model` is itself a Linear)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: expected one of {', '.join(MODES)}")

    def wanted(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) and not (mode == "bf16" and isinstance(m, BF16Linear))

    if wanted(model):
        return quantize_linear(model, mode)  # type: ignore[arg-type]
    names = [name for name, m in model.named_modules() if name and wanted(m) and not (skip and skip(name))]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, quantize_linear(getattr(parent, attr), mode))
    return model
