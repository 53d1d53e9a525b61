"""The C++ decode step of the Llama and GPT-J blocks (gptj/cpu_decode.py), as the model runner
(gptj/runtime/runner.py) uses it, against the torch path.

Both paths run the same GEMV kernel on the same quantized weights and differ only in float
rounding (RMSNorm sums, rotary, softmax): ~1e-6 of the logits' scale. But the kernel quantizes
its input to int8 per block, and a one-ulp difference that lands on a rounding boundary moves
one activation by a whole step, and the logits by ~1e-3 of their scale. In the tiny models here
that happens at about one step in a hundred; in the bundled 30-layer model such steps cascade:
nudging its embeddings by one ulp moves the torch path's own logits by 0.3-1.5 (of ~20). So:
tiny models compare each step from the same cache (one flipped step allowed), and the bundled
model compares greedy tokens where the choice is clear.
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gptj
from gptj import cpu_decode, kernels
from gptj.models.gptj import GPTJ, GPTJConfig
from gptj.models.llama import Llama, LlamaConfig
from gptj.quant import quantize_model
from gptj.runtime import runner
from gptj.runtime.kv_cache import KVCache

pytestmark = pytest.mark.skipif(cpu_decode.native_library() is None, reason="no native decode library here")

CONFIGS = {
    # GQA: 6 query heads on 2 kv heads, head_dim 16
    "gqa": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=160),
    # MQA, head_dim 32 (64 = 2 heads), tied embeddings
    "mqa": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                tie_word_embeddings=True),
    # MHA with head_dim (32) != hidden / heads (16)
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32, intermediate_size=128),
    # 6 query heads per kv head (two batches of heads in the kernel), head_dim 8 (no whole vector)
    "group6": dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2, intermediate_size=128),
}  # fmt: skip
TIGHT, FLIPPED = 1e-4, 3e-2  # of the logits' scale


def tiny_llama(kw: dict, mode: str, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_dict(dict(vocab_size=101, num_hidden_layers=3, max_position_embeddings=1024, rope_theta=500.0,
                                     **kw))
    model = Llama(cfg).eval()
    with torch.no_grad():  # weights big enough for errors to show; random norms
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    quantize_model(model, mode)
    model.fuse_projections()
    return model


def cache_for(model: Llama | GPTJ, rows: int, max_len: int = 40, dtype: torch.dtype = torch.float32) -> KVCache:
    cfg = model.config
    return KVCache(cfg.n_layer, rows, cfg.n_kv_heads, max_len, cfg.head_dim, dtype)


def decode(model: Llama | GPTJ, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice,
           fast: bool, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:  # fmt: skip
    monkeypatch.setenv("GPTJ_FAST_DECODE", "1" if fast else "0")
    with torch.no_grad():
        return runner.forward(model, ids, positions, cache, rows)


def compare_steps(model: Llama | GPTJ, cache: KVCache, rows: slice, steps: list[tuple[torch.Tensor, torch.Tensor]],
                  monkeypatch: pytest.MonkeyPatch, max_flipped: int = 1) -> None:  # fmt: skip
    """Runs each (ids, positions) decode step on `cache` with the torch path and on a copy with
    the fast path (the copy taken before the step: steps compare independently), and checks
    their logits and everything in the caches afterwards (at most `max_flipped` steps with an
    activation rounded the other way)."""
    flipped = 0
    for ids, positions in steps:
        fast_cache = cache_for(model, cache.n_rows, cache.max_len, cache.k.dtype)
        fast_cache.k.copy_(cache.k)
        fast_cache.v.copy_(cache.v)
        expected = decode(model, ids, positions, cache, rows, False, monkeypatch)
        got = decode(model, ids, positions, fast_cache, rows, True, monkeypatch)
        scale = expected.abs().max()
        assert scale > 1.0  # not a trivially tiny comparison
        err = ((got - expected).abs().max() / scale).item()
        if err > TIGHT:  # an activation rounded the other way (see the top)
            flipped += 1
            assert err < FLIPPED and flipped <= max_flipped, f"logits differ by {err:.1e} of their scale at {positions.tolist()}"
        tol = TIGHT if err <= TIGHT else FLIPPED
        for a, b in ((fast_cache.k, cache.k), (fast_cache.v, cache.v)):
            # a bfloat16 cache holds each value to 2^-8 of itself: both paths round it
            atol = tol * b.abs().max().item() + (2**-8 * b.abs().max().item() if b.dtype == torch.bfloat16 else 0)
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
    assert all(cache.k[:, rows][..., int(p), :].abs().max() > 0 for p in steps[-1][1].view(-1))  # it wrote


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_torch(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(CONFIGS[name], mode)
    ids = torch.randint(0, 101, (1, 14))
    cache = cache_for(model, 1)
    with torch.no_grad():  # prefill: the torch path
        model(ids[:, :6], torch.arange(6)[None], cache)
    steps = [(ids[:, i : i + 1], torch.tensor([[i]])) for i in range(6, 14)]
    compare_steps(model, cache, slice(0, 1), steps, monkeypatch)


@pytest.mark.parametrize("name", ["gqa", "group6"])
def test_long_context(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """600 positions: attention runs in parallel, each row's keys in chunks combined afterwards."""
    model = tiny_llama(CONFIGS[name], "int4", seed=2)
    ids = torch.randint(0, 101, (1, 604))
    cache = cache_for(model, 1, max_len=700)
    with torch.no_grad():
        model(ids[:, :600], torch.arange(600)[None], cache)
    steps = [(ids[:, i : i + 1], torch.tensor([[i]])) for i in range(600, 604)]
    compare_steps(model, cache, slice(0, 1), steps, monkeypatch)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batched_rows_at_different_positions(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows at positions 9, 4 and 12 in cache rows 1..3 of 5 (not starting at 0); rows 0
    and 4 hold random values that must stay as they are."""
    compare_batched_rows(tiny_llama(CONFIGS["gqa"], mode, seed=1), [9, 4, 12], 40, monkeypatch)


def compare_batched_rows(model: Llama | GPTJ, lengths: list[int], max_len: int,
                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Prompts of `lengths` prefilled into cache rows 1..3 of 5, then four batched decode steps
    compared with compare_steps; rows 0 and 4 hold random values that must stay as they are."""
    cache = cache_for(model, 5, max_len=max_len)
    torch.nn.init.normal_(cache.k)
    torch.nn.init.normal_(cache.v)
    others = cache.k[:, [0, 4]].clone(), cache.v[:, [0, 4]].clone()
    for row, n in enumerate(lengths, start=1):
        with torch.no_grad():
            model(torch.randint(0, 101, (1, n)), torch.arange(n)[None], cache, rows=slice(row, row + 1))
    ids = torch.randint(0, 101, (3, 4))
    steps = [(ids[:, i : i + 1], torch.tensor(lengths)[:, None] + i) for i in range(4)]
    compare_steps(model, cache, slice(1, 4), steps, monkeypatch)
    assert torch.equal(cache.k[:, [0, 4]], others[0]) and torch.equal(cache.v[:, [0, 4]], others[1])


def test_switch_off_uses_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(CONFIGS["gqa"], "int8")
    ran = []
    original = model.model.layers[0].forward
    model.model.layers[0].forward = lambda *a: ran.append(1) or original(*a)
    cache = cache_for(model, 1)
    decode(model, torch.tensor([[3]]), torch.tensor([[0]]), cache, slice(0, 1), True, monkeypatch)
    assert not ran  # the fast path served: the torch block did not run
    decode(model, torch.tensor([[3]]), torch.tensor([[1]]), cache, slice(0, 1), False, monkeypatch)
    assert ran


def test_what_it_does_not_serve_keeps_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float weights, a bfloat16 cache, a position past the cache, rows past the cache: False,
    and the caller runs the torch path."""
    float_model = Llama(LlamaConfig.from_dict(dict(vocab_size=50, num_hidden_layers=1, **CONFIGS["gqa"]))).eval()
    assert not cpu_decode.serves(float_model)
    model = tiny_llama(CONFIGS["gqa"], "int8")
    assert cpu_decode.serves(model)
    cfg = model.config
    bf16 = KVCache(cfg.n_layer, 1, cfg.n_kv_heads, 40, cfg.head_dim, dtype=torch.bfloat16)
    x = torch.randn(1, 1, cfg.hidden_size)
    cos = sin = torch.ones(1, 1, 1, cfg.head_dim)
    pos = torch.tensor([[0]])
    assert not cpu_decode.decode_blocks(model, x.clone(), cos, sin, pos, bf16, slice(0, 1))
    cache = cache_for(model, 1)
    assert cpu_decode.decode_blocks(model, x.clone(), cos, sin, pos, cache, slice(0, 1))
    assert not cpu_decode.decode_blocks(model, x.clone(), cos, sin, torch.tensor([[40]]), cache, slice(0, 1))
    assert not cpu_decode.decode_blocks(model, x.clone(), cos, sin, pos, cache, slice(1, 2))


@pytest.fixture(scope="module", params=["int8", "int4"])
def bundled(request: pytest.FixtureRequest) -> gptj.Model:
    model = gptj.load(quantize=request.param)
    yield model
    model.engine.shutdown(grace=0)


def test_bundled_model_greedy_tokens_match_torch(bundled: gptj.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the engine. A prompt whose greedy continuation is clear at every token (counting):
    elsewhere near-ties, which the activations' rounding decides (see the top), can part them."""
    tokens = {}
    for fast in (False, True):
        monkeypatch.setenv("GPTJ_FAST_DECODE", "1" if fast else "0")
        tokens[fast] = bundled.generate("1, 2, 3, 4, 5,", max_new_tokens=32, temperature=0, ignore_eos=True).tokens
    assert len(tokens[True]) == 32
    assert tokens[True] == tokens[False]
    assert bundled.tokenizer.decode(tokens[True]).startswith(" 6, 7, 8, 9, 10,")


def test_bundled_model_decode_perplexity_matches_torch(bundled: gptj.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token of a text decoded one by one (teacher forcing): the perplexity of the fast
    path is the torch path's, within the spread that one-ulp nudges of the embeddings give the
    torch path itself (~1.5 % here)."""
    module, cfg = bundled.engine.model, bundled.engine.model.config
    text = (Path(__file__).parents[1] / "data" / "perplexity.txt").read_text()
    ids = gptj.load_tokenizer("smollm2").encode(text)[:96]
    ppl = {}
    for fast in (False, True):
        monkeypatch.setenv("GPTJ_FAST_DECODE", "1" if fast else "0")
        cache = KVCache(cfg.n_layer, 1, cfg.n_kv_heads, 128, cfg.head_dim)
        with torch.no_grad():
            logits = torch.cat([runner.forward(module, torch.tensor([[t]]), torch.tensor([[i]]), cache)[0]
                                for i, t in enumerate(ids)])  # fmt: skip
        ppl[fast] = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert 5 < ppl[False] < 40
    assert abs(ppl[True] / ppl[False] - 1) < 0.04, ppl


def test_engine_batch_of_three(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests decoded together by the engine (rows slices, rows at their own positions):
    the fast path serves the batched steps and gives the torch path's tokens."""
    served = []
    real = cpu_decode.decode_blocks

    def recording(model, x, *args):  # noqa: ANN001, ANN002, ANN202
        ok = real(model, x, *args)
        served.append((x.shape[0], ok))
        return ok

    monkeypatch.setattr(cpu_decode, "decode_blocks", recording)
    prompts = ["1, 2, 3, 4, 5,", "10, 11, 12, 13, 14,", "2, 4, 6, 8, 10,"]
    model = gptj.load(quantize="int8", max_batch=3)
    try:
        tokens = {}
        for fast in (False, True):
            monkeypatch.setenv("GPTJ_FAST_DECODE", "1" if fast else "0")
            handles = [model.submit(p, max_new_tokens=16, temperature=0, ignore_eos=True) for p in prompts]
            tokens[fast] = [h.result().tokens for h in handles]
    finally:
        model.engine.shutdown(grace=0)
    assert tokens[True] == tokens[False]
    assert (3, True) in served  # batched steps went through the fast path
    assert model.tokenizer.decode(tokens[True][2]).startswith(" 12, 14, 16,")


# ---- GPT-J: LayerNorm with bias, parallel attention and MLP, rotary on the first rotary_dim
# dims in adjacent pairs, gelu_new, biased fc_in/fc_out; q/k/v separate (6B) or fused
GPTJ_CONFIGS = {
    "hd32-rot16": dict(n_embd=128, n_head=4, rotary_dim=16),
    "hd256-rot64": dict(n_embd=512, n_head=2, rotary_dim=64, n_inner=256),  # GPT-J-6B's head size
    "hd24-rot8": dict(n_embd=96, n_head=4, rotary_dim=8),  # no whole vector per head
}


def tiny_gptj(kw: dict, mode: str, fused: bool, seed: int = 0) -> GPTJ:
    torch.manual_seed(seed)
    model = GPTJ(GPTJConfig(vocab_size=101, n_positions=1024, n_layer=3, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if name.endswith("ln_1.weight") or name.endswith("ln_f.weight") else p.normal_(0.0, 0.15)
    quantize_model(model, mode)
    if fused:
        model.fuse_projections()
    return model


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", list(GPTJ_CONFIGS))
def test_gptj_prefill_then_decode_matches_torch(name: str, mode: str, cache_dtype: torch.dtype,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = tiny_gptj(GPTJ_CONFIGS[name], mode, fused=name == "hd32-rot16")
    served = []
    real = cpu_decode.decode_blocks
    monkeypatch.setattr(cpu_decode, "decode_blocks", lambda *a: served.append(real(*a)) or served[-1])
    ids = torch.randint(0, 101, (1, 14))
    cache = cache_for(model, 1, dtype=cache_dtype)
    with torch.no_grad():
        model(ids[:, :6], torch.arange(6)[None], cache)
    steps = [(ids[:, i : i + 1], torch.tensor([[i]])) for i in range(6, 14)]
    # 512-wide layers give more activations to round the other way (~1 step in 16 here), and a
    # bfloat16 cache more still: a 1e-7 difference can round a key to the neighbouring bf16
    # value (2^-8 apart), which then moves the step's other activations. A wrong rotary, norm
    # or cache write would miss by far more than FLIPPED at every step.
    compare_steps(model, cache, slice(0, 1), steps, monkeypatch,
                  max_flipped=2 if cache_dtype == torch.float32 else len(steps) // 2)  # fmt: skip
    assert served.count(True) == len(steps)  # every fast step was served by C++


@pytest.mark.parametrize("fused", [False, True])
def test_gptj_batched_rows_and_long_context(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows 1..3 of 5 at positions 300, 4 and 12 (the long one's keys go in chunks); rows 0 and 4
    hold values that must stay as they are."""
    compare_batched_rows(tiny_gptj(GPTJ_CONFIGS["hd32-rot16"], "int8", fused, seed=3), [300, 4, 12], 320, monkeypatch)


def test_gptj_float_weights_keep_the_torch_path() -> None:
    model = GPTJ(GPTJConfig(vocab_size=50, n_positions=64, n_layer=1, **GPTJ_CONFIGS["hd32-rot16"])).eval()
    assert not cpu_decode.serves(model)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_llama_takes_the_fast_path(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 Llama (norms, embeddings and head output in bf16, quantized linears): the
    runner hands the step float32 rotary tables, so the fast path serves it. Against its float32
    twin (the same values, the same quantized layers) it is as close as the bf16 torch path is:
    both round the embeddings, the final norm and the logits to 8 bits, which moves these tiny
    models' logits by up to ~8 % of their scale (and the bf16 torch path rounds every layer's
    residual too). A wrong rotary, norm or cache write would miss by far more."""
    torch.manual_seed(0)
    cfg = LlamaConfig.from_dict(dict(vocab_size=101, num_hidden_layers=3, max_position_embeddings=64, **CONFIGS["gqa"]))
    twin = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
            p.copy_(p.to(torch.bfloat16))  # values a bf16 model holds exactly
    model = copy.deepcopy(twin).to(torch.bfloat16)
    for m in (model, twin):
        quantize_model(m, mode)
        m.fuse_projections()
    assert model.model.norm.weight.dtype == torch.bfloat16
    served = []
    real = cpu_decode.decode_blocks
    monkeypatch.setattr(cpu_decode, "decode_blocks", lambda *a: served.append(real(*a)) or served[-1])
    ids = torch.randint(0, 101, (1, 10))
    logits = {}
    for name, m, fast in (("fast", model, True), ("torch", model, False), ("float32", twin, False)):
        cache = cache_for(m, 1)
        with torch.no_grad():
            m(ids[:, :6], torch.arange(6)[None], cache)  # prefill: the torch path
        steps = [decode(m, ids[:, i : i + 1], torch.tensor([[i]]), cache, slice(0, 1), fast, monkeypatch)
                 for i in range(6, 10)]  # fmt: skip
        logits[name] = torch.cat(steps).float()
    assert served == [True] * 4  # the fast steps, each served by C++
    scale = logits["float32"].abs().max()
    fast_err = ((logits["fast"] - logits["float32"]).abs().max() / scale).item()
    torch_err = ((logits["torch"] - logits["float32"]).abs().max() / scale).item()
    assert fast_err < 0.1 and fast_err < torch_err + 0.02, (fast_err, torch_err)


def test_models_do_not_import_the_kernels() -> None:
    """The model files are plain torch: the runner, not the model, picks the C++ step."""
    root = Path(gptj.__file__).parent
    for name in ("gptj.py", "llama.py"):
        tree = ast.parse((root / "models" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.startswith(("gptj.cpu_decode", "gptj.kernels", "gptj.quant"))}, name


@pytest.mark.parametrize("variant", [v for v in kernels.available_variants() if v != kernels.NONE])
@pytest.mark.parametrize("arch", ["llama", "gptj", "gptj-6b-heads"])
def test_a_tokens_logits_do_not_depend_on_its_step(arch: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What speculative decoding and batching rely on: a token's logits are the same bits whether
    its step takes it alone, with the drafted tokens after it (T tokens of one row, causal among
    themselves: GPT-J's attention reads each key once for up to 4 of them), beside other rows,
    or on one thread or two; also past 512 keys, where its attention splits into chunks."""
    cache_dtype = torch.float32
    if arch == "llama":
        model = tiny_llama(CONFIGS["gqa"], "int8", seed=5)
    elif arch == "gptj":
        model = tiny_gptj(GPTJ_CONFIGS["hd32-rot16"], "int4", fused=True, seed=5)
    else:  # GPT-J-6B's head size, and its bfloat16 cache
        model = tiny_gptj(GPTJ_CONFIGS["hd256-rot64"], "int8", fused=True, seed=5)
        cache_dtype = torch.bfloat16
    monkeypatch.setenv("GPTJ_FAST_DECODE", "1")
    torch.manual_seed(5)
    start, T = 600, 7  # a tile of 4 entries and one of 3
    ids = torch.randint(0, 101, (3, start + T))

    def fresh_cache() -> KVCache:
        cache = cache_for(model, 3, max_len=start + T + 2, dtype=cache_dtype)
        with torch.no_grad():  # the prompts: the torch path, the same in every case
            for r in range(3):
                model(ids[r : r + 1, :start], torch.arange(start)[None], cache, slice(r, r + 1), logits=False)
        return cache

    def run(rows: slice, tokens: torch.Tensor, first: int) -> torch.Tensor:
        positions = torch.arange(first, first + tokens.shape[1]).expand(tokens.shape[0], -1)
        with torch.no_grad():
            return runner.forward(model, tokens, positions, cache, rows)

    with kernels.use(variant):  # every instruction set this CPU runs: the rule holds in each
        cache = fresh_cache()
        alone = torch.cat([run(slice(1, 2), ids[1:2, t : t + 1], t) for t in range(start, start + T)], dim=1)
        cache = fresh_cache()
        drafted = run(slice(1, 2), ids[1:2, start:], start)
        assert torch.equal(drafted, alone)
        cache = fresh_cache()
        batch = run(slice(0, 3), ids[:, start:], start)
        assert torch.equal(batch[1:2], alone)
        cache = fresh_cache()
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one_thread = run(slice(1, 2), ids[1:2, start:], start)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one_thread, alone)
