"""Two builds of the C++ kernels, alternated in one process over the same weights: is a change to
gptj/kernels faster?

This VM's memory bandwidth and compute drift by 10-30 % within a minute (a neighbour's load), so
two runs of a benchmark a minute apart cannot tell a 5 % change. Here both builds run the GEMVs
(or GEMMs) of a few GPT-J-shaped layers, taking turns, many rounds, and the ratio of each round's
pair is what is reported: drift moves both sides of a pair alike. It also says whether the two
give the same bits.

    cp -r gptj/kernels /tmp/changed && $EDITOR /tmp/changed/gemv.cpp
    .venv/bin/python benchmarks/ab_kernels.py /tmp/changed --mode int4 --rows 1
    # int4 rows=1 (avx2): same bits; A 50.7 ms, B 49.7 ms (medians of 15); B/A 0.995 [0.882 .. 1.094]

A is this package's gptj/kernels unless --base names another tree. Each library gets the weights
in the layout its own kernels read (int8 in 16-row panels where it says so), in transparent huge
pages as the package puts them (gptj.memory.huge_page_empty); `--pages 4k,huge` compares pages
instead, with the same tree twice:

    .venv/bin/python benchmarks/ab_kernels.py gptj/kernels --mode int4 --pages 4k,huge

`--mode attention` times the decode step's attention instead (gq_attention: one token's query
over GPT-J-6B's 16 heads of 256 in each layer's bfloat16 cache, `--context` keys).

After each build's pass a streaming read of the same bytes (the weights, or the cache) runs too
(benchmarks/bench_read.cpp), and the line ends with each build's time against it: how far the
kernels are from the memory they have to read, in the same drift.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_6b import streaming_read

from gptj import kernels
from gptj.memory import huge_page_empty
from gptj.quant import QuantizedLinear

GPTJ_LAYER = [(4096, 4096)] * 4 + [(16384, 4096), (4096, 16384)]  # q, k, v, out, fc_in, fc_out
# the bundled SmolLM2-135M's: q, k, v, o, gate, up, down (30 layers)
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYER_SHAPES = {"gptj": (GPTJ_LAYER, 4), "smollm2": (SMOLLM2_LAYER, 30)}  # (layer, default layers)
GPTJ_HEADS, GPTJ_HEAD_DIM = 16, 256


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("changed", type=Path, help="a folder holding the changed kernel sources (B)")
    ap.add_argument("--base", type=Path, default=kernels.SOURCE_DIR, help="the sources to compare with (A)")
    ap.add_argument("--mode", choices=("int8", "int4", "attention"), default="int8")
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1: one-stream decode)")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers (default: GPT-J 4, ~0.8 GB int8; SmolLM2 30; 28 of KV cache with --mode attention)")
    ap.add_argument("--shapes", choices=sorted(LAYER_SHAPES), default="gptj",
                    help="whose layer shapes the weights take: GPT-J-6B's or the bundled SmolLM2's")
    ap.add_argument("--context", type=int, default=1024, help="keys each layer's query attends to (--mode attention)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--isa", default=None,
                    help="the variant to build (default: this CPU's best), or A's and B's, e.g. amx,avx512vnni")
    ap.add_argument("--pages", default="huge,huge",
                    help="A's and B's weight pages: huge (as the package puts them) or 4k")
    args = ap.parse_args(argv)
    pages = args.pages.split(",")
    if len(pages) != 2 or not set(pages) <= {"4k", "huge"}:
        ap.error("--pages takes two of 4k and huge, e.g. 4k,huge")

    variants = (args.isa or kernels.default_variant()).split(",")
    if len(variants) == 1:
        variants *= 2
    if len(variants) != 2:
        ap.error("--isa takes one variant, or two: A's and B's")
    variant = variants[0] if variants[0] == variants[1] else ",".join(variants)
    libs = [kernels.Library(kernels.build_tree(d, v), v) for d, v in zip((args.base, args.changed), variants, strict=True)]
    torch.manual_seed(0)
    if args.mode == "attention":
        run, outputs, read_bytes = attention_runs(libs, args.layers or 28, args.context)
        run, note = beside_a_read(run, read_bytes, variants[0])
        compare(run, outputs, args.rounds, f"attention context={args.context} ({variant})", note)
        return
    threads = torch.get_num_threads()
    shapes, default_layers = LAYER_SHAPES[args.shapes]
    layers = [QuantizedLinear.from_weight(torch.randn(n, k) * 0.02, None, args.mode)
              for _ in range(args.layers or default_layers) for n, k in shapes]
    inputs = {k: torch.randn(args.rows, k) for _, k in shapes}
    outputs = {n: torch.empty(args.rows, n) for n, _ in shapes}
    widest = max(k for _, k in shapes)
    scratch = torch.empty(max(lib.linear_scratch_bytes(args.rows, widest) for lib in libs), dtype=torch.uint8)

    def buffer(nbytes: int, pages: str) -> torch.Tensor:
        return huge_page_empty(nbytes) if pages == "huge" else torch.empty(nbytes, dtype=torch.uint8)

    def weights_for(lib: kernels.Library, layer: QuantizedLinear, pages: str) -> torch.Tensor:
        b = layer.portable_buffers()
        n, k = layer.out_features, layer.in_features
        if args.mode == "int4":
            packed = buffer(lib.gq_int4_panel_bytes(n, k), pages)
            lib.gq_pack_int4_panels(b["qweight"].data_ptr(), b["scales"].data_ptr(), b["mins"].data_ptr(), n, k,
                                    packed.data_ptr(), threads)  # fmt: skip
            return packed
        if lib.int8_panels:
            packed = buffer(lib.gq_int8_panel_bytes(n, k), pages)
            lib.gq_pack_int8_panels(b["qweight"].data_ptr(), n, k, packed.data_ptr(), threads)
            return packed
        rows = buffer(b["qweight"].nbytes, pages)
        return rows.view(torch.int8).view(n, k).copy_(b["qweight"])

    plans = [[(weights_for(lib, layer, p), layer) for layer in layers] for lib, p in zip(libs, pages, strict=True)]

    def run(i: int) -> float:
        lib, t0 = libs[i], time.perf_counter()
        for w, layer in plans[i]:
            n, k = layer.out_features, layer.in_features
            x, y = inputs[k].data_ptr(), outputs[n].data_ptr()
            if args.mode == "int8":
                lib.gq_linear_int8(w.data_ptr(), layer.scales.data_ptr(), None, n, k, x, args.rows, y,
                                   scratch.data_ptr(), threads)  # fmt: skip
            else:
                lib.gq_linear_int4(w.data_ptr(), None, n, k, x, args.rows, y, scratch.data_ptr(), threads)
        return time.perf_counter() - t0

    run, note = beside_a_read(run, [w for w, _ in plans[0]], variants[0])
    compare(run, list(outputs.values()), args.rounds, f"{args.mode} rows={args.rows} ({variant}, pages {args.pages})",
            note)  # fmt: skip


def beside_a_read(run: Callable[[int], float], buffers: list[torch.Tensor], variant: str
                  ) -> tuple[Callable[[int], float], Callable[[list[list[float]]], str]]:  # fmt: skip
    """run(i), then a streaming read of `buffers` (its time kept), and the note that says each
    build's time against that read."""
    read = streaming_read(variant)
    nbytes = sum(t.nbytes for t in buffers)
    reads: list[list[float]] = [[], []]

    def timed(i: int) -> float:
        took = run(i)
        if read is not None:
            t0 = time.perf_counter()
            for t in buffers:
                read(t)
            reads[i].append(time.perf_counter() - t0)
        return took

    def note(times: list[list[float]]) -> str:
        if read is None:
            return ""
        per = [statistics.median(a / r for a, r in zip(times[i], reads[i][-len(times[i]):], strict=True))
               for i in range(2)]  # fmt: skip
        return f"; against a read of the same {nbytes / 1e6:.0f} MB: A {per[0]:.2f}, B {per[1]:.2f}"

    return timed, note


