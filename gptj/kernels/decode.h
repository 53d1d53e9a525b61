// One decode step of every block of a Llama or a GPT-J model (decode.cpp), and the structs that
// describe a model's layers to it. Each struct's fields are listed once, in an X-macro: the
// struct is made from it here and bindings.cpp describes the layout from it to Python, which
// fills the structs by field name (gptj/cpu_decode.py).
#pragma once

#include <stdint.h>

namespace gq {

#define GQ_DECLARE_FIELD(type, name) type name;

// A quantized linear layer (see gemv.h)
#define GQ_LINEAR_FIELDS(X)                                                  \
    X(const void*, w)       /* int8 [n,k] or panels, int4 panels (gemv.h) */ \
    X(const float*, scales) /* fp32 [n] (int8) */                            \
    X(const float*, bias)   /* fp32 [n] or null */                           \
    X(int64_t, n)                                                            \
    X(int64_t, k)                                                            \
    X(int32_t, bits) /* 8 or 4 */
struct Linear {
    GQ_LINEAR_FIELDS(GQ_DECLARE_FIELD)
};

// Llama: x += o(attention(rotary(qkv(rms_norm(x, ln1))))); x += down(silu(gate) * up), gate_up
// of rms_norm(x, ln2)
#define GQ_LLAMA_LAYER_FIELDS(X) \
    X(const float*, ln1)         \
    X(const float*, ln2)         \
    X(Linear, qkv)               \
    X(Linear, o)                 \
    X(Linear, gate_up)           \
    X(Linear, down)
struct LlamaLayer {
    GQ_LLAMA_LAYER_FIELDS(GQ_DECLARE_FIELD)
};

#define GQ_LLAMA_DIMS_FIELDS(X) \
    X(int64_t, n_layers)        \
    X(int64_t, hidden)          \
    X(int64_t, n_head)          \
    X(int64_t, n_kv)            \
    X(int64_t, head_dim)        \
    X(int64_t, inter)           \
    X(float, eps)
struct LlamaDims {
    GQ_LLAMA_DIMS_FIELDS(GQ_DECLARE_FIELD)
};

// GPT-J: h = layer_norm(x); x += out(attention(rotary(q(h)), rotary(k(h)), v(h))) +
// fc_out(gelu(fc_in(h))). k.w == null: q holds q, k and v fused (3 * hidden outputs).
#define GQ_GPTJ_LAYER_FIELDS(X) \
    X(const float*, ln_w)       \
    X(const float*, ln_b)       \
    X(Linear, q)                \
    X(Linear, k)                \
    X(Linear, v)                \
    X(Linear, out)              \
    X(Linear, fc_in)            \
    X(Linear, fc_out)
struct GptjLayer {
    GQ_GPTJ_LAYER_FIELDS(GQ_DECLARE_FIELD)
};

#define GQ_GPTJ_DIMS_FIELDS(X) \
    X(int64_t, n_layers)       \
    X(int64_t, hidden)         \
    X(int64_t, n_head)         \
    X(int64_t, head_dim)       \
    X(int64_t, rotary_dim)     \
    X(int64_t, inner)          \
    X(float, eps)              \
    X(int32_t, cache_bf16) /* the KV cache holds bfloat16, else float32 */
struct GptjDims {
    GQ_GPTJ_DIMS_FIELDS(GQ_DECLARE_FIELD)
};

// Bytes of scratch one step of B entries needs.
int64_t llama_decode_scratch(const LlamaDims* d, int64_t B, int64_t max_len, int nthreads);
int64_t gptj_decode_scratch(const GptjDims* d, int64_t B, int64_t max_len, int nthreads);

// One step of all layers for B entries; x [B, hidden] float32 in place. Entry b is a token of
// cache row rows[b] at position pos[b]: it writes its keys and values there and attends to keys
// 0..pos[b] of that row, so entries of one row at consecutive positions (drafted tokens to verify,
// a prompt's chunk) see each other causally. Each entry's results are the same float operations
// whatever the other entries are: a token's logits do not depend on its step's company.
// cos/sin [B, head_dim] (GPT-J: pairs repeated); kc/vc [n_layers, cache_rows, n_kv, max_len,
// head_dim], float32 (GPT-J: or bfloat16, as d->cache_bf16 says). Returns 0, or -1 (having
// changed nothing) where an entry's row or position is outside the cache.
int llama_decode(const LlamaLayer* layers, const LlamaDims* d, float* x, int64_t B, const int64_t* pos,
                 const int64_t* rows, const float* cos_t, const float* sin_t, float* kc, float* vc,
                 int64_t cache_rows, int64_t max_len, void* scratch, int nthreads);
int gptj_decode(const GptjLayer* layers, const GptjDims* d, float* x, int64_t B, const int64_t* pos,
                const int64_t* rows, const float* cos_t, const float* sin_t, void* kc, void* vc,
                int64_t cache_rows, int64_t max_len, void* scratch, int nthreads);

// Attention alone, as the decode steps run it (benchmarks/ab_kernels.py, tests): B entries of one
// layer's cache kl/vl [cache_rows, nkv, max_len, hd] (bfloat16 where bf16, else float32), entry b
// a query of nh heads at q + b * nh * hd, at position pos[b] of row rows[b], over its keys 0..pos[b];
// att [B, nh * hd]. Returns 0, or -1 where an entry lies outside the cache or nkv does not divide nh.
int64_t attention_scratch(int64_t B, int64_t nh, int64_t hd, int64_t max_len, int nthreads);
int attention(const float* q, int64_t B, const int64_t* pos, const int64_t* rows, int64_t nh, int64_t nkv,
              int64_t hd, const void* kl, const void* vl, int32_t bf16, int64_t cache_rows, int64_t max_len,
              float* att, void* scratch, int nthreads);

}  // namespace gq
