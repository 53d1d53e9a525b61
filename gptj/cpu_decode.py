"""One decode step of every block in one C++ call, on the CPU (as llama.cpp does): Llama and GPT-J.

At batch 1 a small model spends far more time dispatching small torch ops (RMSNorm, rotary,
views, cache writes, SDPA, residual adds, silu * mul: ~100 per layer) than in its GEMVs. Here
one call (gptj/kernels/decode.cpp) runs, for each layer and each of the B rows' T tokens
(T = 1 in decode; a few drafted tokens to verify in speculative decoding):

    Llama: h = rms_norm(x) -> qkv GEMV -> rotary on q, k (halves) -> k, v into the cache at the
    row's position -> attention over positions 0..pos (GQA, softmax in float32) -> o GEMV ->
    x += ... -> rms_norm -> gate_up GEMV -> silu(gate) * up -> down GEMV -> x += ...

    GPT-J: h = layer_norm(x) -> q, k, v GEMVs (or one fused) -> rotary on the first rotary_dim
    dims of q, k in adjacent pairs -> cache -> attention -> out GEMV; fc_in GEMV -> gelu_new ->
    fc_out GEMV; x += both (attention and MLP in parallel from one norm)

with x [B, hidden] float32 updated in place, the GEMVs those of quant.QuantizedLinear (same
library, same variant), the rotary tables the torch path's own in float32. The caller (the
model runner, gptj.runtime.runner) passes the embeddings and applies the final norm and head.

Results equal the torch path's up to float rounding; but the GEMV kernel quantizes its input
to int8, so a one-ulp difference can round an activation the other way, and in a deep model
such differences grow: the logits then differ as much as the torch path's own do when its
input is nudged by one ulp (tests/test_cpu_decode.py). A bfloat16 model's residual stream runs
in float32 here (rounded back to bf16 after the step).

Served: Llama and GPT-J models on the CPU whose linears are all QuantizedLinear layers (int8, or
int4 in groups of 32) the kernel takes (Llama: fused), float32 or bfloat16 activations, a
float32 KV cache (GPT-J: or bfloat16), at most MAX_ROWS rows. Anything else
(prefill, float or bf16 weights, CUDA, no cache, another cache dtype, no kernels) keeps the
torch path: `decode_blocks` returns False and has changed nothing. GPTJ_FAST_DECODE=0 turns it
off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from gptj import kernels, quant
from gptj.quant import QuantizedLinear
from gptj.runtime.kv_cache import KVCache

# Most tokens one fused step takes: a decode batch, drafted tokens, a prompt chunk of the engine's
# (512) with the batch's decode tokens beside it. GPTJ_QUANT_DECODE_MAX_ROWS overrides.
MAX_ROWS = 640


def native_library() -> kernels.Library | None:
    """The kernel library in use (quant's GEMVs and the decode step), or None."""
    return kernels.active()


def enabled() -> bool:
    return os.environ.get("GPTJ_FAST_DECODE", "1") != "0"


# The variants whose few-row int8 and int4 loops multiply with VNNI's dpbusd or AMX's tiles: a
# step of a dozen rows costs little more than one row's reads of the weights. With maddubs alone
# (avx2, avx512) each 32 products take four instructions, and 8 rows cost 2-3x one row
# (benchmarks/results/gptj-6b-zen3.md).
CHEAP_ROWS_VARIANTS = ("avxvnni", "avx512vnni", "amx")


def rows_are_cheap() -> bool:
    """Whether a fused step of several rows costs about what one row's does: bound by the
    weights' reads, not by the arithmetic."""
    lib = native_library()
    return lib is not None and lib.variant in CHEAP_ROWS_VARIANTS


class _Plan:
    """What one model's decode steps pass to C++: structs (laid out as the library describes
    them) pointing at every layer's weights, the tensors held here so they outlive the pointers,
    and reused scratch per thread."""

    arch = ""
    cache_dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    def __init__(self, lib: kernels.Library) -> None:
        self.lib, self.tensors = lib, []
        self.local = threading.local()
        self.step = getattr(lib, f"gq_{self.arch}_decode")
        self._scratch = getattr(lib, f"gq_{self.arch}_decode_scratch")

    def _float(self, t: Tensor, n: int) -> int:
        """A pointer to t as float32 (converted once where it is not: a bf16 model's norms)."""
        if t.device.type != "cpu" or t.shape != (n,) or not t.dtype.is_floating_point:
            raise _Unsupported
        t = t.detach().to(torch.float32).contiguous()
        self.tensors.append(t)
        return t.data_ptr()

    def _linear(self, m: nn.Module | None, k: int, n: int) -> dict[str, Any]:
        if not isinstance(m, QuantizedLinear) or (m.in_features, m.out_features) != (k, n):
            raise _Unsupported
        weights = m.kernel_weights()
        if weights is None:
            raise _Unsupported
        w, scales = weights
        self.tensors += [t for t in (w, scales) if t is not None]
        bias = self._float(m.bias, n) if m.bias is not None else None
        return {"w": w.data_ptr(), "scales": quant._ptr(scales), "bias": bias, "n": n, "k": k,
                "bits": 8 if m.mode == "int8" else 4}  # fmt: skip

    def _structs(self, layers: list[dict[str, Any]], dims: dict[str, Any]) -> None:
        self.layers = self.lib.layouts[f"{self.arch}_layer"].array(layers)
        self.dims_layout = self.lib.layouts[f"{self.arch}_dims"]
        self.dims = self.dims_layout.array([dims])
        self.dims_values = dims
        self.layers_ptr, self.dims_ptr = ctypes.addressof(self.layers), ctypes.addressof(self.dims)

    def set_dims(self, **values: Any) -> None:
        """Changes fields of the dims struct (GPT-J: the cache's dtype, per call)."""
        if any(self.dims_values[k] != v for k, v in values.items()):
            self.dims_values = {**self.dims_values, **values}
            self.dims_layout.pack_into(self.dims, 0, self.dims_values)

    def scratch(self, rows: int, max_len: int, threads: int) -> int:
        need = self._scratch(self.dims_ptr, rows, max_len, threads)
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < need:
            buf = self.local.buf = torch.empty(need, dtype=torch.uint8)
        return buf.data_ptr()


class _LlamaPlan(_Plan):
    arch = "llama"

    def __init__(self, model: nn.Module, lib: kernels.Library) -> None:
        super().__init__(lib)
        cfg = model.config
        hd = cfg.head_dim or cfg.hidden_size // cfg.n_head
        if cfg.n_head % cfg.n_kv_heads or hd % 2:
            raise _Unsupported
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layer, cfg.n_kv_heads, hd
        layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_out = (cfg.n_head + 2 * cfg.n_kv_heads) * hd
            layers.append({
                "ln1": self._float(block.input_layernorm.weight, cfg.hidden_size),
                "ln2": self._float(block.post_attention_layernorm.weight, cfg.hidden_size),
                "qkv": self._linear(attn.qkv_proj, cfg.hidden_size, qkv_out),
                "o": self._linear(attn.o_proj, cfg.n_head * hd, cfg.hidden_size),
                "gate_up": self._linear(mlp.gate_up_proj, cfg.hidden_size, 2 * cfg.intermediate_size),
                "down": self._linear(mlp.down_proj, cfg.intermediate_size, cfg.hidden_size),
            })  # fmt: skip
        dims = {"n_layers": cfg.n_layer, "hidden": cfg.hidden_size, "n_head": cfg.n_head, "n_kv": cfg.n_kv_heads,
                "head_dim": hd, "inter": cfg.intermediate_size, "eps": cfg.rms_norm_eps}  # fmt: skip
        self._structs(layers, dims)


class _GptjPlan(_Plan):
    arch = "gptj"
    cache_dtypes = (torch.float32, torch.bfloat16)

    def __init__(self, model: nn.Module, lib: kernels.Library) -> None:
        super().__init__(lib)
        cfg = model.config
        d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.n_inner or 4 * cfg.n_embd
        if cfg.rotary_dim % 2:
            raise _Unsupported
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layer, cfg.n_head, hd
        empty = {"w": None, "scales": None, "bias": None, "n": 0, "k": 0, "bits": 0}
        layers = []
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            if attn.qkv_proj is not None:  # fused: k and v stay empty
                q, k, v = self._linear(attn.qkv_proj, d, 3 * d), empty, empty
            else:
                q, k, v = (self._linear(m, d, d) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            layers.append({
                "ln_w": self._float(block.ln_1.weight, d), "ln_b": self._float(block.ln_1.bias, d),
                "q": q, "k": k, "v": v, "out": self._linear(attn.out_proj, d, d),
                "fc_in": self._linear(mlp.fc_in, d, inner), "fc_out": self._linear(mlp.fc_out, inner, d),
            })  # fmt: skip
        dims = {"n_layers": cfg.n_layer, "hidden": d, "n_head": cfg.n_head, "head_dim": hd,
                "rotary_dim": cfg.rotary_dim, "inner": inner, "eps": cfg.layer_norm_epsilon, "cache_bf16": 0}  # fmt: skip
        self._structs(layers, dims)


class _Unsupported(Exception):
    pass


# model -> (what the plan was made from, the plan or None); kept beside the model, not in it, so
# that copying or pickling a model never meets ctypes objects
_plans: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], _Plan | None]] = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module) -> tuple[int, ...] | None:
    """What identifies the layers a plan points into (None: no layers)."""
    if getattr(model, "architecture", None) == "llama":
        layers = model.model.layers
        if not len(layers):
            return None
        return id(layers[0].self_attn.qkv_proj), id(layers[-1].mlp.down_proj), layers[0].input_layernorm.weight.data_ptr()
    if getattr(model, "architecture", None) == "gptj":
        blocks = model.transformer.h
        if not len(blocks):
            return None
        attn = blocks[0].attn
        first = attn.qkv_proj if attn.qkv_proj is not None else attn.q_proj
        return id(first), id(blocks[-1].mlp.fc_out), blocks[0].ln_1.weight.data_ptr()
    return None


