// The library's C interface for ctypes (gptj/kernels/__init__.py): the gq_* functions, and
// gq_describe(), which tells Python what it needs to call them, so that nothing is mirrored by
// hand: the variant the library was built as, each function's result and argument types (from
// its C++ type) and each struct's size and fields with their types and offsets (from the field
// lists of decode.h). One line each:
//   variant avx512vnni
//   fn gq_linear_int8 v pppqqpqppi        result, then arguments: p pointer, q int64, i int32,
//                                         f float, v void
//   struct linear 56 w:p:0 scales:p:8 ... field:type:offset (type: a code above or a struct)
#include <stddef.h>

#include <string>

#include "decode.h"
#include "gemv.h"
#include "simd.h"

using namespace gq;

extern "C" {

void gq_linear_int8(const int8_t* W, const float* ws, const float* bias, int64_t N, int64_t K, const float* x,
                    int64_t M, float* y, void* scratch, int nthreads) {
    linear_int8(W, ws, bias, N, K, x, M, y, scratch, nthreads);
}

void gq_linear_int4(const uint8_t* P, const float* bias, int64_t N, int64_t K, const float* x, int64_t M,
                    float* y, void* scratch, int nthreads) {
    linear_int4(P, bias, N, K, x, M, y, scratch, nthreads);
}

int64_t gq_int4_panel_bytes(int64_t N, int64_t K) { return int4_panel_bytes(N, K); }

void gq_pack_int4_panels(const uint8_t* W, const uint16_t* sc, const uint16_t* mn, int64_t N, int64_t K,
                         uint8_t* P, int nthreads) {
    pack_int4_panels(W, sc, mn, N, K, P, nthreads);
}

int gq_int8_panels(void) { return int8_panels(); }

int64_t gq_int8_panel_bytes(int64_t N, int64_t K) { return int8_panel_bytes(N, K); }

void gq_pack_int8_panels(const int8_t* W, int64_t N, int64_t K, uint8_t* P, int nthreads) {
    pack_int8_panels(W, N, K, P, nthreads);
}

int64_t gq_linear_scratch_bytes(int64_t M, int64_t K) { return linear_scratch_bytes(M, K); }

int gq_amx_ready(void) { return amx_ready(); }

void gq_dequant_int8(const int8_t* W, const float* ws, int64_t n0, int64_t n1, int64_t K, void* out, int bf16,
                     int nthreads) {
    dequant_int8(W, ws, n0, n1, K, out, bf16, nthreads);
}

void gq_dequant_int4(const uint8_t* P, int64_t n0, int64_t n1, int64_t K, void* out, int bf16, int nthreads) {
    dequant_int4(P, n0, n1, K, out, bf16, nthreads);
}

void gq_quantize_int8(const float* w, int64_t n, int64_t k, int8_t* q, float* scales, int nthreads) {
    quantize_int8(w, n, k, q, scales, nthreads);
}

void gq_quantize_int4(const float* w, int64_t n, int64_t k, int64_t g, uint8_t* q, uint16_t* scales,
                      uint16_t* mins, int nthreads) {
    quantize_int4(w, n, k, g, q, scales, mins, nthreads);
}

int64_t gq_llama_decode_scratch(const LlamaDims* d, int64_t B, int64_t max_len, int nthreads) {
    return llama_decode_scratch(d, B, max_len, nthreads);
}

int gq_llama_decode(const LlamaLayer* layers, const LlamaDims* d, float* x, int64_t B, const int64_t* pos,
                    const int64_t* rows, const float* cos_t, const float* sin_t, float* kc, float* vc,
                    int64_t cache_rows, int64_t max_len, void* scratch, int nthreads) {
    return llama_decode(layers, d, x, B, pos, rows, cos_t, sin_t, kc, vc, cache_rows, max_len, scratch,
                        nthreads);
}

int64_t gq_gptj_decode_scratch(const GptjDims* d, int64_t B, int64_t max_len, int nthreads) {
    return gptj_decode_scratch(d, B, max_len, nthreads);
}

int gq_gptj_decode(const GptjLayer* layers, const GptjDims* d, float* x, int64_t B, const int64_t* pos,
                   const int64_t* rows, const float* cos_t, const float* sin_t, void* kc, void* vc,
                   int64_t cache_rows, int64_t max_len, void* scratch, int nthreads) {
    return gptj_decode(layers, d, x, B, pos, rows, cos_t, sin_t, kc, vc, cache_rows, max_len, scratch,
                       nthreads);
}

int64_t gq_attention_scratch(int64_t B, int64_t nh, int64_t hd, int64_t max_len, int nthreads) {
    return attention_scratch(B, nh, hd, max_len, nthreads);
}

int gq_attention(const float* q, int64_t B, const int64_t* pos, const int64_t* rows, int64_t nh, int64_t nkv,
                 int64_t hd, const void* kl, const void* vl, int32_t bf16, int64_t cache_rows,
                 int64_t max_len, float* att, void* scratch, int nthreads) {
    return attention(q, B, pos, rows, nh, nkv, hd, kl, vl, bf16, cache_rows, max_len, att, scratch, nthreads);
}

const char* gq_describe(void);

}  // extern "C"

