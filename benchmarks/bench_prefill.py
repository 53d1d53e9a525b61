"""Time to the first token of the same prompt, several times in one process: the first run
faults in the KV cache and the step's scratch, the later ones show the warm prefill.

    .venv/bin/python benchmarks/bench_prefill.py CHECKPOINT [--prompt 512] [--repeats 3]

CHECKPOINT: anything gptj.load takes (a `gptj quantize` folder for the 6B). To compare two
commits, run it from each checkout in turn (PYTHONPATH=that checkout), alternating: a shared
VM's bandwidth moves within minutes. Prints the CPU's kernel variant and one line per run.
"""

from __future__ import annotations

import argparse
import time

from bench_6b import prompt_ids

import gptj
from gptj.quant import kernel_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = gptj.load(args.checkpoint, progress=False, prefix_cache=False, speculative="none")
    model.generate(prompt_ids(8), max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up: kernels, plans
    print(f"kernels: {kernel_name()}; prompt {args.prompt} tokens", flush=True)
    ids = [t % model.config.vocab_size for t in prompt_ids(args.prompt)]  # GPT-J's unchanged
    for i in range(args.repeats):
        t = time.perf_counter()
        next(iter(model.submit(ids, max_new_tokens=1, temperature=0, ignore_eos=True)))
        print(f"run {i + 1}: first token after {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main()