def _plan(model: nn.Module) -> _Plan | None:
    """The model's plan, made on first use (None where the fast path cannot serve it). Made again
    when the layers were replaced (e.g. by fuse_projections) or the kernel variant changed."""
    layers_key = _plan_key(model)
    if layers_key is None:
        return None
    lib = native_library()
    key = (*layers_key, lib.variant if lib is not None else None)
    held = _plans.get(model)
    if held is not None and held[0] == key:
        return held[1]
    plan = None
    if lib is not None:
        try:
            plan = (_LlamaPlan if model.architecture == "llama" else _GptjPlan)(model, lib)
        except _Unsupported:
            plan = None
    _plans[model] = (key, plan)
    return plan


def max_entries() -> int:
    """Most tokens (rows x tokens per row) one fused step takes."""
    return int(os.environ.get("GPTJ_QUANT_DECODE_MAX_ROWS", MAX_ROWS))


def serves(model: nn.Module) -> bool:
    """Whether the fused step can run `model`'s blocks (its layers and the kernels in use)."""
    return _plan(model) is not None


def decode_blocks(
    model: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVCache, rows: slice | Tensor
) -> bool:
    """Runs every block of `model` (a Llama or a GPT-J) on x [B, T, hidden] in place: row b's T
    tokens at positions [B, T] (consecutive, causal among themselves), writing keys and values
    into `cache` as the torch path does. `rows`: the B consecutive cache rows, or (ragged, B = 1)
    a tensor of each token's own cache row [T]: tokens of several rows at their own positions in
    one step. cos/sin: the model's rotary tables in float32. A token's results are the same bits
    whatever else its step holds (decode.h). False (nothing changed) where this path does not
    serve: the caller then runs the blocks in torch."""
    if x.dim() != 3 or x.device.type != "cpu" or not enabled():
        return False
    if x.requires_grad or not x.is_contiguous() or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    plan = _plan(model)
    if plan is None:
        return False
    batch, tokens = x.shape[0], x.shape[1]
    entries = batch * tokens
    k, v = cache.k, cache.v
    shape = (plan.n_layers, cache.n_rows, plan.n_kv, cache.max_len, plan.head_dim)
    if k.dtype not in plan.cache_dtypes or v.dtype != k.dtype or k.device.type != "cpu" or k.shape != shape:
        return False
    if v.shape != shape or not (k.is_contiguous() and v.is_contiguous()):
        return False
    if entries > max_entries() or entries == 0:
        return False
    if isinstance(rows, slice):
        start, stop, step = rows.indices(cache.n_rows)
        if step != 1 or stop - start != batch:
            return False
        row_of = torch.arange(start, stop, dtype=torch.int64).repeat_interleave(tokens)
    else:
        row_of = rows.reshape(-1).to(torch.int64).contiguous()
        if batch != 1 or row_of.numel() != entries or row_of.device.type != "cpu":
            return False
    pos = positions.reshape(-1)
    if pos.numel() != entries or pos.device.type != "cpu":
        return False
    pos = pos.to(torch.int64).contiguous()
    hd = plan.head_dim
    for t in (cos, sin):
        if t.numel() != entries * hd or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    if isinstance(plan, _GptjPlan):
        plan.set_dims(cache_bf16=int(k.dtype == torch.bfloat16))
    # the residual stream runs in float32 here (a bf16 model's is rounded back afterwards)
    xf = x if x.dtype == torch.float32 else x.float()
    threads = torch.get_num_threads()
    scratch = plan.scratch(entries, cache.max_len, threads)
    rc = plan.step(
        plan.layers_ptr, plan.dims_ptr, xf.data_ptr(), entries, pos.data_ptr(), row_of.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), k.data_ptr(), v.data_ptr(), cache.n_rows, cache.max_len, scratch, threads,
    )  # fmt: skip
    if rc == 0 and xf is not x:
        x.copy_(xf)
    return rc == 0
