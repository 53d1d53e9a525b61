"""Decode speed on the bundled SmolLM2-135M-Instruct: our engine beside transformers, same weights.

    .venv/bin/python benchmarks/bench_bundled.py [--tokens 128] [--repeats 3] [--formats float32,int8,int4]
                                                 [--no-transformers]

transformers runs LlamaForCausalLM over the very tensors we read from the GGUF (dequantized
to float32), with its KV cache, greedy, token by token. Ours goes through the whole engine
(sampling, detokenizing, stop checks included); quantized formats run with the C++ decode step
(gptj/cpu_decode.py) and without it (GPTJ_FAST_DECODE=0), on the same loaded model. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gptj
from gptj.loading.gguf import bundled_gguf_path, read_gguf
from gptj.quant import kernel_name

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def ours(model: gptj.Model, tokens: int) -> float:
    """Seconds per generated token, excluding the first (prefill) token."""
    stamps = []
    for _event in model.submit(PROMPT, max_new_tokens=tokens, temperature=0, ignore_eos=True):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps)


def transformers_decode(tokens: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, config, state = read_gguf(bundled_gguf_path())
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).eval()
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    ids = torch.tensor([gptj.load_tokenizer("smollm2").encode(PROMPT)])
    gaps = []
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens):
            t = time.perf_counter()
            out = hf(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            gaps.append(time.perf_counter() - t)
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="float32,int8,int4", help="comma-separated: float32, int8, int4")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    if not args.no_transformers:
        ref = min(transformers_decode(args.tokens) for _ in range(args.repeats))
        rows.append(("transformers (float32, same weights)", ref))
    for fmt in args.formats.split(","):
        quant = "none" if fmt == "float32" else fmt  # the default for this GGUF is int8
        model = gptj.load(quantize=quant)
        for fast in ("0", "1") if fmt != "float32" else ("1",):
            os.environ["GPTJ_FAST_DECODE"] = fast
            ours(model, 8)  # warm-up: kernels built, caches allocated
            best = min(ours(model, args.tokens) for _ in range(args.repeats))
            label = "" if fmt == "float32" else ", C++ decode step" if fast == "1" else ", torch blocks"
            rows.append((f"gptj-studio ({fmt}{label})", best))
        model.engine.shutdown(grace=0)
    os.environ.pop("GPTJ_FAST_DECODE", None)
    print(f"\nSmolLM2-135M-Instruct decode, {args.tokens} tokens, median of each run, best of {args.repeats}; "
          f"{torch.get_num_threads()} threads; kernels: {kernel_name()} (GPTJ_ISA picks another)\n")
    print("| engine | ms/token | tokens/s |")
    print("|---|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec * 1000:.1f} | {1 / sec:.1f} |")


if __name__ == "__main__":
    main()
