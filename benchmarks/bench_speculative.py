"""Speculative decoding (prompt lookup) on and off, in one run: tokens/s and the greedy text.

    .venv/bin/python benchmarks/bench_speculative.py [--tokens 128] [--quantize int8] [--6b DIR]

On the bundled SmolLM2-135M-Instruct, three kinds of text: a code edit (rewrite a given function
with one change), few-shot translation, and free story text, each greedy with speculation off
and on; the texts must be identical. With `--6b DIR` (a `gptj quantize` folder, e.g. the one
benchmarks/bench_6b.py writes), the cost of one pass of T tokens against T = 1 on the 6B shape:
what a draft costs when it misses, and where a batch stops being bandwidth-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gptj
from gptj import kernels
from gptj.runtime import runner

CODE_EDIT = '''Rewrite the function so that it returns the total in cents, as an integer.

```python
def order_total(items, tax_rate):
    """The total of an order: each item's price times its quantity, plus tax."""
    subtotal = 0.0
    for item in items:
        price = item["price"]
        quantity = item["quantity"]
        subtotal += price * quantity
    tax = subtotal * tax_rate
    total = subtotal + tax
    return round(total, 2)
```

Rewritten:

```python
def order_total(items, tax_rate):
'''

TRANSLATION = """English: The cat sleeps on the red sofa in the living room.
French: Le chat dort sur le canapé rouge dans le salon.

English: My brother works at the hospital in Lyon.
French: Mon frère travaille à l'hôpital de Lyon.

English: The red sofa in the living room is where my brother sleeps.
French:"""

STORY = "Once upon a time, in a small village by the sea, there lived"

TEXTS = {"code edit": CODE_EDIT, "translation": TRANSLATION, "free story": STORY}


def run(model: gptj.Model, prompt: str, mode: str, tokens: int) -> tuple[float, gptj.Completion]:
    model.engine.speculative = mode
    model.generate(prompt, max_new_tokens=2, temperature=0)  # warm: kernels, cached prefix
    t = time.perf_counter()
    c = model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True)
    return c.completion_tokens / (time.perf_counter() - t), c


def bundled(args: argparse.Namespace) -> None:
    model = gptj.load(quantize=args.quantize)
    print(f"\nSmolLM2-135M-Instruct {args.quantize}, {args.tokens} greedy tokens, kernels {kernels.active_variant()}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}\n")  # fmt: skip
    print("| text | off tok/s | on tok/s | speed-up | drafted | accepted | same text |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, prompt in TEXTS.items():
        best: dict[str, tuple[float, gptj.Completion]] = {}
        for _ in range(args.repeats):
            for mode in ("none", "ngram"):
                rate, c = run(model, prompt, mode, args.tokens)
                if mode not in best or rate > best[mode][0]:
                    best[mode] = (rate, c)
        (off, c_off), (on, c_on) = best["none"], best["ngram"]
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {c_on.drafted_tokens} | {c_on.accepted_tokens} | "
              f"{'yes' if c_on.tokens == c_off.tokens else 'NO'} |")  # fmt: skip
    model.engine.shutdown(grace=0)


def pass_cost(path: str, repeats: int) -> None:
    """ms for one pass of T tokens of one row, through the fused step the engine verifies with."""
    model = gptj.load(path, progress=False)
    engine = model.engine
    cache = engine.allocate_cache()
    module = model.module
    print(f"\n{path}: one pass of T tokens at position 512 (kernels {kernels.active_variant()}, "
          f"fused step: {runner.exact_multi_token(module)})\n")  # fmt: skip
    print("| T | ms per pass | x one token |")
    print("|---:|---:|---:|")
    base = None
    with torch.no_grad():
        for T in (1, 2, 3, 4, 6, 8):
            ids = torch.randint(100, 5000, (1, T))
            positions = torch.arange(512, 512 + T)[None]
            runner.forward(module, ids, positions, cache, slice(0, 1))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                runner.forward(module, ids, positions, cache, slice(0, 1))
                times.append(time.perf_counter() - t)
            ms = 1000 * statistics.median(times)
            base = base or ms
            print(f"| {T} | {ms:.1f} | {ms / base:.2f} |")
    engine.shutdown(grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quantize", default="int8", choices=["int8", "int4"])
    parser.add_argument("--6b", dest="six_b", default=None, help="a quantized GPT-J-6B folder: pass cost by T")
    args = parser.parse_args()
    bundled(args)
    if args.six_b:
        pass_cost(args.six_b, max(3, args.repeats))


if __name__ == "__main__":
    main()
