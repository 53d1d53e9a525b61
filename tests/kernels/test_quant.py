"""Weight-only quantization: accuracy against float, decode vs prefill kernels, the torch-op
fallback, safetensors round trips, older int4 checkpoints, the bundled model's Q4_1 weights and
quantize_model. The kernels' exact arithmetic, per variant: tests/kernels/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import gptj
from gptj import kernels, quant
from gptj.quant import BF16Linear, QuantizedLinear, quantize_linear, quantize_model, quantize_weight


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


@pytest.fixture(params=["native", "torch"])
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test with our kernel (the default variant) and with the torch-op fallback."""
    if request.param == "native" and quant.native_kernel() is None:
        pytest.skip("no native kernel on this machine")
    with kernels.use(kernels.active_variant() if request.param == "native" else kernels.NONE):
        yield request.param


@pytest.mark.parametrize("mode, w_tol, y_tol", [("int8", 0.01, 0.02), ("int4", 0.12, 0.12)])
def test_accuracy_against_float(mode: str, w_tol: float, y_tol: float, kernel: str) -> None:
    lin = linear(512, 264)  # 264 rows: not a multiple of the kernel's row tile
    q = quantize_linear(lin, mode)
    assert isinstance(q, QuantizedLinear)
    assert rel(q.dequantize(), lin.weight) < w_tol
    x = torch.randn(3, 512)
    with torch.no_grad():
        ref = lin(x)
    for y in (q.forward_decode(x), q.forward_prefill(x), q(x)):
        assert y.shape == (3, 264) and y.dtype == torch.float32
        assert rel(y, ref) < y_tol
        # against the exact dequantized weight only the activation / bf16 rounding remains
        assert rel(y, F.linear(x, q.dequantize(), q.bias)) < 0.015


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 33])
def test_decode_and_prefill_agree(mode: str, rows: int, kernel: str) -> None:
    q = quantize_linear(linear(1024, 136), mode)
    x = torch.randn(rows, 1024)
    assert rel(q.forward_decode(x), q.forward_prefill(x)) < 0.015


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_native_kernel_matches_torch_ops(mode: str) -> None:
    if quant.native_kernel() is None:
        pytest.skip("no native kernel on this machine")
    q = quantize_linear(linear(2048, 528), mode)  # a multiple of 16: torch int4 op takes it
    x = torch.randn(6, 2048)
    ours = q.forward_decode(x)
    with kernels.use(kernels.NONE):
        assert rel(ours, q.forward_decode(x)) < 0.015


@pytest.mark.parametrize("variant", [v for v in kernels.available_variants() if v != kernels.NONE])
def test_each_variant_against_float(variant: str) -> None:
    """Each variant this CPU runs (not only the one it would pick), at in_features that leave
    partial vectors: 96 and 576 (SmolLM2) are not multiples of 64 or 128."""
    with kernels.use(variant):
        for k in (96, 576, 1024):
            for mode in ("int8", "int4"):  # int8: activation blocks of 128 and a shorter last one
                q = quantize_linear(linear(k, 70), mode)
                assert q.kernel_fits()
                for rows in (1, 5):
                    x = torch.randn(rows, k)
                    exact = F.linear(x, q.dequantize(), q.bias)
                    assert rel(q.forward_decode(x), exact) < 0.015
                    assert rel(q.forward_prefill(x), exact) < 0.015


def test_chunked_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "_CHUNK_BYTES", 1024 * 256 * 2)  # 256 bf16 rows of 1024 per chunk
    for mode in ("int8", "int4"):
        q = quantize_linear(linear(1024, 1000), mode)
        x = torch.randn(40, 1024)
        assert rel(q.forward_prefill(x), F.linear(x, q.dequantize(), q.bias)) < 0.015


def test_dispatch_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize_linear(linear(256, 64), "int8")
    calls: list[str] = []
    monkeypatch.setattr(q, "forward_decode", lambda x: calls.append("decode") or x)
    monkeypatch.setattr(q, "forward_prefill", lambda x: calls.append("prefill") or x)
    monkeypatch.setenv("GPTJ_QUANT_DECODE_MAX_ROWS", "8")
    limit = quant.kernel_max_rows("int8")
    assert limit == 8
    q(torch.randn(1, limit, 256))
    q(torch.randn(limit + 1, 256))
    assert calls == ["decode", "prefill"]