// ---------------------------------------------------------------- the description

namespace {

template <typename T>
struct Code;
template <typename T>
struct Code<T*> {
    static constexpr const char* c = "p";
};
template <>
struct Code<int64_t> {
    static constexpr const char* c = "q";
};
template <>
struct Code<int32_t> {
    static constexpr const char* c = "i";
};
template <>
struct Code<float> {
    static constexpr const char* c = "f";
};
template <>
struct Code<void> {
    static constexpr const char* c = "v";
};
template <>
struct Code<Linear> {
    static constexpr const char* c = "linear";
};

template <typename R, typename... A>
std::string signature(R (*)(A...)) {
    std::string s = std::string(Code<R>::c) + " ";
    ((s += Code<A>::c), ...);
    return s;
}

template <typename T>
void field(std::string& out, const char* name, size_t offset) {
    out += std::string(" ") + name + ":" + Code<T>::c + ":" + std::to_string(offset);
}

const char* variant() {
#if GQ_AMX
    return "amx";
#elif GQ_AVX512 && GQ_VNNI
    return "avx512vnni";
#elif GQ_AVX512
    return "avx512";
#elif GQ_VNNI
    return "avxvnni";
#else
    return "avx2";
#endif
}

std::string describe() {
    std::string out = std::string("variant ") + variant() + "\n";
#define GQ_FN(name) out += std::string("fn " #name " ") + signature(&name) + "\n";
    GQ_FN(gq_linear_int8)
    GQ_FN(gq_linear_int4)
    GQ_FN(gq_int4_panel_bytes)
    GQ_FN(gq_pack_int4_panels)
    GQ_FN(gq_linear_scratch_bytes)
    GQ_FN(gq_int8_panels)
    GQ_FN(gq_int8_panel_bytes)
    GQ_FN(gq_pack_int8_panels)
    GQ_FN(gq_amx_ready)
    GQ_FN(gq_dequant_int8)
    GQ_FN(gq_dequant_int4)
    GQ_FN(gq_quantize_int8)
    GQ_FN(gq_quantize_int4)
    GQ_FN(gq_llama_decode_scratch)
    GQ_FN(gq_llama_decode)
    GQ_FN(gq_gptj_decode_scratch)
    GQ_FN(gq_gptj_decode)
    GQ_FN(gq_attention_scratch)
    GQ_FN(gq_attention)
#undef GQ_FN
#define GQ_FIELD(type, name) field<type>(out, #name, offsetof(GQ_STRUCT, name));
#define GQ_STRUCT Linear
    out += "struct linear " + std::to_string(sizeof(GQ_STRUCT));
    GQ_LINEAR_FIELDS(GQ_FIELD)
#undef GQ_STRUCT
#define GQ_STRUCT LlamaLayer
    out += "\nstruct llama_layer " + std::to_string(sizeof(GQ_STRUCT));
    GQ_LLAMA_LAYER_FIELDS(GQ_FIELD)
#undef GQ_STRUCT
#define GQ_STRUCT LlamaDims
    out += "\nstruct llama_dims " + std::to_string(sizeof(GQ_STRUCT));
    GQ_LLAMA_DIMS_FIELDS(GQ_FIELD)
#undef GQ_STRUCT
#define GQ_STRUCT GptjLayer
    out += "\nstruct gptj_layer " + std::to_string(sizeof(GQ_STRUCT));
    GQ_GPTJ_LAYER_FIELDS(GQ_FIELD)
#undef GQ_STRUCT
#define GQ_STRUCT GptjDims
    out += "\nstruct gptj_dims " + std::to_string(sizeof(GQ_STRUCT));
    GQ_GPTJ_DIMS_FIELDS(GQ_FIELD)
#undef GQ_STRUCT
#undef GQ_FIELD
    return out + "\n";
}

}  // namespace

const char* gq_describe(void) {
    static const std::string text = describe();
    return text.c_str();
}
