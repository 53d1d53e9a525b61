"""Speculative decoding (prompt lookup) on and off, in one run: tokens/s and the greedy text.

    .venv/bin/python benchmarks/bench_speculative.py [--tokens 128] [--quantize int8] [--batch] [--6b DIR]

On the bundled SmolLM2-135M-Instruct, three kinds of text: a code edit (rewrite a given function
with one change, to the function's end), few-shot translation and free story text (--tokens
each), each greedy with speculation off and on; the texts must be identical. With `--batch`,
B = 1, 2, 4, 8 requests decoding together, off and on: where drafting stops paying. With `--6b DIR` (a `gptj quantize` folder, e.g. the one
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
from gptj.runtime import speculative as speculation

# A code edit as a completion: the 135M model copies a function it is shown, with the change,
# when it writes the "after" of a before/after pair (asked in a chat turn, it drops most lines)
CODE_EDIT = '''# Before
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

# After: returns the total in cents, as an integer
'''

TRANSLATION = """English: The cat sleeps on the red sofa in the living room.
French: Le chat dort sur le canapé rouge dans le salon.

English: My brother works at the hospital in Lyon.
French: Mon frère travaille à l'hôpital de Lyon.

English: The red sofa in the living room is where my brother sleeps.
French:"""

STORY = "Once upon a time, in a small village by the sea, there lived"

# name -> (prompt, stop): the code edit ends with the function; the others run to --tokens
TEXTS: dict[str, tuple[str, list[str] | None]] = {
    "code edit": (CODE_EDIT, ["\n\n\n", "\n# "]),
    "translation": (TRANSLATION, None),
    "free story": (STORY, None),
}


def run(model: gptj.Model, prompt: str, stop: list[str] | None, mode: str, tokens: int) -> tuple[float, gptj.Completion]:
    model.engine.speculative = mode
    model.generate(prompt, max_new_tokens=2, temperature=0)  # warm: kernels, cached prefix
    t = time.perf_counter()
    c = model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=stop is None, stop=stop)
    return c.completion_tokens / (time.perf_counter() - t), c


def bundled(args: argparse.Namespace) -> None:
    model = gptj.load(quantize=args.quantize)
    print(f"\nSmolLM2-135M-Instruct {args.quantize}, {args.tokens} greedy tokens, kernels {kernels.active_variant()}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}\n")  # fmt: skip
    print("| text | tokens | off tok/s | on tok/s | speed-up | drafted | accepted | same text |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, (prompt, stop) in TEXTS.items():
        best: dict[str, tuple[float, gptj.Completion]] = {}
        for _ in range(args.repeats):
            for mode in ("none", "ngram"):
                rate, c = run(model, prompt, stop, mode, args.tokens)
                if mode not in best or rate > best[mode][0]:
                    best[mode] = (rate, c)
        (off, c_off), (on, c_on) = best["none"], best["ngram"]
        print(f"| {name} | {c_on.completion_tokens} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {c_on.drafted_tokens} | {c_on.accepted_tokens} | "
              f"{'yes' if c_on.tokens == c_off.tokens else 'NO'} |")  # fmt: skip
    model.engine.shutdown(grace=0)


def batched(args: argparse.Namespace) -> None:
    """Aggregate tokens/s of B requests decoding together, speculation off and on: drafts share
    one pass (speculation.MAX_PASS_TOKENS in all), which pays while the pass stays bandwidth-bound."""
    sizes = [1, 2, 4, 8]
    model = gptj.load(quantize=args.quantize, max_batch=max(sizes))
    print(f"\nBatched, SmolLM2-135M-Instruct {args.quantize}: B requests at once, {args.tokens} greedy tokens each, "
          f"MAX_PASS_TOKENS {speculation.MAX_PASS_TOKENS}; best of {args.repeats}\n")  # fmt: skip
    print("| text | B | off tok/s | on tok/s | speed-up | same text |")
    print("|---|---:|---:|---:|---:|---|")
    for name in ("translation", "free story"):
        prompt, _ = TEXTS[name]
        for b in sizes:
            # distinct prompts (a number in front), so no request is another's copy
            prompts = [f"{i + 1}. {prompt}" for i in range(b)]
            rate: dict[str, float] = {}
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(args.repeats):
                for mode in ("none", "ngram"):
                    model.engine.speculative = mode
                    for p in prompts:
                        model.generate(p, max_new_tokens=2, temperature=0)  # warm: cached prefixes
                    t = time.perf_counter()
                    handles = [model.submit(p, max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
                               for p in prompts]  # fmt: skip
                    done = [h.result() for h in handles]
                    r = sum(c.completion_tokens for c in done) / (time.perf_counter() - t)
                    rate[mode] = max(rate.get(mode, 0.0), r)
                    tokens[mode] = [c.tokens for c in done]
            same = "yes" if tokens["none"] == tokens["ngram"] else "NO"
            print(f"| {name} | {b} | {rate['none']:.1f} | {rate['ngram']:.1f} | {rate['ngram'] / rate['none']:.2f}x | {same} |")
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
    parser.add_argument("--batch", action="store_true", help="also B = 1, 2, 4, 8 requests at once, off and on")
    parser.add_argument("--6b", dest="six_b", default=None, help="a quantized GPT-J-6B folder: pass cost by T")
    args = parser.parse_args()
    bundled(args)
    if args.batch:
        batched(args)
    if args.six_b:
        pass_cost(args.six_b, max(3, args.repeats))


if __name__ == "__main__":
    main()
