"""Decode from a quantized checkpoint's int8 weights copied into memory (the default) against
the same weights read through the file's mapping (GPTJ_MMAP=1), in one process.

    .venv/bin/python benchmarks/bench_mapped_weights.py CHECKPOINT [--rounds 8] [--tokens 24]

CHECKPOINT is a `gptj quantize` folder. It is loaded twice, and greedy decode is timed on each in
turn, round after round: a shared VM's memory bandwidth moves by a third within minutes, so only
interleaved runs compare. Prints each round's median ms/token and the load times, and the memory
bandwidth (bench_6b's) before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_6b import run_worker

import gptj
from gptj.quant import kernel_name


def bandwidth() -> float:
    return run_worker("bandwidth")["bandwidth_gbs"]  # bench_6b's, in a process of its own


def decode_ms(model: gptj.Model, tokens: int) -> float:
    ids = list(range(1000, 1016))
    stamps = [time.perf_counter() for _ in model.submit(ids, max_new_tokens=tokens, temperature=0, ignore_eos=True)]
    return 1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a `gptj quantize` folder")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    models = {}
    for name, env in (("mapped file (GPTJ_MMAP=1)", "1"), ("copied (default)", "0")):
        os.environ["GPTJ_MMAP"] = env
        t = time.perf_counter()
        models[name] = gptj.load(args.checkpoint, progress=False, prefix_cache=False, speculative="none")
        print(f"{name}: loaded in {time.perf_counter() - t:.1f} s", flush=True)
    for m in models.values():
        m.generate([1000, 1001], max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up: kernels, plans
    print(f"bandwidth before: {bandwidth():.1f} GB/s; kernels: {kernel_name()}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            times[name].append(decode_ms(m, args.tokens))
    print(f"bandwidth after: {bandwidth():.1f} GB/s")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.1f} ms/token; rounds {' '.join(f'{t:.1f}' for t in ts)}")
    a, b = times.values()
    print(f"copied / mapped, round by round: median {statistics.median(y / x for x, y in zip(a, b, strict=True)):.3f}")


if __name__ == "__main__":
    main()