@pytest.mark.parametrize("rows", [2, 3, 12, 16, 17, 29, 32, 33, 50])
def test_int8_kernel_batch_equals_its_rows_one_at_a_time(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches take another loop than one row (AMX tiles where the CPU has them: 16 weight rows
    # by up to 2 x 16 activation rows, activation blocks of 128 and a last 32 at in 576), and
    # give the same bits: a request's tokens must not depend on who shares its batch
    monkeypatch.setenv("GPTJ_QUANT_DECODE_MAX_ROWS", "64")
    q = quantize_linear(linear(576, 48), "int8")
    x = torch.randn(rows, 576)
    batch = q.forward_decode(x)
    alone = torch.cat([q.forward_decode(x[i : i + 1]) for i in range(rows)])
    assert torch.equal(batch, alone)
    assert rel(batch, F.linear(x, q.dequantize(), q.bias)) < 0.015


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_smollm2_width_uses_the_kernel(mode: str) -> None:
    # in_features 576 (SmolLM2): not a multiple of 128, a multiple of 32, which the kernel
    # takes; 7 output rows leave a partial tile
    lin = linear(576, 7)
    q = quantize_linear(lin, mode)
    assert q.kernel_fits()  # the shape is one the kernels take, whether or not they are built here
    if mode == "int4":
        assert q.group_size == 32
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        ref = lin(x)
    assert rel(q(x), ref) < (0.02 if mode == "int8" else 0.12)
    assert rel(q.forward_prefill(x), q.forward_decode(x)) < 0.015


def test_shapes_the_kernel_does_not_take_use_torch_ops() -> None:
    # int8 at in_features 200 (not a multiple of 32); int4 groups of 128: the torch ops serve
    w, b = torch.randn(40, 200) * 0.02, torch.randn(40)
    layers = [QuantizedLinear.from_weight(w, b, "int8"),
              QuantizedLinear.from_weight(torch.randn(48, 256) * 0.02, None, "int4", group_size=128)]  # fmt: skip
    assert layers[1].group_size == 128
    for q in layers:
        assert not q.kernel_fits()
        x = torch.randn(3, q.in_features)
        exact = F.linear(x, q.dequantize(), q.bias)
        assert rel(q.forward_decode(x), exact) < 0.015
        assert rel(q.forward_prefill(x), exact) < 0.015
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_weight(w, "int4")


def test_int8_torch_op_at_any_width() -> None:
    """torch's int8 GEMV with bf16 activations gives inf (or crashes) where in_features % 16
    != 0; the fallback gives it float32 ones there."""
    with kernels.use(kernels.NONE):
        for k in (200, 208):
            q = quantize_linear(linear(k, 40), "int8")
            x = torch.randn(3, k)
            assert rel(q.forward_decode(x), F.linear(x, q.dequantize(), q.bias)) < 0.015


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bias_handling(mode: str, kernel: str) -> None:
    with_bias = linear(256, 32, bias=True)
    without = linear(256, 32, bias=False)
    qb, qn = quantize_linear(with_bias, mode), quantize_linear(without, mode)
    assert qb.bias is not None and qb.bias.dtype == torch.float32
    assert torch.equal(qb.bias, with_bias.bias.detach())
    assert qn.bias is None and "bias" not in qn.state_dict()
    x = torch.randn(4, 256)
    for fwd in ("forward_decode", "forward_prefill"):
        y = getattr(qb, fwd)(x)
        assert rel(y, F.linear(x, qb.dequantize(), qb.bias)) < 0.015
        assert rel(getattr(qn, fwd)(x), F.linear(x, qn.dequantize())) < 0.015


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_input_gives_bf16(mode: str, kernel: str) -> None:
    q = quantize_linear(linear(512, 96), mode)
    x = torch.randn(2, 3, 512, dtype=torch.bfloat16)
    exact = F.linear(x.float(), q.dequantize(), q.bias)
    for y in (q.forward_decode(x), q.forward_prefill(x), q(x)):
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 96)
        assert rel(y, exact) < 0.02


def test_quantize_weight_from_bf16_tensor() -> None:
    w = torch.randn(96, 256) * 0.02
    for mode in ("int8", "int4"):
        a = quantize_weight(w, mode)
        b = quantize_weight(w.to(torch.bfloat16), mode)
        assert a.keys() == b.keys()
        assert rel(quant.dequantize_weight(b), w) < (0.01 if mode == "int8" else 0.12)
    assert quantize_weight(w, "int4")["scales"].dtype == torch.float16
    with pytest.raises(ValueError):
        quantize_weight(w, "int3")


def test_int4_layout() -> None:
    """The documented format: w = s * q + m per group of 32, byte j of a group holds values j
    and j + 16; s = (max - min) / 15, m = min, no zero forced into the range."""
    w = torch.zeros(1, 64)
    w[0, :32] = (torch.arange(32) * 7 % 16) * 0.5 + 3.0  # exact in 4 bits with s=0.5, m=3
    w[0, 32:] = torch.arange(32) % 16 - 20.0  # s=1, m=-20
    b = quantize_weight(w, "int4")
    assert set(b) == {"qweight", "scales", "mins"}
    assert b["qweight"].shape == (1, 32) and b["scales"].shape == b["mins"].shape == (1, 2)
    assert b["scales"].dtype == b["mins"].dtype == torch.float16
    assert b["scales"][0].tolist() == [0.5, 1.0] and b["mins"][0].tolist() == [3.0, -20.0]
    for g in range(2):
        packed = b["qweight"][0, 16 * g : 16 * g + 16]
        vals = torch.cat([packed & 15, packed >> 4]).float()
        assert torch.equal(vals * b["scales"][0, g].float() + b["mins"][0, g].float(), w[0, 32 * g : 32 * g + 32])
    assert torch.equal(quant.dequantize_weight(b), w)


@pytest.mark.skipif(quant.native_kernel() is None, reason="no kernel variant runs on this machine")
@pytest.mark.parametrize("n, k", [(70, 576), (13, 96), (5, 32), (33, 160), (16, 512)])
def test_int4_panels_hold_the_portable_buffers(n: int, k: int) -> None:
    """The kernels' int4 panels (rows padded to 16, a group after another) give back the portable
    buffers exactly: in state_dict, dequantize and the rows that torch's ops and the GPU read; a
    layer taken back to rows gets panels again, with the same bits, in every variant."""
    buffers = quantize_weight(torch.randn(n, k), "int4")
    q = QuantizedLinear.from_state(dict(buffers))
    assert q.panels is not None and q.qweight is None and q.scales is None
    assert q.panels.numel() == (n + 15) // 16 * (k // 32) * 320
    for name, t in q.portable_buffers().items():
        assert torch.equal(t, buffers[name]), name
    assert all(torch.equal(t, buffers[name]) for name, t in q.state_dict().items())
    assert torch.equal(q.dequantize(), quant.dequantize_weight(buffers))
    x = torch.randn(3, k)
    y = q(x)
    assert q._to_rows() and q.panels is None
    assert all(torch.equal(getattr(q, name), t) for name, t in buffers.items())
    for variant in kernels.available_variants():
        if variant != kernels.NONE:
            with kernels.use(variant):
                assert torch.equal(q(x), y) and q.panels is not None, variant


PANEL_VARIANTS = [v for v in kernels.available_variants() if v in ("avx512vnni", "avxvnni")]


@pytest.mark.skipif(not PANEL_VARIANTS, reason="no variant here reads int8 panels (VNNI without AMX)")
@pytest.mark.parametrize("n, k", [(70, 576), (13, 96), (16, 32), (33, 160)])
def test_int8_panels_hold_the_portable_buffers(n: int, k: int) -> None:
    """Where the kernels read 16-row panels (rows padded to 16), the layer holds them and gives back
    the portable buffers exactly; a variant that reads rows (or torch) gets rows back, with the
    same bits wherever the kernels serve."""
    buffers = quantize_weight(torch.randn(n, k), "int8")
    x = torch.randn(5, k)
    with kernels.use(PANEL_VARIANTS[0]):
        q = QuantizedLinear.from_state(dict(buffers))
        assert q.panels is not None and q.qweight is None
        assert q.panels.numel() == (n + 15) // 16 * 16 * k
        assert all(torch.equal(t, buffers[name]) for name, t in q.portable_buffers().items())
        assert all(torch.equal(t, buffers[name]) for name, t in q.state_dict().items())
        assert torch.equal(q.dequantize(), quant.dequantize_weight(buffers))
        y = q(x)
    with kernels.use("avx2"):
        assert torch.equal(q(x), y)
        assert q.panels is None and torch.equal(q.qweight, buffers["qweight"])
    with kernels.use(PANEL_VARIANTS[-1]):
        assert torch.equal(q(x), y) and q.panels is not None


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("bias", [True, False])
def test_safetensors_round_trip(mode: str, bias: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = quantize_linear(linear(384, 48, bias=bias), mode)
    path = tmp_path / "layer.safetensors"
    save_file({f"layer.{k}": v for k, v in q.state_dict().items()}, str(path))
    x = torch.randn(3, 384)
    loaded = load_file(str(path))
    # 1. over the loaded tensors: int8 with no copy, int4 in panels where the kernels serve
    r = QuantizedLinear.from_state(loaded, prefix="layer.")
    assert (r.mode, r.in_features, r.out_features, r.group_size) == (q.mode, 384, 48, q.group_size)
    lib = quant.native_kernel()
    if lib is None or (mode == "int8" and not lib.int8_panels):
        assert r.qweight.data_ptr() == loaded["layer.qweight"].data_ptr()
    else:  # the kernels' layout: int4 panels, int8 panels (VNNI without AMX)
        assert r.panels is not None and r.qweight is None
    assert all(torch.equal(t, loaded[f"layer.{k}"]) for k, t in r.portable_buffers().items())
    assert torch.equal(r(x), q(x))
    # 2. an empty module filled by load_state_dict
    e = QuantizedLinear.empty(384, 48, mode, bias=bias)
    e.load_state_dict({k.removeprefix("layer."): v for k, v in loaded.items()})
    assert torch.equal(e(x), q(x))
    assert set(e.state_dict()) == {"qweight", "scales"} | ({"mins"} if mode == "int4" else set()) | (
        {"bias"} if bias else set()
    )


def old_int4(w: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """The int4 buffers of the older format: uint8 zero points, w = s * (q - z), groups of g."""
    n, k = w.shape
    part = w.float().reshape(n, k // g, g)
    lo, hi = part.amin(dim=-1).clamp(max=0.0), part.amax(dim=-1).clamp(min=0.0)
    s16 = ((hi - lo) / 15.0).clamp(min=1e-7).to(torch.float16)
    z = torch.round(-lo / s16.float()).clamp_(0, 15)
    qi = torch.round(part / s16.float()[..., None] + z[..., None]).clamp_(0, 15).to(torch.uint8)
    q = (qi[..., : g // 2] | (qi[..., g // 2 :] << 4)).reshape(n, k // 2)
    return {"qweight": q, "scales": s16, "zeros": z.to(torch.uint8)}


@pytest.mark.parametrize("g", [128, 64, 32])
def test_older_int4_buffers_are_converted(g: int) -> None:
    torch.manual_seed(0)
    w, bias = torch.randn(36, 384) * 0.02, torch.randn(36)
    old = old_int4(w, g)
    expected = quant.dequantize_weight(old)  # s * (q - z)
    step = old["scales"].float().repeat_interleave(g, dim=1)
    layers = [QuantizedLinear.from_state({**old, "bias": bias})]
    layers.append(QuantizedLinear.empty(384, 36, "int4"))
    layers[1].load_state_dict({**old, "bias": bias})
    for q in layers:
        assert q.group_size == 32 and set(q.state_dict()) == {"qweight", "scales", "mins", "bias"}
        assert q.kernel_fits()  # converted to groups of 32, which the kernels take
        # m = -s * z is rounded to fp16: off by at most half its last place, 15 * s * 2^-11
        assert ((q.dequantize() - expected).abs() <= step * 15 / 2048).all()
        x = torch.randn(3, 384)
        assert rel(q(x), F.linear(x, expected, bias)) < 0.015


def test_older_int4_checkpoint_loads(tmp_path: Path) -> None:
    """A `gptj quantize --bits 4` folder written before the scale+min format still loads."""
    from gptj.loading import load_model
    from gptj.loading.quantized import write_quantized
    from gptj.loading.random_checkpoint import make_random_checkpoint

    src = make_random_checkpoint(tmp_path / "src", "tiny", "safetensors", vocab_size=512, n_positions=64)
    dst = write_quantized(str(src), str(tmp_path / "int4"), 4)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 32
    state = load_file(str(dst / "model.safetensors"))
    ids = [1, 5, 9, 200, 3]
    new = gptj.load(str(dst)).logits(ids)
    # rewrite it as the older format wrote it (groups of 64 here: in_features are 64 and 256)
    expected = {}
    for key in [k for k in state if k.endswith(".qweight") and state[k].dtype == torch.uint8]:
        prefix = key.removesuffix("qweight")
        w = quant.dequantize_weight({n: state[prefix + n] for n in ("qweight", "scales", "mins")})
        del state[prefix + "mins"]
        old = old_int4(w, 64)
        state.update({prefix + n: t for n, t in old.items()})
        expected[prefix.removesuffix(".")] = quant.dequantize_weight(old)
    save_file(state, str(dst / "model.safetensors"))
    module, _, info = load_model(str(dst))
    assert info.quantization == "int4"
    layers = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers.keys() == expected.keys()
    for name, layer in layers.items():
        assert layer.group_size == 32 and hasattr(layer, "mins")
        assert (layer.dequantize() - expected[name]).abs().max() < 1e-3
    assert cosine(gptj.load(str(dst)).logits(ids), new) > 0.99


def test_bundled_q4_1_weights_requantize_exactly() -> None:
    """The bundled GGUF's Q4_1 weights (groups of 32, fp16 d and m: w = d * q + m) are in our
    int4 format: quantizing them gives them back."""
    from gguf import GGMLQuantizationType

    from gptj.loading.gguf import _open, bundled_gguf_path, dequantize

    reader = _open(bundled_gguf_path())
    tensors = [t for t in reader.tensors if t.name.startswith(("blk.0.", "blk.29.")) and len(t.shape) == 2]
    assert len(tensors) == 14 and all(t.tensor_type == GGMLQuantizationType.Q4_1 for t in tensors)
    for t in tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        w = dequantize(torch.from_numpy(t.data).reshape(-1).view(torch.uint8), t.tensor_type, shape)
        assert torch.equal(quant.dequantize_weight(quantize_weight(w, "int4")), w), t.name


def test_from_state_rejects_wrong_tensors() -> None:
    with pytest.raises(ValueError):
        QuantizedLinear.from_state({"qweight": torch.zeros(4, 8), "scales": torch.zeros(4)})
    with pytest.raises(ValueError):
        QuantizedLinear.from_state({"qweight": torch.zeros(4, 8, dtype=torch.int8), "scales": torch.zeros(3)})


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256, bias=False)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(256)
        self.lm_head = nn.Linear(256, 300, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("mode, min_cos", [("int8", 0.99), ("int4", 0.95), ("bf16", 0.99)])
def test_quantize_model(mode: str, min_cos: float) -> None:
    model = TinyMLP().eval()
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        ref = model(x)
    assert quantize_model(model, mode) is model
    kinds = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    assert len(kinds) == 5
    want = BF16Linear if mode == "bf16" else QuantizedLinear
    assert all(isinstance(m, want) for m in kinds)
    if mode == "bf16":
        assert all(m.weight.dtype == torch.bfloat16 for m in kinds)
    with torch.no_grad():
        assert cosine(model(x), ref) > min_cos
        assert model(x).dtype == torch.float32
        assert cosine(model(x[:, :1]), ref[:, :1]) > min_cos  # decode-sized input


def test_quantize_model_skip_and_state_dict(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = quantize_model(TinyMLP(), "int8", skip=lambda name: name == "lm_head")
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.blocks[0][0], QuantizedLinear)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    state = load_file(str(path))
    fresh = TinyMLP()
    for name in [n for n, _ in fresh.named_modules() if f"{n}.qweight" in state]:
        parent, _, attr = name.rpartition(".")
        setattr(fresh.get_submodule(parent), attr, QuantizedLinear.from_state(state, prefix=name + "."))
    fresh.load_state_dict(state)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_quantize_linear_leaves_tied_weight_alone() -> None:
    emb = nn.Embedding(300, 256)
    head = nn.Linear(256, 300, bias=False)
    head.weight = emb.weight
    before = emb.weight.detach().clone()
    for mode in ("int8", "int4", "bf16"):
        quantize_linear(head, mode)
    assert torch.equal(emb.weight, before) and emb.weight.dtype == torch.float32


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        quantize_model(TinyMLP(), "int2")
    with pytest.raises(ValueError):
        QuantizedLinear(64, 64, "fp8")
