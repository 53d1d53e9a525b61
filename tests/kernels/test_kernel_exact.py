"""Every kernel variant this CPU runs gives the bits of one reference of the same integer math,
written in plain torch (kernel_reference.py): int8 and int4, one row, a few, and batches (the
AMX tiles where the variant has them), so the variants (AVX2 maddubs, VNNI dpbusd, AMX) also
agree with each other, and a row's result does not depend on the rows that share its call.
Where a CPU has no native bf16, prefill takes the kernels too, so a prompt's rows get the bits
they would get one at a time. The other prefill path (dequantize + torch's GEMM) gives the same
bits in every variant that multiplies in the same dtype, "none" included."""

from __future__ import annotations

import pytest
import torch
from kernel_reference import int4_linear, int8_linear, quantize_activations

from gptj import kernels, quant
from gptj.quant import QuantizedLinear, quantize_weight

VARIANTS = [v for v in kernels.available_variants() if v != kernels.NONE]
pytestmark = pytest.mark.skipif(not VARIANTS, reason="no kernel variant runs on this machine")

# (out, in): SmolLM2's 576-wide layers (blocks of 128 and a last 64; an odd number of int4
# groups), a GPT-J-sized square, and widths that leave partial vectors and panels; 112 and 80
# rows: 7 and 5 panels, AMX's units of 4 panels (up to 16 activation rows) with 3 and 1 left
SHAPES = [(1536, 576), (576, 1536), (4096, 4096), (70, 96), (112, 256), (80, 256)]


