"""Decode and prefill speed on the bundled SmolLM2-135M-Instruct: our engine beside transformers
and llama.cpp (llama-bench), same weights.

    .venv/bin/python benchmarks/bench_bundled.py [--tokens 128] [--repeats 3] [--formats float32,int8,int4]
                                                 [--prefill 512] [--no-transformers] [--llama-bench PATH]

transformers runs LlamaForCausalLM over the very tensors we read from the GGUF (dequantized
to float32), with its KV cache, greedy, token by token. Ours goes through the whole engine
(sampling, detokenizing, stop checks included); quantized formats run with the C++ decode step
(gptj/cpu_decode.py) and without it (GPTJ_FAST_DECODE=0), on the same loaded model. Prefill:
a `--prefill`-token prompt (random ids) to its first token.

llama.cpp: `llama-bench` (built by benchmarks/build_llama_cpp.sh; its cache path is the default)
on the very GGUF we load, Q4_1 as shipped, and on a Q8_0 copy that `llama-quantize
--allow-requantize` makes once beside it: pp<prefill> and tg<tokens>, as many threads as ours,
in its own process. Prints a markdown table, with the CPU, its ISA, our kernel variant and the
memory bandwidth in the header.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import gptj
from gptj.loading.gguf import bundled_gguf_path, read_gguf
from gptj.quant import kernel_name

PROMPT = "Once upon a time, in a small village by the sea, there lived"
BENCH_DIR = Path("/var/tmp/gptj-bench")
LLAMA_BENCH = BENCH_DIR / "llama.cpp" / "bin" / "llama-bench"


def ours(model: gptj.Model, tokens: int) -> float:
    """Seconds per generated token, excluding the first (prefill) token."""
    stamps = []
    for _event in model.submit(PROMPT, max_new_tokens=tokens, temperature=0, ignore_eos=True):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps)


def ours_prefill(model: gptj.Model, n: int) -> float:
    """Seconds from submitting an n-token prompt (random ids, as llama-bench's pp) to its first token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.tokenizer.vocab_size - 100, (n,), generator=g).tolist()
    start = time.perf_counter()
    for _event in model.submit(ids, max_new_tokens=1, temperature=0, ignore_eos=True):
        return time.perf_counter() - start
    raise RuntimeError("no token")


def llama_bench(
    exe: Path, gguf: Path, prefill: int, tokens: int, repeats: int, threads: int
) -> tuple[dict[str, dict], bool]:
    """llama-bench's results by test ("pp512", "tg64"): mean tokens/s and its spread over `repeats`;
    and whether it ran with `--repack 0`: where its default run dies of a signal (ggml's AMX matmul,
    one of its repacked layouts, segfaulted on a Xeon with AMX), it runs again without them."""
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", str(prefill), "-n", str(tokens),
           "-r", str(repeats), "-o", "json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    repack_off = proc.returncode < 0
    if repack_off:
        cmd += ["--repack", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
    out = {}
    for r in json.loads(proc.stdout):
        name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        out[name] = {"ts": r["avg_ts"], "sd": r["stddev_ts"], "commit": r.get("build_commit", "?"),
                     "type": r.get("model_type", "?")}  # fmt: skip
    return out, repack_off


def requantized(exe: Path, src: Path, kind: str) -> Path:
    """A `kind` copy of the GGUF (llama-quantize --allow-requantize), made once in the bench dir."""
    dst = BENCH_DIR / "smollm2" / src.name.replace("Q4_1", kind)
    if not dst.exists():
        quantize = exe.parent / "llama-quantize"
        if not quantize.exists():
            raise FileNotFoundError(f"{quantize} not found (benchmarks/build_llama_cpp.sh builds it)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".part")
        proc = subprocess.run([str(quantize), "--allow-requantize", str(src), str(tmp), kind],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"llama-quantize failed: {proc.stderr.strip()[-300:]}")
        os.replace(tmp, dst)
    return dst


def machine() -> str:
    """The header's machine line: CPU, ISA, our kernel variant, memory bandwidth (bench_6b's probes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_6b import cpu_model, isa, run_worker

    bw = run_worker("bandwidth").get("bandwidth_gbs")
    bandwidth = f"{bw:.1f} GB/s" if bw else "?"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores; ISA: {isa()}; our kernels: {kernel_name()}; memory bandwidth {bandwidth}"


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
    parser.add_argument(
        "--speculative",
        default="none",
        choices=["none", "ngram"],
        help="our speculative decoding (default none: one token per pass, as llama-bench's tg)",
    )
    parser.add_argument(
        "--prefill", type=int, default=512, help="prompt tokens for the prefill column (0: none)"
    )
    parser.add_argument("--llama-bench", default=str(LLAMA_BENCH) if LLAMA_BENCH.exists() else None,
                        help="llama.cpp's llama-bench (default: benchmarks/build_llama_cpp.sh's, where built); "
                             "'' skips the llama.cpp rows")  # fmt: skip
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    threads = torch.get_num_threads()
    rows: list[tuple[str, float | None, float | None]] = []  # (engine, s/token decode, s prefill)
    if not args.no_transformers:
        ref = min(transformers_decode(args.tokens) for _ in range(args.repeats))
        rows.append(("transformers (float32, same weights)", ref, None))
    for fmt in args.formats.split(","):
        quant = "none" if fmt == "float32" else fmt  # the default for this GGUF is int8
        # no prefix cache (the prefill runs repeat a prompt), no speculation unless asked: llama-bench's
        # tg decodes one token per pass
        model = gptj.load(quantize=quant, prefix_cache=False, speculative=args.speculative)
        for fast in ("0", "1") if fmt != "float32" else ("1",):
            os.environ["GPTJ_FAST_DECODE"] = fast
            ours(model, 8)  # warm-up: kernels built, caches allocated
            best = min(ours(model, args.tokens) for _ in range(args.repeats))
            prefill = None
            if args.prefill and fast == "1":
                ours_prefill(model, 16)  # warm-up
                prefill = min(ours_prefill(model, args.prefill) for _ in range(args.repeats))
            label = "" if fmt == "float32" else ", C++ decode step" if fast == "1" else ", torch blocks"
            rows.append((f"gptj-studio ({fmt}{label})", best, prefill))
        model.engine.shutdown(grace=0)
    os.environ.pop("GPTJ_FAST_DECODE", None)
    llama_note = ""
    if args.llama_bench:
        exe, gguf = Path(args.llama_bench), bundled_gguf_path()
        if not exe.exists() and shutil.which(args.llama_bench):
            exe = Path(shutil.which(args.llama_bench))
        for kind in ("Q4_1", "Q8_0"):
            try:
                path = gguf if kind == "Q4_1" else requantized(exe, gguf, kind)
                res, repack_off = llama_bench(exe, path, args.prefill or 512, args.tokens, args.repeats, threads)
            except (OSError, RuntimeError, ValueError) as e:
                print(f"llama.cpp {kind}: {e}", file=sys.stderr)
                continue
            tg, pp = res.get(f"tg{args.tokens}"), res.get(f"pp{args.prefill or 512}")
            commit = (tg or pp or {}).get("commit", "?")
            llama_note = f"; llama.cpp {commit} (llama-cpp-python sdist), mean of {args.repeats} runs"
            rows.append(
                (
                    f"llama.cpp llama-bench ({kind}{', as shipped' if kind == 'Q4_1' else ', requantized'}"
                    f"{', --repack 0: its default run crashed here' if repack_off else ''})",
                    1 / tg["ts"] if tg else None,
                    args.prefill / pp["ts"] if pp and args.prefill else None,
                )
            )
    print(
        f"\nSmolLM2-135M-Instruct, decode {args.tokens} tokens (ours: median of each run, best of "
        f"{args.repeats}, speculative {args.speculative}{llama_note}), prefill {args.prefill} random-id tokens; "
        f"{threads} threads\n"
        f"{machine()} (GPTJ_ISA picks another)\n"
    )
    print(f"| engine | decode ms/token | decode tokens/s | prefill {args.prefill} (s) | prefill tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, pre in rows:
        d = f"{sec * 1000:.1f} | {1 / sec:.1f}" if sec else "— | —"
        p = f"{pre:.2f} | {args.prefill / pre:.0f}" if pre else "— | —"
        print(f"| {name} | {d} | {p} |")


if __name__ == "__main__":
    main()
