"""The grammar libraries for constrained JSON output side by side (#15): llguidance, xgrammar and
outlines-core, on our two vocabularies, for what constrained decoding costs per token.

    .venv/bin/python benchmarks/bench_grammar.py [--runs 20] [--timeout 300]

For each library that is installed, each vocabulary (GPT-J's GPT-2 BPE, 50400 ids; the bundled
SmolLM2's, 49152) and each grammar (any JSON object, as `response_format: json_object`; a small
schema with bounded strings and numbers), in a fresh process:

- vocab: building the library's tokenizer description from our token bytes (once per engine);
- compile: turning the grammar into what the matcher runs on, and making a matcher (per request,
  or per distinct schema where compiled grammars are cached);
- first mask: the first bitmask of the first matcher (lazy work lands here);
- mask median / p99: filling the next token's bitmask at every other step of a valid document,
  tokenized as our tokenizer spells it, over `--runs` fresh matchers;
- advance median: feeding the step's token to the matcher.

Every library writes the same bitmask (one bit per token id, int32 words); applying it to the
logits is ours and the same for all, measured once per vocabulary ("apply").

JSON is compact with ", " and ": " separators, no other whitespace: the form gptj's
constraints use (gptj.runtime.constraints, which also allow one space before the JSON), and every
library is set to it. llguidance runs through gptj's own wrapper, the others through their APIs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
VOCABS = ("gpt-j", "smollm2")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "likes_tea"],
    "additionalProperties": False,
}
GRAMMARS: dict[str, tuple[dict, Any]] = {
    # (schema, a document it accepts, written compactly with ", " and ": ")
    "json_object": ({"type": "object"}, {
        "title": "Notes on the Analytical Engine", "year": 1843, "pages": 65.5, "translated": True,
        "authors": [{"name": "Ada Lovelace", "role": "translator"}, {"name": "L. F. Menabrea", "role": None}],
        "tags": ["mathematics", "computing", "history"], "summary": "A memoir \"with notes\": G, by the translator.",
    }),
    "small schema": (SCHEMA, {"name": "Ada Lovelace", "age": 36, "city": "London", "likes_tea": True}),
}
SEPARATORS = (", ", ": ")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- one library per process ----------------------------------------------------------------------


class LLGuidance:
    """Exactly what gptj runs (gptj.runtime.constraints): its vocabulary, its grammar around the schema."""

    def __init__(self, tok: Any) -> None:  # noqa: ANN401
        from gptj.runtime.constraints import Grammars

        self.grammars = Grammars(tok)

    def compile(self, schema: dict) -> Any:  # noqa: ANN401
        return self.grammars.compile(schema)

    def matcher(self, compiled: Any) -> Any:  # noqa: ANN401
        return compiled.deep_copy()  # a fresh matcher per request from the compiled one, as gptj does

    def fill(self, m: Any, bitmask: Any) -> None:  # noqa: ANN401
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, m: Any, token: int) -> bool:  # noqa: ANN401
        return m.consume_token(token)


class XGrammar:
    def __init__(self, tok: Any) -> None:  # noqa: ANN401
        import xgrammar

        self.xgr = xgrammar
        # special tokens as empty strings: xgrammar never allows those (the stop ids aside)
        vocab = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=tok.end_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)

    def compile(self, schema: dict) -> Any:  # noqa: ANN401
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled: Any) -> Any:  # noqa: ANN401
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bitmask: Any) -> None:  # noqa: ANN401
        m.fill_next_token_bitmask(bitmask.view(1, -1))

    def advance(self, m: Any, token: int) -> bool:  # noqa: ANN401
        return m.accept_token(token)


class OutlinesCore:
    def __init__(self, tok: Any) -> None:  # noqa: ANN401
        import outlines_core

        self.oc = outlines_core
        ids: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if not tok.is_special(i):
                ids.setdefault(tok.token_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_token_id, ids)

    def compile(self, schema: dict) -> Any:  # noqa: ANN401
        from outlines_core.json_schema import build_regex_from_schema

        # its JSON is a regular expression: nesting is bounded (max_recursion_depth, 3 by default)
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:  # noqa: ANN401
        return self.oc.Guide(compiled)

    def fill(self, m: Any, bitmask: Any) -> None:  # noqa: ANN401
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, m: Any, token: int) -> bool:  # noqa: ANN401
        m.advance(token, return_tokens=False)
        return True


ADAPTERS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def ms(seconds: float) -> float:
    return seconds * 1e3


def work(library: str, vocab: str, runs: int) -> dict:
    """One library on one vocabulary: every grammar's timings (in ms)."""
    import torch

    from gptj.tokenizer import load_tokenizer

    tok = load_tokenizer(vocab)
    t0 = time.perf_counter()
    lib = ADAPTERS[library](tok)
    out: dict[str, Any] = {"vocab_ms": ms(time.perf_counter() - t0), "grammars": {}}
    words = (tok.vocab_size + 31) // 32
    for name, (schema, document) in GRAMMARS.items():
        text = json.dumps(document, separators=SEPARATORS, ensure_ascii=False)
        tokens = tok.encode(text)
        t0 = time.perf_counter()
        compiled = lib.compile(schema)
        m = lib.matcher(compiled)
        compile_ms = ms(time.perf_counter() - t0)
        bitmask = torch.zeros(words, dtype=torch.int32)
        masks, advances, first = [], [], None
        for run in range(runs):
            if run:
                m = lib.matcher(compiled)
            for token in tokens:
                t0 = time.perf_counter()
                lib.fill(m, bitmask)
                t1 = time.perf_counter()
                if first is None:
                    first = ms(t1 - t0)
                else:
                    masks.append(ms(t1 - t0))
                allowed = bool((int(bitmask[token // 32]) >> (token % 32)) & 1)
                if not allowed or not lib.advance(m, token):
                    raise AssertionError(f"{library} refused token {token} ({tok.token_bytes(token)!r}) of {text!r}")
                advances.append(ms(time.perf_counter() - t1))
        masks.sort()
        out["grammars"][name] = {
            "tokens": len(tokens), "compile_ms": compile_ms, "first_mask_ms": first,
            "mask_median_ms": statistics.median(masks), "mask_p99_ms": masks[int(0.99 * (len(masks) - 1))],
            "advance_median_ms": statistics.median(advances),
        }
    return out


def apply_cost(vocab: str, rows: int, repeats: int = 2000) -> float:
    """Median ms to turn a bitmask into -inf logits, as gptj.runtime.constraints does."""
    import torch

    from gptj.runtime.constraints import apply_bitmask
    from gptj.tokenizer import load_tokenizer

    tok = load_tokenizer(vocab)
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, ((tok.vocab_size + 31) // 32,), dtype=torch.int32, generator=g)
    logits = torch.randn(rows, generator=g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_bitmask(logits, bitmask, tok.vocab_size)
        times.append(ms(time.perf_counter() - t0))
    return statistics.median(times)


# ---- the table -------------------------------------------------------------------------------------


def version(library: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(library)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="fresh matchers walked over each document")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one library on one vocabulary")
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(*args.worker, args.runs)))
        return

    import torch

    results: dict[tuple[str, str], dict | str] = {}
    installed = [lib for lib in LIBRARIES if version(lib)]
    for lib in installed:
        for vocab in VOCABS:
            cmd = [sys.executable, __file__, "--worker", lib, vocab, "--runs", str(args.runs)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[lib, vocab] = f"over {args.timeout:g} s"
                continue
            if done.returncode:
                results[lib, vocab] = "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
            else:
                results[lib, vocab] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{lib} on {vocab}: done", file=sys.stderr)

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
          f"torch {torch.__version__}; " + ", ".join(f"{lib} {version(lib)}" for lib in installed))
    print(f"Per-token figures: every step of one valid document, over {args.runs} fresh matchers.\n")
    print("| library | vocabulary | grammar | vocab (ms) | compile (ms) | first mask (µs) | mask median (µs) "
          "| mask p99 (µs) | advance median (µs) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (lib, vocab), r in results.items():
        if isinstance(r, str):
            print(f"| {lib} | {vocab} | all | {r} | | | | | |")
            continue
        for name, g in r["grammars"].items():
            print(f"| {lib} | {vocab} | {name} ({g['tokens']} tokens) | {r['vocab_ms']:.0f} | {g['compile_ms']:.1f} "
                  f"| {g['first_mask_ms'] * 1e3:.0f} | {g['mask_median_ms'] * 1e3:.0f} | {g['mask_p99_ms'] * 1e3:.0f} "
                  f"| {g['advance_median_ms'] * 1e3:.0f} |")
    print()
    for vocab, rows in (("gpt-j", 50400), ("smollm2", 49152)):
        print(f"apply (bitmask -> -inf logits, ours, any library) on {vocab}: {apply_cost(vocab, rows) * 1e3:.0f} µs median")


if __name__ == "__main__":
    main()
