// A streaming read with software prefetch, every thread over its own part: what the cores can pull
// from memory (benchmarks/bench_6b.py's floor). Built at run time by gptj.kernels.build_source.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#ifdef __AVX512F__
typedef __m512i V;
static inline V load(const char* p) { return _mm512_loadu_si512(p); }
static inline V vxor(V a, V b) { return _mm512_xor_si512(a, b); }
#else
typedef __m256i V;
static inline V load(const char* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline V vxor(V a, V b) { return _mm256_xor_si256(a, b); }
#endif
// xor of every vector in p[0, n) (n: a multiple of 256 per thread); returns a byte of it
extern "C" int bench_read(const char* p, int64_t n, int nthreads) {
    int out = 0;
#pragma omp parallel num_threads(nthreads) reduction(^ : out)
    {
        const int64_t per = n / omp_get_num_threads() / 256 * 256, start = per * omp_get_thread_num();
        V a0 = load(p + start), a1 = a0, a2 = a0, a3 = a0;
        constexpr int W = sizeof(V);
        for (const char* q = p + start; q < p + start + per; q += 4 * W) {
            for (int j = 0; j < 4 * W; j += 64) _mm_prefetch(q + 8192 + j, _MM_HINT_T0);
            a0 = vxor(a0, load(q)), a1 = vxor(a1, load(q + W)), a2 = vxor(a2, load(q + 2 * W)),
            a3 = vxor(a3, load(q + 3 * W));
        }
        alignas(64) char b[sizeof(V)];
        *(V*)b = vxor(vxor(a0, a1), vxor(a2, a3));
        out ^= b[0];
    }
    return out;
}
