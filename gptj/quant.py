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

Where the C++ kernels serve, an int4 layer holds its weights in their layout instead
(``panels``, gptj/kernels/gemv.h: 16 rows at a time, group after group, 4 values of each row side
by side in each nibble vector, then the group's scales and mins), made once when the layer is
built: the GEMV reads one sequential stream rather than three, unpacks a vector with a mask and a
shift, and a few activation rows cost little more than one. Where the variant in use has VNNI
(``amx`` too), an int8 layer likewise holds ``panels`` (16 rows at a time, 4 bytes of each row side
by side, offset by 128: the operand its dot-product instruction takes, and AMX's B tile). Either
goes back to rows where another variant, or torch, serves. ``state_dict()``, ``dequantize()`` and
``portable_buffers()`` still give the portable buffers above.

A loader makes the module with ``QuantizedLinear.empty(...)`` and fills those buffers, or calls
``QuantizedLinear.from_state(tensors)``, which uses the tensors as they are (memory-mapped int8
ones stay mapped, unless the kernels read panels; int4 ones go into panels; older int4 ones
are converted). The group size and mode
follow from the shapes and dtypes.

Kernels (which one serves is decided per CPU; benchmarks/bench_linear.py measures them):

* the C++ kernels of gptj.kernels, in the variant this CPU runs best (GPTJ_ISA forces one). They
  quantize the activations to int8 per block (int8: of 128, the last one shorter; int4: of 32,
  its group), take the integer dot products exactly and then a fixed sequence of float32
  operations (gptj/kernels/gemv.h), so every variant, and any batch of rows, gives the same bits.
  They take in_features that are a multiple of 32. Batches of int8 rows run on AMX tiles (the
  ``amx`` variant), at any size: they outrun dequantize + an AMX bf16 GEMM, and keep prefill
  exact with decode. Without them (``none``: no compiler, GPTJ_QUANT_KERNEL=0) or for shapes they
  do not take, torch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` serve.
* dequantize + GEMM: the weight dequantized to bfloat16 into a reused buffer, in big chunks of
  rows, and torch's GEMM. Only where the CPU multiplies bf16 natively (AMX, AVX512-BF16 without
  VNNI) and the batch is big enough (``kernel_max_rows``) does this beat the integer kernels;
  where bf16 is emulated (AVX2) the alternative would be a float32 GEMM, which the int8 dot
  products outrun at any size, so prefill takes the kernels too, and is then bit-exact with
  decode (as on AVX512-VNNI without AMX, whose integer GEMMs beat an AVX512-BF16 one).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptj import kernels
from gptj.memory import huge_page_empty

MODES = ("bf16", "int8", "int4")
GROUP_SIZE = 32  # int4; the kernel takes this group size only
_KB = 32  # the kernel takes in_features that are a multiple of this
# Most rows that go through the kernels where a bf16 GEMM is native (GPTJ_QUANT_DECODE_MAX_ROWS
# overrides): past these, dequantize + bf16 GEMM wins (bench_linear.py finds the crossover).
KERNEL_MAX_ROWS_AMX_BF16 = {"int8": 32, "int4": 32}  # AMX bf16 GEMMs
KERNEL_MAX_ROWS_AVX512_BF16 = {"int8": 96, "int4": 96}  # AVX512-BF16 without AMX or VNNI (with VNNI: no limit)
# torch's int8/int4 ops (no kernels): beyond this, dequantize + GEMM
TORCH_OP_MAX_ROWS = 32
# variants that stand for a CPU whose bf16 arithmetic is emulated: forcing one (GPTJ_ISA=avx2)
# takes the path such a CPU takes, even on a machine that has more
_NO_BF16_VARIANTS = ("avx2", "avxvnni")
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
        q = huge_page_empty(n, k, dtype=torch.int8)  # the kernels may read these rows as they are
        scales = torch.empty(n, dtype=torch.float32)
        for r0 in range(0, n, step):
            part = w[r0 : r0 + step].float()
            if lib is not None:  # same result, much faster: GPT-J loads quantize 6B weights
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


_INT4_GROUP_BYTES = 320  # a panel's group (gemv.cpp's GB4): 4 x 64 nibble bytes, 16 scales, 16 mins


def unpanel_int4(panels: Tensor, out_features: int, in_features: int) -> dict[str, Tensor]:
    """The portable int4 buffers (``qweight``, ``scales``, ``mins``) of the 16-row panels (gemv.h;
    torch ops, any device)."""
    n, k = out_features, in_features
    ng, npan = k // GROUP_SIZE, (n + 15) // 16
    blk = panels.view(npan, ng, _INT4_GROUP_BYTES)
    chunks = blk[..., :256].reshape(npan, ng, 4, 16, 4)  # [panel, group, chunk c, row j, byte i]
    lo, hi = chunks & 15, chunks >> 4  # values 8c + i, and 8c + 4 + i
    vals = torch.stack([lo, hi], dim=3).permute(0, 4, 1, 2, 3, 5).reshape(npan * 16, ng, 32)[:n]
    qweight = vals[..., :16] | (vals[..., 16:] << 4)  # byte i: values i and i + 16
    fp16 = blk[..., 256:].contiguous().view(torch.float16).reshape(npan, ng, 2, 16).permute(2, 0, 3, 1)
    return {
        "qweight": qweight.reshape(n, k // 2).contiguous(),
        "scales": fp16[0].reshape(npan * 16, ng)[:n].contiguous(),
        "mins": fp16[1].reshape(npan * 16, ng)[:n].contiguous(),
    }


def unpanel_int8(panels: Tensor, out_features: int, in_features: int) -> Tensor:
    """qweight int8 [N, K] from the 16-row panels (gemv.h): [N/16][K/4][16][4] bytes of w ^ 0x80."""
    n, k = out_features, in_features
    p = panels.view((n + 15) // 16, k // 4, 16, 4).permute(0, 2, 1, 3).reshape(-1, k)[:n]
    return (p ^ 0x80).view(torch.int8).contiguous()


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


def native_kernel() -> kernels.Library | None:
    """The C++ kernel library in use (gptj.kernels: built on first call), or None: torch's ops."""
    return kernels.active()


def native_bf16() -> bool:
    """Whether bf16 GEMMs run natively here (AMX or AVX512-BF16) for the variant in use."""
    if kernels.active_variant() in _NO_BF16_VARIANTS:
        return False
    return bool(kernels.cpu_flags() & {"amx_bf16", "avx512_bf16"})


def kernel_max_rows(mode: str) -> int:
    """Most rows that take the GEMV kernels (or torch's quantized ops) rather than dequantize +
    GEMM. Unbounded where bf16 is not native (float32 GEMMs are slower than the integer kernels
    at any batch size), and on AVX512-VNNI without AMX, where the kernels' GEMMs outrun an
    AVX512-BF16 one (benchmarks/results/gptj-6b-zen5.md). GPTJ_QUANT_DECODE_MAX_ROWS overrides."""
    if "GPTJ_QUANT_DECODE_MAX_ROWS" in os.environ:
        return int(os.environ["GPTJ_QUANT_DECODE_MAX_ROWS"])
    lib = native_kernel()
    if lib is None:
        return TORCH_OP_MAX_ROWS
    if mode == "int8" and lib.amx:
        return sys.maxsize  # AMX int8 tiles beat dequantize + an AMX bf16 GEMM at any batch
    if not native_bf16():
        return sys.maxsize
    flags = kernels.cpu_flags()
    if "amx_bf16" in flags:
        return KERNEL_MAX_ROWS_AMX_BF16[mode]
    if kernels.active_variant() == "avx512vnni":
        return sys.maxsize  # its GEMMs (lanes = weight rows) beat an AVX512-BF16 GEMM
    return KERNEL_MAX_ROWS_AVX512_BF16[mode]


def kernel_name() -> str:
    """The kernel variant in use, as GPTJ_ISA names it: 'amx', 'avx512vnni', 'avx512', 'avxvnni',
    'avx2', or 'none' (torch's ops)."""
    return kernels.active_variant()


def prefill_gemm_dtype() -> torch.dtype:
    """The dtype dequantize + GEMM multiplies in: bf16 where native, else float32."""
    return torch.bfloat16 if native_bf16() else torch.float32


_workspace = threading.local()
_packing = threading.Lock()  # a layer put in panels on first use (built before the kernels were) is packed once


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
        # the same weights in the kernels' 16-row panels (gemv.h), where the kernels in use read them;
        # while it is set, qweight (int4: and scales, mins) is None
        self.register_buffer("panels", None, persistent=False)
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
        mod._to_kernel_layout()
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
        mod._to_kernel_layout()
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._int4pack = None
        self._to_rows()  # load into the portable buffers, then back to the kernels' layout
        keys = [prefix + name for name in ("qweight", "scales", "zeros")]
        if self.mode == "int4" and prefix + "mins" not in state_dict and all(k in state_dict for k in keys):
            # an older int4 checkpoint: convert (state_dict is load_state_dict's own copy)
            q, scales, zeros = (state_dict.pop(k) for k in keys)
            for name, t in convert_int4_zeros(q, scales, zeros, self.group_size).items():
                state_dict[prefix + name] = t
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._to_kernel_layout()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.panels is not None:  # the portable buffers, always
            for name, t in self.portable_buffers().items():
                destination[prefix + name] = t

    def _panels_wanted(self, lib: kernels.Library | None) -> bool:
        """Whether the kernels in use read this layer in panels: int4 always, int8 with VNNI and
        without AMX."""
        return lib is not None and (self.mode == "int4" or lib.int8_panels)

    def _to_kernel_layout(self) -> bool:
        """Puts the weights in panels where the kernels in use read them, back in rows where they do
        not; whether they are in panels now."""
        lib = native_kernel()
        want = self._panels_wanted(lib)
        if want == (self.panels is not None):
            return want
        if not want:
            self._to_rows()
            return False
        assert lib is not None
        if self.qweight.device.type != "cpu" or not self.kernel_fits():
            return False
        with _packing:
            if self.panels is None:
                n, k, threads = self.out_features, self.in_features, torch.get_num_threads()
                if self.mode == "int4":
                    panels = huge_page_empty(lib.gq_int4_panel_bytes(n, k))
                    lib.gq_pack_int4_panels(self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(),
                                            n, k, panels.data_ptr(), threads)  # fmt: skip
                    self.scales, self.mins = None, None
                else:
                    panels = huge_page_empty(lib.gq_int8_panel_bytes(n, k))
                    lib.gq_pack_int8_panels(self.qweight.data_ptr(), n, k, panels.data_ptr(), threads)
                self.panels, self.qweight = panels, None
        return True

    def _to_rows(self) -> bool:
        """Back to the portable buffers (torch's ops, the GPU, loading); whether it was in panels."""
        if self.panels is None:
            return False
        with _packing:
            if self.panels is not None:
                for name, t in self._unpanelled().items():
                    setattr(self, name, t)
                self.panels = None
        return True

    def _unpanelled(self) -> dict[str, Tensor]:
        """The portable buffers that the panels stand for (int8: qweight; int4: and scales, mins)."""
        n, k = self.out_features, self.in_features
        if self.mode == "int4":
            return unpanel_int4(self.panels, n, k)
        return {"qweight": unpanel_int8(self.panels, n, k)}

    def _kernel_weight(self) -> Tensor:
        """What the kernels in use read: the panels, or int8 rows."""
        if self._to_kernel_layout():
            return self.panels
        if self.mode == "int4":
            raise RuntimeError("this int4 layer does not fit the kernels")
        return self.qweight

    def portable_buffers(self) -> dict[str, Tensor]:
        """``qweight``, ``scales`` (and ``mins``) in the portable format, whatever the layout held."""
        if self.panels is not None:
            return {"scales": self.scales, **self._unpanelled()}
        names = ("qweight", "scales", "mins") if self.mode == "int4" else ("qweight", "scales")
        return {name: getattr(self, name) for name in names}

    def kernel_weights(self) -> tuple[Tensor, Tensor | None] | None:
        """What the C++ kernels read, int8 (rows or panels, scales) or int4 (panels, None); None where
        they cannot take this layer (its shape, or not on the CPU)."""
        if not self.kernel_fits() or (self.mode == "int4" and not self._to_kernel_layout()):
            return None
        weight = self._kernel_weight()
        return (weight, self.scales) if weight.device.type == "cpu" else None  # int4 in panels: scales None

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] weight this layer stands for."""
        return dequantize_weight(self.portable_buffers(), dtype)

    # -- forward

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.forward_gpu(x)
        rows = x.numel() // self.in_features if self.in_features else 0
        return self.forward_decode(x) if rows <= kernel_max_rows(self.mode) else self.forward_prefill(x)

    def forward_gpu(self, x: Tensor) -> Tensor:
        """On CUDA: torch's int8 GEMV for a few rows where the device has it, else this layer's
        weight dequantized for the call (one layer's full-precision weight exists at a time)."""
        x2 = x.reshape(-1, self.in_features)
        self._to_rows()  # panels moved here with the module: the GPU reads the portable buffers
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        xt = x2.to(dt).contiguous()
        y = None
        if (
            self.mode == "int8"
            and x2.shape[0] <= TORCH_OP_MAX_ROWS
            and _GPU_INT8_MM.get(x.device.type, True)
        ):
            try:
                y = torch._weight_int8pack_mm(xt, self.qweight, self.scales.to(dt))
            except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
                _GPU_INT8_MM[x.device.type] = False
        if y is None:
            y = F.linear(xt, dequantize_weight(self.portable_buffers(), dt))
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def kernel_fits(self) -> bool:
        """Whether the C++ kernels take this layer (in_features a multiple of 32, int4 groups of 32)."""
        if self.panels is not None:
            return True
        ok = self.in_features % _KB == 0 and self.qweight.is_contiguous() and self.scales.is_contiguous()
        return ok and (self.mode == "int8" or (self.group_size == GROUP_SIZE and self.mins.is_contiguous()))

    def forward_decode(self, x: Tensor) -> Tensor:
        """The GEMV path: our kernel, or torch's int8/int4 op without it."""
        x2 = x.reshape(-1, self.in_features)
        lib = native_kernel()
        if lib is not None and self.kernel_fits():
            y = self._native_gemv(lib, x2)
        elif self.mode == "int8":
            # bf16 activations: the op is 2x (M=1) to 20x (M=64) slower with float32 ones here,
            # but its bf16 kernel gives garbage (or crashes) where in_features % 16 != 0
            dt = torch.bfloat16 if self.in_features % 16 == 0 else torch.float32
            self._to_rows()
            y = torch._weight_int8pack_mm(x2.to(dt).contiguous(), self.qweight, self.scales.to(dt))
            if self.bias is not None:
                y = y.float() + self.bias
        else:
            y = self._torch_int4_gemv(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _native_gemv(self, lib: kernels.Library, x2: Tensor) -> Tensor:
        m, k, n = x2.shape[0], self.in_features, self.out_features
        xf = x2.to(torch.float32).contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        scratch = _scratch(lib.linear_scratch_bytes(m, k))
        threads = torch.get_num_threads()
        if self.mode == "int8":
            lib.gq_linear_int8(
                self._kernel_weight().data_ptr(), self.scales.data_ptr(), _ptr(self.bias), n, k,
                xf.data_ptr(), m, y.data_ptr(), scratch, threads,
            )  # fmt: skip
        else:
            lib.gq_linear_int4(self._kernel_weight().data_ptr(), _ptr(self.bias), n, k, xf.data_ptr(), m, y.data_ptr(), scratch,
                               threads)  # fmt: skip
        return y

    def _torch_int4_gemv(self, x2: Tensor) -> Tensor:
        g = self.group_size
        if g not in (32, 64, 128, 256) or self.out_features % 16:
            return self._gemm(x2)  # shapes the op does not take
        if self._int4pack is None:
            # torch's layout: its own packing, and w = (q - 8) * s + zero per [group, row]
            b = self.portable_buffers()
            q = b["qweight"].view(self.out_features, -1, g // 2)
            vals = torch.cat([q & 15, q >> 4], dim=-1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                vals.reshape(self.out_features, self.in_features).to(torch.int32), 1
            )
            s = b["scales"].float()
            zero = b["mins"].float() + 8.0 * s
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
        dt = prefill_gemm_dtype()
        n, k = self.out_features, self.in_features
        xc = x2.to(dt).contiguous()
        step = max(1, min(n, _CHUNK_BYTES // (k * dt.itemsize)))
        buf = _buffer(step * k, dt)
        lib = native_kernel() if self.kernel_fits() else None
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

    def _dequant_rows(self, lib: kernels.Library | None, n0: int, n1: int, out: Tensor) -> None:
        bf16 = int(out.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        if lib is not None and out.dtype in (torch.float32, torch.bfloat16):
            k = self.in_features
            if self.mode == "int8":  # the layout the GEMV reads, rows or panels
                lib.gq_dequant_int8(
                    self._kernel_weight().data_ptr(), self.scales.data_ptr(), n0, n1, k, out.data_ptr(), bf16, threads
                )
            else:
                lib.gq_dequant_int4(self._kernel_weight().data_ptr(), n0, n1, k, out.data_ptr(), bf16, threads)
            return
        self._to_rows()  # torch's ops serve, not the kernels: back to the portable buffers, once
        part = {name: t[n0:n1] for name, t in self.portable_buffers().items()}
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


def to_portable_layout(model: nn.Module) -> None:
    """Moves every quantized layer of `model` out of the kernels' panels into the portable buffers,
    a layer at a time, so that a model about to be saved holds one copy of its weights:
    state_dict() would copy every layer out of its panels while all the panels are still held."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m._to_rows()


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
