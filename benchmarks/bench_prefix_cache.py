"""Time to first token over a scripted chat, with the prefix KV cache on and off.

    .venv/bin/python benchmarks/bench_prefix_cache.py                 # the bundled model
    .venv/bin/python benchmarks/bench_prefix_cache.py --gptj-6b DIR   # also a GPT-J-6B-shaped checkpoint (int8)

Each turn sends the whole conversation again (play script / chat template), as chat clients
do. With the cache, a turn prefills only the tokens added since the last one.
"""

from __future__ import annotations

import argparse
import time

import gptj
from gptj.chat import ChatSession

TURNS = (1, 5, 10, 20)
QUESTIONS = [
    "Tell me about the sea.", "Why is it salty?", "How deep is it?", "What lives at the bottom?",
    "Is it cold down there?", "Who explored it first?", "What is a trench?", "How do submarines dive?",
    "What is sonar?", "Are there volcanoes under the sea?", "What are tides?", "Why do waves break?",
    "What is a tsunami?", "How are islands made?", "What is coral?", "Why is coral dying?",
    "Can we help it?", "What is plankton?", "Do whales sleep?", "Thank you!",
]


def ttft_per_turn(model: gptj.Model, reply_tokens: int) -> dict[int, float]:
    session = ChatSession(model)
    messages: list[dict] = []
    out = {}
    for turn, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        prompt, settings, _ = session.prepare(messages, {"max_new_tokens": reply_tokens, "temperature": 0, "ignore_eos": True})
        start = time.perf_counter()
        handle = model.submit(prompt, **settings)
        first = None
        for _event in handle:
            first = first or time.perf_counter()
        result = handle.result()
        out[turn] = (first or time.perf_counter()) - start
        messages.append({"role": "assistant", "content": result.text})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--gptj-6b", default=None, help="a GPT-J-6B-shaped checkpoint made by `gptj quantize` (int8)")
    parser.add_argument("--only-6b", action="store_true")
    args = parser.parse_args()
    # float32, as the README's table was measured (gptj.load's default for the bundled model is now int8)
    targets = [("SmolLM2-135M (bundled)", dict(quantize="none"))] if not args.only_6b else []
    if args.gptj_6b:
        targets.append(("GPT-J-6B shape, int8", dict(name_or_path=args.gptj_6b, context_length=2048)))
    print("| model | prefix cache | " + " | ".join(f"turn {t} TTFT (s)" for t in TURNS) + " |")
    print("|---|---|" + "---:|" * len(TURNS))
    for label, kwargs in targets:
        for cache in (False, True):
            model = gptj.load(**kwargs, prefix_cache=cache)
            times = ttft_per_turn(model, args.reply_tokens)
            print(f"| {label} | {'on' if cache else 'off'} | " + " | ".join(f"{times[t]:.2f}" for t in TURNS) + " |", flush=True)
            model.engine.shutdown(grace=0)


if __name__ == "__main__":
    main()
