"""Perplexity of the bundled SmolLM2-135M-Instruct on a fixed text, per weight format.

    .venv/bin/python benchmarks/bench_quality.py [--tokens N] [--decode-kernel] [--modes ...]

Loads the model with quantize="none" (float32), "bf16", "int8" and "int4", runs the text
(tests/data/perplexity.txt) through `model.logits` in chunks of at most the context window,
and prints the mean negative log-likelihood of each next token and its perplexity as a
markdown table, with the change against float32. The whole text is one forward pass, so the
quantized layers take their prefill path (dequantize + GEMM); --decode-kernel sends every call
through the decode path instead (our GEMV kernel, which also quantizes the activations to int8).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gptj

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"


def mean_nll(model: gptj.Model, ids: list[int]) -> float:
    """Mean negative log-likelihood (nats) of ids[1:], each given the ones before it.

    A text longer than the context window goes in windows that start where the last ended
    (each window's first token is context only)."""
    window = model.config.context_length
    total, count = 0.0, 0
    start = 0
    while start < len(ids) - 1:
        chunk = ids[start : start + window]
        logits = model.logits(chunk)
        nll = F.cross_entropy(logits[:-1].float(), torch.tensor(chunk[1:]), reduction="sum")
        total += nll.item()
        count += len(chunk) - 1
        start += len(chunk) - 1
    return total / count


def perplexity(quantize: str | None, ids: list[int]) -> tuple[float, float]:
    """(mean NLL, perplexity) of the bundled model loaded with `quantize`."""
    model = gptj.load(quantize=quantize)
    try:
        nll = mean_nll(model, ids)
    finally:
        model.engine.shutdown(grace=0)
    return nll, math.exp(nll)


def text_ids(tokens: int | None = None) -> list[int]:
    ids = gptj.load_tokenizer("smollm2").encode(TEXT.read_text())
    return ids[:tokens] if tokens else ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="only the first N tokens of the text")
    ap.add_argument("--modes", nargs="+", default=["float32", "bf16", "int8", "int4"])
    ap.add_argument("--decode-kernel", action="store_true", help="run the quantized layers' decode path")
    args = ap.parse_args()
    if args.decode_kernel:
        os.environ["GPTJ_QUANT_DECODE_MAX_ROWS"] = str(1 << 30)
    torch.set_grad_enabled(False)
    ids = text_ids(args.tokens)
    rows = []
    for mode in args.modes:
        t = time.perf_counter()
        nll, ppl = perplexity("none" if mode == "float32" else mode, ids)  # None would be the default, int8
        rows.append((mode, nll, ppl, time.perf_counter() - t))
    base = dict((r[0], r[2]) for r in rows).get("float32")
    path = "decode kernel" if args.decode_kernel else "prefill path"
    print(f"\nSmolLM2-135M-Instruct (bundled Q4_1 GGUF), {TEXT.name}: {len(ids)} tokens, {path}\n")
    print("| weights | mean NLL | perplexity | vs float32 | load + eval s |")
    print("|---|---:|---:|---:|---:|")
    for mode, nll, ppl, sec in rows:
        change = f"{(ppl / base - 1) * 100:+.1f} %" if base else "-"
        print(f"| {mode} | {nll:.4f} | {ppl:.2f} | {change} | {sec:.1f} |")


if __name__ == "__main__":
    main()
