"""Batch-1 decode and 512-row prefill speed of every Linear kernel candidate on this CPU.

    .venv/bin/python benchmarks/bench_linear.py [--quick] [--model | --model-only]
    .venv/bin/python benchmarks/bench_linear.py --decode [--rows 1 8]

For each GPT-J shape (out x in) and M in {1, 512} it prints ms per call and the effective weight
bandwidth (weight bytes incl. scales / time), next to the machine's measured memory bandwidth.
--decode instead prints the decode table: the SmolLM2-135M and GPT-J-6B shapes at M = 1 and 8,
our QuantizedLinear.forward_decode (int8, int4; "path" says whether our kernel or the torch-op
fallback served) beside torch's _weight_int8pack_mm / _weight_int4pack_mm_for_cpu, in µs and GB/s.
Each candidate cycles through enough copies of its weight to overflow the last-level cache, as
a whole model does. --model also times the linear layers of a full GPT-J-6B step (28 layers +
lm_head, random weights) for the int8 and int4 paths. Other processes on the machine inflate
the numbers: the table shows the best and the median of the timed calls. torch's int8/int4 ops get
bfloat16 activations (with float32 ones they are 2-20x slower); ours get float32.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from gptj import quant

SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096)]  # (out_features, in_features)
# q/o, k/v, gate/up, down, lm_head; then q+k+v and gate+up fused (gptj.fusion)
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (960, 576), (3072, 576)]
GPTJ = {"d": 4096, "inner": 16384, "layers": 28, "vocab": 50400}


def timeit(
    fns: list[Callable[[], object]], min_calls: int, min_s: float, max_s: float = 8.0
) -> tuple[float, float]:
    """(best, median) seconds per call, cycling through `fns` (one per weight copy)."""
    fns[0]()  # warm-up: first-call set-up (oneDNN primitives, our kernel's build)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while (
        not times
        or (len(times) < min_calls or time.perf_counter() - start < min_s)
        and (time.perf_counter() - start < max_s)
    ):
        f = fns[i % len(fns)]
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
        i += 1
    return min(times), statistics.median(times)


def bandwidth() -> dict[str, float]:
    a = torch.ones(1 << 28)  # 1 GiB
    b = torch.empty_like(a)
    read = timeit([a.sum], 10, 1.0)[0]
    copy = timeit([lambda: b.copy_(a)], 10, 1.0)[0]
    return {"sum (read)": a.nbytes / read / 1e9, "copy (read+write)": 2 * a.nbytes / copy / 1e9}


def copies(nbytes: int, working_set: float) -> int:
    return max(1, min(64, int(working_set // nbytes) + 1))


def random_quantized(n: int, k: int, mode: str) -> quant.QuantizedLinear:
    """A QuantizedLinear with random buffers (quantizing real weights is slow and changes nothing)."""
    layer = quant.QuantizedLinear.empty(k, n, mode, bias=False)
    for name, buf in layer.named_buffers():
        if name == "qweight":
            buf.random_(-127, 128) if mode == "int8" else buf.random_(0, 256)
        elif buf.dtype == torch.uint8:  # integer zero points (older int4 format)
            buf.random_(0, 16)
        else:  # scales, mins
            buf.copy_(torch.rand(buf.shape) * (1e-3 if name == "scales" else -1e-2))
    return layer


def weight_bytes(layer: quant.QuantizedLinear) -> int:
    return sum(b.nbytes for b in layer.buffers())


def candidates(n: int, k: int) -> dict[str, tuple[int, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]]:
    """name -> (weight bytes, factory of a fresh layer's forward(x))."""
    g = quant.GROUP_SIZE

    def bf16() -> Callable[[torch.Tensor], torch.Tensor]:
        w = torch.randn(n, k, dtype=torch.bfloat16)
        return lambda x: F.linear(x.to(torch.bfloat16), w)

    def fp32() -> Callable[[torch.Tensor], torch.Tensor]:
        w = torch.randn(n, k)
        return lambda x: F.linear(x, w)

    def dynamic_int8() -> Callable[[torch.Tensor], torch.Tensor]:
        lin = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
        qw = torch.quantize_per_tensor(torch.randn(n, k) * 0.02, 0.02 / 64, 0, torch.qint8)
        lin.set_weight_bias(qw, None)
        return lin

    def int8pack() -> Callable[[torch.Tensor], torch.Tensor]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n, dtype=torch.bfloat16)
        return lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), w, s)

    def int4pack() -> Callable[[torch.Tensor], torch.Tensor]:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 1
        )
        sz = torch.rand(k // g, n, 2, dtype=torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, g, sz)

    def ours(mode: str, path: str) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
        def make() -> Callable[[torch.Tensor], torch.Tensor]:
            layer = random_quantized(n, k, mode)
            return getattr(layer, path)

        return make

    i4 = n * k // 2 + 3 * n * k // g
    return {
        "fp32 F.linear": (4 * n * k, fp32),
        "bf16 F.linear": (2 * n * k, bf16),
        "torch dynamic int8": (n * k, dynamic_int8),
        "_weight_int8pack_mm (bf16 x)": (n * k + 4 * n, int8pack),
        "_weight_int4pack_mm g128 (bf16 x)": (n * k // 2 + 8 * n * k // g, int4pack),
        "ours int8 decode kernel": (n * k + 4 * n, ours("int8", "forward_decode")),
        "ours int8 prefill (deq+GEMM)": (n * k + 4 * n, ours("int8", "forward_prefill")),
        "ours int4 decode kernel": (i4, ours("int4", "forward_decode")),
        "ours int4 prefill (deq+GEMM)": (i4, ours("int4", "forward_prefill")),
    }


def bench_shapes(rows: list[int], working_set: float, min_s: float) -> None:
    print(
        f"\n{'kernel':34s} {'out x in':>12s} {'M':>4s} {'best ms':>9s} {'median ms':>9s} {'GB/s':>6s} {'GFLOP/s':>8s}"
    )
    for n, k in SHAPES:
        for name, (nbytes, make) in candidates(n, k).items():
            reps = copies(nbytes, working_set)
            fns_layers = [make() for _ in range(reps)]
            for m in rows:
                x = torch.randn(m, k)
                fns = [lambda f=f, x=x: f(x) for f in fns_layers]
                best, med = timeit(fns, min_calls=max(6, 2 * reps) if m == 1 else 4, min_s=min_s)
                gflops = 2 * m * n * k / best / 1e9
                print(
                    f"{name:34s} {f'{n}x{k}':>12s} {m:4d} {best * 1e3:9.3f} {med * 1e3:9.3f} "
                    f"{nbytes / best / 1e9:6.1f} {gflops:8.1f}",
                    flush=True,
                )
            del fns_layers


def decode_candidates(n: int, k: int) -> dict[str, tuple[str, int, Callable[[], Callable[[torch.Tensor], object]]]]:
    """name -> (path, weight bytes, factory of a fresh layer's forward(x)) for the decode table.

    Each factory copies one random layer (filling fresh random weights is far slower)."""
    g = 32 if k % 128 else 128  # torch's int4 op: our group size where it has one, else its usual 128
    lib = quant.native_kernel()
    layers = {mode: random_quantized(n, k, mode) for mode in ("int8", "int4")}
    path = {mode: "kernel" if lib is not None and q.kernel_fits() else "torch op" for mode, q in layers.items()}
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n, dtype=torch.bfloat16)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz4 = torch.rand(k // g, n, 2, dtype=torch.bfloat16)

    def ours(mode: str) -> Callable[[], Callable[[torch.Tensor], object]]:
        return lambda: copy.deepcopy(layers[mode]).forward_decode

    def int8pack() -> Callable[[torch.Tensor], object]:
        w, s = w8.clone(), s8.clone()
        return lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), w, s)

    def int4pack() -> Callable[[torch.Tensor], object]:
        w, sz = w4.clone(), sz4.clone()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, g, sz)

    return {
        "ours int8": (path["int8"], weight_bytes(layers["int8"]), ours("int8")),
        "torch _weight_int8pack_mm": ("bf16 x", n * k + 2 * n, int8pack),
        "ours int4": (path["int4"], weight_bytes(layers["int4"]), ours("int4")),
        f"torch _weight_int4pack_mm g{g}": ("bf16 x", n * k // 2 + 4 * n * k // g, int4pack),
    }


def bench_decode(rows: list[int], working_set: float, min_s: float) -> None:
    """The decode table: every SmolLM2 and GPT-J shape, ours beside torch's ops, M in `rows`."""
    print("\n| shape (out x in) | kernel | path | M | best µs | median µs | GB/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for n, k in SMOLLM2_SHAPES + SHAPES:
        for name, (path, nbytes, make) in decode_candidates(n, k).items():
            reps = max(1, min(4096, int(working_set // nbytes) + 1))
            layers = [make() for _ in range(reps)]
            for m in rows:
                x = torch.randn(m, k)
                fns = [lambda f=f, x=x: f(x) for f in layers]
                best, med = timeit(fns, min_calls=max(20, 2 * reps), min_s=min_s)
                print(f"| {n}x{k} | {name} | {path} | {m} | {best * 1e6:.1f} | {med * 1e6:.1f} | "
                      f"{nbytes / best / 1e9:.1f} |", flush=True)  # fmt: skip
            del layers


def step(model: list[quant.QuantizedLinear], rows: int) -> None:
    inputs = {k: torch.randn(rows, k) for k in {layer.in_features for layer in model}}
    for layer in model:
        layer(inputs[layer.in_features])


def bench_model(modes: list[str]) -> None:
    """The Linear layers of GPT-J-6B: one decode token (M=1) and a 512-token prefill."""
    d, inner, layers, vocab = GPTJ["d"], GPTJ["inner"], GPTJ["layers"], GPTJ["vocab"]
    shapes = [(d, d)] * 4 + [(inner, d), (d, inner)]
    print("\nGPT-J-6B linear layers only (28 x [q,k,v,out,fc_in,fc_out] + lm_head), random weights:")
    for mode in modes:
        model = [random_quantized(n, k, mode) for _ in range(layers) for n, k in shapes]
        model.append(random_quantized(vocab, d, mode))
        gb = sum(weight_bytes(m) for m in model) / 1e9

        best, med = timeit([partial(step, model, 1)], 8, 3.0)
        print(f"  {mode}: {gb:.2f} GB of weights; decode {best * 1e3:.1f} ms/token (median {med * 1e3:.1f}),"
              f" {gb / best:.1f} GB/s", flush=True)  # fmt: skip
        best, med = timeit([partial(step, model, 512)], 2, 0.0)
        print(f"  {mode}: prefill 512 tokens {best:.2f} s (median {med:.2f})", flush=True)
        model.clear()  # free before the next mode's model is built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs, smaller working set")
    ap.add_argument("--model", action="store_true", help="also time the linear layers of a whole GPT-J-6B")
    ap.add_argument("--model-only", action="store_true", help="only the whole-model timing")
    ap.add_argument("--working-set", type=float, default=1.0, help="GB of weight copies per candidate")
    ap.add_argument("--decode", action="store_true", help="only the decode table (SmolLM2 and GPT-J shapes)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="M for --decode")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, our decode kernel: {quant.kernel_name()}, "
          f"prefill GEMM dtype: {quant.prefill_gemm_dtype()}")  # fmt: skip
    for name, gbs in bandwidth().items():
        print(f"memory bandwidth, {name}: {gbs:.1f} GB/s")
    ws = 0.3e9 if args.quick else args.working_set * 1e9
    with torch.inference_mode():
        if args.decode:
            bench_decode(args.rows, ws, 0.2 if args.quick else 0.5)
            return
        if not args.model_only:
            bench_shapes([1, 512], ws, 0.2 if args.quick else 1.0)
        if args.model or args.model_only:
            bench_model(["int8", "int4"])


if __name__ == "__main__":
    main()