def compare(run: Callable[[int], float], outputs: list[torch.Tensor], rounds: int, label: str,
            note: Callable[[list[list[float]]], str] | None = None) -> None:  # fmt: skip
    """Runs A (0) and B (1) in turns and prints whether their outputs are the same bits and the
    median ratio of each round's pair."""
    results = []
    for i in range(2):
        run(i)
        results.append([y.clone() for y in outputs])
    same = all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # which goes first alternates too
            times[i].append(run(i))
    ratios = [b / a for a, b in zip(*times, strict=True)]
    print(f"{label}: {'same bits' if same else 'DIFFERENT BITS'}; "
          f"A {statistics.median(times[0]) * 1e3:.1f} ms, B {statistics.median(times[1]) * 1e3:.1f} ms "
          f"(medians of {rounds}); B/A {statistics.median(ratios):.3f} [{min(ratios):.3f} .. {max(ratios):.3f}]"
          + (note(times) if note else ""))


def attention_runs(libs: list[kernels.Library], n_layers: int, context: int
                   ) -> tuple[Callable[[int], float], list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """run(i): library i's attention of one token over every layer's cache; the output; the cache."""
    threads, hd, nh = torch.get_num_threads(), GPTJ_HEAD_DIM, GPTJ_HEADS
    caches = [(torch.randn(1, nh, context, hd).bfloat16(), torch.randn(1, nh, context, hd).bfloat16())
              for _ in range(n_layers)]  # fmt: skip
    q = torch.randn(1, nh * hd)
    out = torch.empty(1, nh * hd)
    pos, rows = torch.tensor([context - 1]), torch.tensor([0])
    scratch = torch.empty(max(lib.gq_attention_scratch(1, nh, hd, context, threads) for lib in libs), dtype=torch.uint8)

    def run(i: int) -> float:
        lib, t0 = libs[i], time.perf_counter()
        for k, v in caches:
            lib.gq_attention(q.data_ptr(), 1, pos.data_ptr(), rows.data_ptr(), nh, nh, hd, k.data_ptr(), v.data_ptr(),
                             1, 1, context, out.data_ptr(), scratch.data_ptr(), threads)  # fmt: skip
        return time.perf_counter() - t0

    return run, [out], [t for kv in caches for t in kv]


if __name__ == "__main__":
    main()