def layer(n: int, k: int, mode: str, seed: int = 0) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[: n // 7, : k // 3] *= 10  # rows and blocks of different scales
    bias = torch.randn(n, generator=g) if n % 2 == 0 else None
    return QuantizedLinear.from_weight(w, bias, mode)


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 5] = 30.0  # an outlier, as real activations have
    x[m // 2, 32:64] = 0.0  # an all-zero block
    return x


def reference(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    b = q.portable_buffers()  # (the layer may hold the kernels' layout: int8 or int4 panels)
    if q.mode == "int8":
        return int8_linear(x, b["qweight"], b["scales"], q.bias)
    return int4_linear(x, b["qweight"], b["scales"], b["mins"], q.bias)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_equals_the_reference(variant: str, n: int, k: int, mode: str) -> None:
    q = layer(n, k, mode)
    # 6, 7, 9, 12, 17, 29, 40: int4's few-row blocks (AVX2: of 4 rows, then one of the 1 to 3
    # left; 256-bit VNNI: of 2, then 1; AVX-512: 4, 2, 1; AVX-512 VNNI, AMX too: 12, then one of
    # the rest: 12 and 13 rows), AMX's groups of 16, a pass of 32, the
    # many-row loop (lanes = activation rows; from 7 rows with AVX2 alone) with its last vector
    # part padding (7, 12, 29) or its last rows in the per-row loop (9, 17, 40);
    # 70 and 130: the GEMMs' panels (lanes = weight rows; int8 from 64 rows, int4 from 64 or,
    # with AVX-512 VNNI, 72), with a last partial register block; 13: the int8 panels' blocks of
    # rows shared evenly (AVX-512 VNNI: 4 + 4 + 5, blocks of fewer rows than the widest but one)
    rows = (1, 3) if n * k > 4e6 else (1, 3, 6, 7, 9, 12, 13, 17, 29, 40, 70, 130)
    with kernels.use(variant):
        for m in rows:
            x = activations(m, k)
            got = q.forward_decode(x)
            assert torch.equal(got, reference(q, x)), f"{variant} {mode} {n}x{k}, {m} rows"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_wide_prompt_chunk_equals_the_reference(variant: str, mode: str) -> None:
    """The int4 GEMM unpacks 128 groups of a panel at a time and meets the activations in blocks
    of rows (2 MB of them): 131 groups (a last chunk of 3) and 520 rows (two blocks) keep the bits.
    AMX walks K in chunks of 4 MB of activations, its float sums kept in y between them: at 16384
    inputs 520 rows take three chunks (4192 is not a multiple of 64, which AMX leaves to VNNI).
    int4 takes AMX from 48 rows at 4096 inputs: units of two panels and a last one of one (40 and 48 outputs,
    the last partial), blocks of rows of 1 MB (at 4192 inputs 192 + 192 + 136 rows, which ends in 8
    rows on one A tile), and 70 rows (32 + 32 + 6)."""
    with kernels.use(variant):
        for n, k in ((40, 4192), (48, 16384)):
            q = layer(n, k, mode)
            for m in (70, 520):
                x = activations(m, k)
                assert torch.equal(q.forward_decode(x), reference(q, x)), f"{variant} {mode} {n}x{k}, {m} rows"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_equals_its_rows_one_at_a_time(variant: str, mode: str) -> None:
    """A request's tokens must not depend on who shares its batch: int8 batches take another
    loop than one row (AMX tiles in the amx variant), int4 ones blocks of several rows."""
    q = layer(1536, 576, mode)
    x = activations(33, 576)
    with kernels.use(variant):
        batch = q.forward_decode(x)
        alone = torch.cat([q.forward_decode(x[i : i + 1]) for i in range(x.shape[0])])
    assert torch.equal(batch, alone)


def test_variants_agree_with_each_other() -> None:
    """What the tests above imply, said directly: every pair of variants gives the same bits."""
    q8, q4 = layer(576, 1536, "int8"), layer(576, 1536, "int4")
    x = activations(5, 1536)
    results = {}
    for variant in VARIANTS:
        with kernels.use(variant):
            results[variant] = (q8.forward_decode(x), q4.forward_decode(x))
    first = VARIANTS[0]
    for variant, (y8, y4) in results.items():
        assert torch.equal(y8, results[first][0]) and torch.equal(y4, results[first][1]), (first, variant)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantize_gemm_is_the_same_in_every_variant(mode: str) -> None:
    """Dequantize + GEMM: the weights dequantize to what quant.dequantize_weight gives in every
    variant, and torch multiplies them in bf16 where bf16 is native for the variant, float32
    elsewhere: the same bits as without the kernels, per GEMM dtype."""
    q = layer(1536, 576, mode)
    x = activations(40, 576)
    for variant in VARIANTS:
        with kernels.use(variant):
            dt = quant.prefill_gemm_dtype()
            got = q.forward_prefill(x)
        expected = torch.nn.functional.linear(x.to(dt), q.dequantize(dt)).float()
        if q.bias is not None:
            expected += q.bias
        assert torch.equal(got, expected), variant


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_on_the_kernels_is_decode_bit_for_bit(mode: str) -> None:
    """Where bf16 is emulated (AVX2 variants stand for such CPUs), a float32 GEMM is slower than
    the integer kernels at any batch size, and on AVX512-VNNI without AMX their GEMMs beat a
    bf16 one: a long prompt takes the kernels there, and its 600 rows give the bits each row
    gets alone, as in decode."""
    q = layer(256, 576, mode)
    x = activations(600, 576)
    ran = 0
    for variant in VARIANTS:
        with kernels.use(variant):
            if quant.kernel_max_rows(mode) < 600:
                assert quant.native_bf16()
                continue
            ran += 1
            batch = q(x)
            alone = torch.cat([q(x[i : i + 1]) for i in range(0, 600, 37)])
            assert torch.equal(batch[::37], alone), variant
            assert torch.equal(batch, reference(q, x)), variant
    if not ran:
        pytest.skip("every variant here dequantizes long prompts for a bf16 GEMM")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantizer_gives_the_torch_bytes(variant: str, mode: str) -> None:
    """Loading quantizes with the kernels where they run: the bytes of quantize_weight's torch code."""
    torch.manual_seed(1)
    w = torch.randn(70, 576) * 0.02
    w[0] = 0  # an all-zero row / group
    w[1, :64] = 0
    w[2, 3] = 1.0  # an outlier
    w[3, :32] = 0.5  # a constant group
    w[4, :32] = w[4, :32].abs() + 0.1  # groups that hold no zero
    w[4, 32:64] = -w[4, 32:64].abs() - 0.1
    for src in (w, w.to(torch.bfloat16)):
        with kernels.use(variant):
            ours = quantize_weight(src, mode)
        with kernels.use(kernels.NONE):
            ref = quantize_weight(src, mode)
        assert ours.keys() == ref.keys()
        for name in ours:
            assert torch.equal(ours[name], ref[name]), name


def test_reference_activation_rounding() -> None:
    """The reference's activation quantization, checked by hand: blocks of 4 here."""
    x = torch.tensor([[1.0, -2.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]])
    xq, xs = quantize_activations(x, 4)
    assert xs[0, 0] == torch.tensor(2.0) / torch.tensor(127.0) and xs[0, 1] == 0
    # 127 / 2 = 63.5 per unit: 63.5, -127, 31.75, 15.875 round half to even
    assert xq.tolist() == [[64.0, -127.0, 32.0, 16.0, 0.0, 0.0, 0.0, 0.0]]


def test_kernel_rows_limit_follows_the_variant() -> None:
    """int8 batches of any size take AMX tiles; without native bf16 every batch takes the
    kernels, and on AVX512-VNNI without AMX too; otherwise batches past the crossover dequantize
    + GEMM in bf16."""
    flags = kernels.cpu_flags()
    for variant in VARIANTS:
        with kernels.use(variant):
            bf16 = quant.native_bf16()
            assert bf16 == (variant not in ("avx2", "avxvnni") and bool(flags & {"amx_bf16", "avx512_bf16"}))
            assert quant.prefill_gemm_dtype() == (torch.bfloat16 if bf16 else torch.float32)
            for mode in ("int8", "int4"):
                limit = quant.kernel_max_rows(mode)
                amx_int8 = variant == "amx" and mode == "int8"
                if not bf16 or amx_int8 or variant == "avx512vnni" and "amx_bf16" not in flags:
                    assert limit > 1 << 30  # (the VNNI GEMMs, and AMX int8 tiles, beat a bf16 GEMM)
                else:
                    assert 16 <= limit <= 256
