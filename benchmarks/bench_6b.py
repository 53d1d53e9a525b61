"""GPT-J-6B on this CPU: our engine (bf16, int8, int4) beside transformers bf16, CTranslate2
int8 and ggml's GPT-J graph (q8_0, q4_0: legacy GGML files, as KoboldCpp and ctransformers run
GPT-J), on one synthetic checkpoint in the exact Hugging Face layout, in one run.

    .venv/bin/python benchmarks/bench_6b.py            # the real 6B shape (~12 GB checkpoint)
    .venv/bin/python benchmarks/bench_6b.py --quick    # a 1B-parameter GPT-J, a few minutes
    .venv/bin/python benchmarks/bench_6b.py --shape 1b --skip ours-bf16 --skip transformers --skip ct2

Each engine runs in its own process, so its peak RSS is its own. Measured: decode ms/token
(median over the generated tokens), prefill time for a 512-token prompt, load time, peak RSS,
size on disk; plus the CPU (model, ISA, our kernel variant), the machine's memory bandwidth
(measured again after each engine) and the decode floor it sets for each weight size (the weights
alone, and with the 16-bit KV cache a token's attention reads at the decode's mean position).
Our quantized engines also time their decode against a streaming read of their weights' bytes,
the two taking turns in one process: a floor ratio that the VM's drifting bandwidth cannot skew.
Prints a markdown table and writes a PNG chart next to the checkpoints.

The ggml rows need `pip install --no-deps ctransformers==0.2.27` (its prebuilt AVX2 library; they
are skipped without it): benchmarks/ggml_gptj.py converts the checkpoint to the GGML files once
(kept beside it), and ctransformers runs them with every core, the prompt in one batch where
ggml's buffer sizing allows it (6B), else in the longest batches it allows (the 1B shape: 32).

`--isa avx2` (or any GPTJ_ISA variant) holds every engine to that instruction set where it can be
told: ours through GPTJ_ISA, CTranslate2 through CT2_FORCE_CPU_ISA and oneDNN's
ONEDNN_MAX_CPU_ISA (its int8 GEMM off Intel CPUs), torch through ATEN_CPU_CAPABILITY. ggml's
prebuilt library is an AVX2 build already. A machine with more then stands in for one with less.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# GPTJ_ISA variant -> (CT2_FORCE_CPU_ISA, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)
PEER_ISA = {
    "avx2": ("AVX2", "AVX2", "avx2"),
    "avxvnni": ("AVX2", "AVX2_VNNI", "avx2"),
    "avx512": ("AVX512", "AVX512_CORE", "avx512"),
    "avx512vnni": ("AVX512", "AVX512_CORE_VNNI", "avx512"),
    "amx": ("AVX512", "AVX512_CORE_AMX", "avx512"),
}


def force_isa(variant: str) -> None:
    """Holds this process's workers (they inherit the environment) to one instruction set."""
    ct2, onednn, aten = PEER_ISA[variant]
    os.environ.update(
        GPTJ_ISA=variant, CT2_FORCE_CPU_ISA=ct2, ONEDNN_MAX_CPU_ISA=onednn, ATEN_CPU_CAPABILITY=aten
    )


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the RSS of the
    parent at fork, so every worker would report at least the driver's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def folder_gb(path: Path) -> float:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".bin", ".safetensors"))
        / 1e9
    )


def prompt_ids(n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 50000, (n,), generator=g).tolist()


def cpu_model() -> str:
    """/proc/cpuinfo's model name, with the family/model numbers (a VM may hide the name)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        return "unknown CPU"
    return f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


# the x86 features that decide which kernels run, in the order they arrived
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip


def isa(flags: frozenset[str] | None = None) -> str:
    if flags is None:
        from gptj.kernels import cpu_flags

        flags = cpu_flags()
    return " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"


# ---- workers: each runs in a fresh process and prints one JSON line ---------------------------------


def work_ours(ckpt: str, mode: str, n_prompt: int, n_new: int, speculative: str = "none", weight_bytes: int = 0) -> dict:
    import torch

    import gptj

    # no prefix cache (the warm-up prompt is the measured one's first 8 tokens); speculation only
    # when asked: the peers decode one token per pass
    opts = {"progress": False, "prefix_cache": False, "speculative": speculative}
    t0 = time.perf_counter()
    if mode == "bf16":
        model = gptj.load(ckpt, dtype=torch.bfloat16, **opts)
    else:
        model = gptj.load(ckpt, **opts)  # a `gptj quantize` checkpoint
    load_s = time.perf_counter() - t0
    model.generate(prompt_ids(8), max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up (kernels)
    ids = prompt_ids(n_prompt)
    start = time.perf_counter()
    stamps = [
        time.perf_counter() for _ in model.submit(ids, max_new_tokens=n_new, temperature=0, ignore_eos=True)
    ]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    from gptj.quant import kernel_name

    result = {"load_s": load_s, "prefill_s": stamps[0] - start, "decode_ms": 1000 * statistics.median(gaps),
              "kernels": kernel_name(), "peak_rss_gb": peak_rss_gb()}  # fmt: skip
    if weight_bytes:  # (the driver's count, for the quantized engines)
        result["decode_vs_read"] = decode_vs_read(model, weight_bytes)
    return result


def decode_vs_read(model: Any, weight_bytes: int, rounds: int = 6, tokens: int = 9) -> float | None:
    """Decode time per token over the time of a streaming read of the weights' bytes, the two
    taking turns in this process (short context: the weights alone): a floor ratio that the VM's
    drifting bandwidth moves on both sides alike. Read over 1 GiB and scaled, so the worker's
    peak RSS (taken before) stays the engine's own."""
    from gptj.memory import huge_page_empty

    read = streaming_read()
    if read is None:
        return None
    buf = huge_page_empty(1 << 30)
    buf.fill_(1)
    ratios = []
    for _ in range(rounds):
        t = time.perf_counter()
        read(buf)
        read_s = (time.perf_counter() - t) * weight_bytes / buf.nbytes
        stamps = [time.perf_counter() for _ in model.submit(prompt_ids(8), max_new_tokens=tokens, temperature=0,
                                                            ignore_eos=True)]  # fmt: skip
        ratios.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)) / read_s)
    return statistics.median(ratios)


def work_transformers(ckpt: str, n_prompt: int, n_new: int) -> dict:
    import torch
    from transformers import GPTJForCausalLM

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = GPTJForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(n_prompt)])
    t = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - t
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    gaps = []
    for _ in range(n_new):
        t = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        gaps.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_ms": 1000 * statistics.median(gaps)}


def work_ct2(ct2_dir: str, n_prompt: int, n_new: int) -> dict:
    import ctranslate2

    t0 = time.perf_counter()
    gen = ctranslate2.Generator(ct2_dir, device="cpu", compute_type="int8", intra_threads=os.cpu_count() or 2)
    load_s = time.perf_counter() - t0
    vocab = json.loads((Path(ct2_dir) / "vocabulary.json").read_text())
    tokens = [vocab[i] for i in prompt_ids(n_prompt)]  # CTranslate2 takes token strings
    gen.generate_batch([tokens[:8]], max_length=2, sampling_topk=1, include_prompt_in_result=False)
    t = time.perf_counter()
    gen.generate_batch([tokens], max_length=1, sampling_topk=1, include_prompt_in_result=False)
    prefill_s = time.perf_counter() - t
    stamps = []
    t = time.perf_counter()
    for _step in gen.generate_tokens(tokens, max_length=n_new, sampling_topk=1):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_ms": 1000 * statistics.median(gaps)}


def work_ggml(path: str, ids_file: str, n_new: int) -> dict:
    """ggml's GPT-J graph (ctransformers 0.2.27's prebuilt library) on a legacy GGML file. No torch
    in this process: the prompt comes from a file, so the peak RSS is ggml's own."""
    from ctransformers import AutoModelForCausalLM

    ids = json.loads(Path(ids_file).read_text())
    with open("/proc/cpuinfo") as f:
        lib = "avx2" if " avx2 " in f.read() else "basic"
    t0 = time.perf_counter()
    llm = AutoModelForCausalLM.from_pretrained(path, model_type="gptj", lib=lib, threads=os.cpu_count() or 2,
                                               context_length=len(ids) + n_new + 16)  # fmt: skip
    load_s = time.perf_counter() - t0
    # ggml's gpt-j graph (ctransformers keeps main.cpp's scheme) runs its first eval in a fixed
    # 256 MB buffer, then grows it to 1.1 x (bytes per token of that first eval) x batch where that
    # is more (it never shrinks). Activations are ~36 n_embd-float vectors per layer and token plus
    # the logits; the attention scores, n_head floats per layer, token and token of context, are
    # what the 10% has to cover. Where they do not ("not enough space in the context's memory
    # pool": an abort; the 1B shape at 512 tokens), batches that fit the 256 MB whole are the
    # only ones that work, so the prompt goes in those (powers of two); else in one batch (6B).
    with open(path, "rb") as f:
        n_vocab, _, n_embd, n_head, n_layer, _, _ = struct.unpack("<7i", f.read(32)[4:])
    per_token, scores = n_layer * 36 * n_embd * 4 + n_vocab * 4, n_layer * n_head * 4 * len(ids)
    batch = len(ids)
    if scores > 0.08 * per_token:
        batch = 1 << max(0, (200_000_000 // (per_token + scores)).bit_length() - 1)
    llm.eval(ids[: max(4, min(32, 200_000_000 // per_token))])  # the warm-up that sizes the buffer
    llm._context.clear()  # LLM.reset() without its deprecation warning
    llm.ctransformers_llm_reset()

    def step() -> int:
        return llm.sample(top_k=1, repetition_penalty=1.0)

    t = time.perf_counter()
    llm.eval(ids, batch_size=batch)
    token = step()
    prefill_s = time.perf_counter() - t
    gaps = []
    for _ in range(n_new - 1):
        t = time.perf_counter()
        llm.eval([token])
        token = step()
        gaps.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_ms": 1000 * statistics.median(gaps), "kernels": lib,
            "batch": batch}  # fmt: skip


def work_ggml_convert(src: str, dst: str, kind: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ggml_gptj import convert

    t = time.perf_counter()
    convert(src, dst, kind)
    return {"convert_s": time.perf_counter() - t}


def work_quantize(src: str, dst: str, bits: int) -> dict:
    from gptj.loading.quantized import write_quantized

    t = time.perf_counter()
    write_quantized(src, dst, bits)
    return {"quantize_s": time.perf_counter() - t}


_READ_SOURCE = Path(__file__).with_name("bench_read.cpp")  # the streaming read behind the floor


def work_bandwidth() -> dict:
    """Memory read bandwidth over 2 GiB (past the last-level cache): the best of torch's sum and
    a native streaming read (where a compiler is at hand)."""
    import torch

    from gptj import kernels

    a = torch.ones(1 << 29)  # 2 GiB of float32
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))

    read = streaming_read()  # None: memory bandwidth from torch's sum only
    if read is not None:
        for _ in range(5):
            t = time.perf_counter()
            read(a)
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return {"bandwidth_gbs": best / 1e9, "variant": kernels.active_variant()}


def streaming_read(variant: str | None = None) -> Callable[[Any], object] | None:
    """read(tensor): a streaming read of the tensor's bytes on every thread (bench_read.cpp, built
    with `variant`'s flags, the active one's by default); None where it cannot be built."""
    import ctypes

    import torch

    from gptj import kernels

    lib = kernels.build_source(_READ_SOURCE.read_text(), "bench_read", variant)
    if lib is None:
        return None
    lib.bench_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.bench_read.restype = ctypes.c_int
    threads = torch.get_num_threads()
    return lambda t: lib.bench_read(t.data_ptr(), t.nbytes, threads)


def worker_main(argv: list[str]) -> None:
    kind, *rest = argv
    fn = {
        "ours": work_ours,
        "transformers": work_transformers,
        "ct2": work_ct2,
        "ggml": work_ggml,
        "ggml-convert": work_ggml_convert,
        "quantize": work_quantize,
        "bandwidth": work_bandwidth,
    }[kind]
    args = [int(a) if a.isdigit() else a for a in rest]
    result = fn(*args)
    result.setdefault("peak_rss_gb", peak_rss_gb())
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(*args: object, timeout: int = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def run_ct2_convert(ckpt: Path, out: Path) -> dict:
    """Peak RSS of the converter, read from its own rusage via /usr/bin/time-like wrapper."""
    code = (
        "import resource, subprocess, sys, json, time; t = time.perf_counter();"
        f"r = subprocess.run(['{Path(sys.executable).parent / 'ct2-transformers-converter'}', '--model', '{ckpt}', "
        f"'--output_dir', '{out}', '--quantization', 'int8', '--force'], capture_output=True, text=True);"
        "print('RESULT ' + json.dumps({'convert_s': time.perf_counter() - t, 'rc': r.returncode, "
        "'err': r.stderr[-300:], 'peak_rss_gb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": proc.stderr[-300:]}


# ---- the driver -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="GPT-J-6B on this CPU, beside the peers.")
    parser.add_argument("--quick", action="store_true", help="a 1B-parameter GPT-J instead of 6B")
    parser.add_argument(
        "--shape", default=None, choices=["tiny", "small", "1b", "6b"], help="any checkpoint shape"
    )
    parser.add_argument(
        "--dir", default="/var/tmp/gptj-bench", help="where checkpoints are written (kept for reruns)"
    )
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=24, help="generated tokens per engine")
    parser.add_argument(
        "--speculative",
        default="none",
        choices=["none", "ngram"],
        help="our speculative decoding (default none: one token per pass, as the peers)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="skip an engine: ours-bf16, ours-int8, ours-int4, transformers, ct2, ggml (both), ggml-q8_0, ggml-q4_0",
    )
    parser.add_argument(
        "--isa",
        choices=sorted(PEER_ISA),
        help="hold every engine to one instruction set (ours via GPTJ_ISA, the peers' nearest level)",
    )
    args = parser.parse_args()
    if args.isa:
        force_isa(args.isa)

    from gptj.loading.random_checkpoint import make_random_checkpoint

    shape = args.shape or ("1b" if args.quick else "6b")
    base = Path(args.dir) / shape
    src = base / "hf-float16"
    if not (src / "pytorch_model.bin").exists():
        print(f"writing a random GPT-J ({shape}) in the float16 revision's layout to {src} ...", flush=True)
        make_random_checkpoint(src, shape, "bin")
    rows: list[dict] = []
    machine = run_worker("bandwidth")
    bw = machine["bandwidth_gbs"]
    last_bw = bw

    def add(row: dict) -> None:
        """Appends an engine's row with the bandwidth around its run, the mean of the measurements
        just before and just after it: a VM's bandwidth can move by a third within minutes, and
        the floor is only as good as the bandwidth it is taken from."""
        nonlocal last_bw
        after = run_worker("bandwidth").get("bandwidth_gbs", last_bw)
        row["bandwidth_gbs"] = (last_bw + after) / 2
        last_bw = after
        rows.append(row)

    config = json.loads((src / "config.json").read_text())
    n_params = _param_count(config)
    # what a token's attention reads besides the weights: 16-bit keys and values of every layer at
    # the decode's mean position (our cache and ggml's are 16-bit)
    kv_bytes = config["n_layer"] * 2 * config["n_embd"] * 2 * (args.prompt + args.tokens / 2)
    import torch

    from gptj.loading import bytes_per_weight  # int4: a byte per 2 weights, an fp16 scale and min per 32

    for bits, mode in ((8, "int8"), (4, "int4")):
        name = f"ours-{mode}"
        if name in args.skip:
            continue
        qdir = base / f"gptj-{mode}"
        q = run_worker("quantize", src, qdir, bits) if not (qdir / "model.safetensors").exists() else {}
        weight_bytes = round(n_params * bytes_per_weight(mode, torch.bfloat16))
        r = run_worker("ours", qdir, mode, args.prompt, args.tokens, args.speculative, weight_bytes)
        add(
            {
                "engine": f"gptj-studio {mode}",
                **r,
                "quantize_peak_gb": q.get("peak_rss_gb"),
                "disk_gb": folder_gb(qdir),
                "weight_bytes": weight_bytes,
            }
        )
    if "ours-bf16" not in args.skip:
        r = run_worker("ours", src, "bf16", args.prompt, args.tokens, args.speculative)
        add(
            {"engine": "gptj-studio bf16", **r, "disk_gb": folder_gb(src), "weight_bytes": n_params * 2}
        )
    if "transformers" not in args.skip:
        r = run_worker("transformers", src, args.prompt, args.tokens)
        add(
            {"engine": "transformers bf16", **r, "disk_gb": folder_gb(src), "weight_bytes": n_params * 2}
        )
    if "ct2" not in args.skip and shutil.which(
        str(Path(sys.executable).parent / "ct2-transformers-converter")
    ):
        ct2_dir = base / "ct2-int8"
        conv = run_ct2_convert(src, ct2_dir) if not (ct2_dir / "model.bin").exists() else {}
        r = run_worker("ct2", ct2_dir, args.prompt, args.tokens)
        add(
            {
                "engine": "CTranslate2 4.8.5 int8",
                **r,
                "quantize_peak_gb": conv.get("peak_rss_gb"),
                "disk_gb": sum(f.stat().st_size for f in ct2_dir.iterdir()) / 1e9
                if ct2_dir.exists()
                else None,
                "weight_bytes": n_params * 1.0,
            }
        )
    if "ggml" not in args.skip and importlib.util.find_spec("ctransformers") is not None:
        from importlib.metadata import version

        ids_file = base / f"prompt-{args.prompt}.json"
        ids_file.write_text(json.dumps(prompt_ids(args.prompt)))
        for kind, block_bytes in (("q8_0", 34), ("q4_0", 18)):  # bytes per block of 32 weights
            if f"ggml-{kind}" in args.skip:
                continue
            path = base / f"ggml-{kind}.bin"
            conv = run_worker("ggml-convert", src, path, kind) if not path.exists() else {}
            r = run_worker("ggml", path, ids_file, args.tokens)
            add({"engine": f"ggml gpt-j {kind} (ctransformers {version('ctransformers')}, {r.get('kernels', '?')} build)",
                         **r, "quantize_peak_gb": conv.get("peak_rss_gb"),
                         "disk_gb": path.stat().st_size / 1e9 if path.exists() else None,
                         "weight_bytes": n_params * block_bytes / 32})  # fmt: skip

    variant = next((r["kernels"] for r in rows if r["engine"].startswith("gptj-studio") and "kernels" in r),
                   machine.get("variant", "?"))  # fmt: skip
    print(
        f"\nGPT-J ({shape} shape, {n_params / 1e9:.2f}B params, random weights), prompt {args.prompt} tokens, "
        f"{args.tokens} generated (ours: speculative {args.speculative}).\nCPU: {cpu_model()}, {os.cpu_count()} cores; ISA: {isa()}; "
        f"memory bandwidth {bw:.1f} GB/s at the start (each engine's floor: the bandwidth measured around "
        f"its run); our kernels: {variant}"
        + (
            f"; every engine held to {args.isa} (CTranslate2 {PEER_ISA[args.isa][0]}, oneDNN {PEER_ISA[args.isa][1]})"
            if args.isa
            else ""
        )
        + "\n"
    )
    print(
        f"| engine | decode ms/token | floor ms/token | floor + 16-bit KV cache | bandwidth (GB/s) | decode / read, alternated | prefill {args.prompt} (s) | load (s) | peak RSS (GB) | convert peak (GB) | disk (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        floor = r["weight_bytes"] / (r["bandwidth_gbs"] * 1e9) * 1000
        floor_kv = (r["weight_bytes"] + kv_bytes) / (r["bandwidth_gbs"] * 1e9) * 1000
        print(
            f"| {r['engine']} | {_f(r.get('decode_ms'))} | {floor:.0f} | {floor_kv:.0f} | {r['bandwidth_gbs']:.1f} | {_f(r.get('decode_vs_read'), 2)} | {_f(r.get('prefill_s'), 1)} | "
            f"{_f(r.get('load_s'), 1)} | {_f(r.get('peak_rss_gb'), 1)} | {_f(r.get('quantize_peak_gb'), 1)} | {_f(r.get('disk_gb'), 1)} |"
            + (f" error: {r['error']}" if "error" in r else "")
        )
    for r in rows:
        if r.get("batch") and r["batch"] < args.prompt:
            print(f"\n{r['engine']}: the prompt in batches of {r['batch']} tokens, the longest whose memory "
                  "ggml's gpt-j graph sizes right (one batch of all of it aborts)")  # fmt: skip
    if _chart(rows, bw, base / "bench.png", shape):
        print(f"\nchart: {base / 'bench.png'}")


def _param_count(config: dict) -> int:
    from gptj.loading import build

    model, _ = build("gptj", config)
    return sum(p.numel() for p in model.parameters())


def _f(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _chart(rows: list[dict], bw: float, path: Path, shape: str) -> bool:
    """Writes the chart; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.get("decode_ms")]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["engine"] for r in ok]
    ax.barh(names, [r["decode_ms"] for r in ok], color="#5b5bd6", label="decode ms/token")
    ax.scatter(
        [r["weight_bytes"] / (bw * 1e9) * 1000 for r in ok],
        names,
        color="#d33",
        marker="|",
        s=400,
        label=f"bandwidth floor ({bw:.0f} GB/s)",
        zorder=3,
    )
    ax.set_xlabel("ms per generated token (lower is better)")
    ax.set_title(f"GPT-J {shape} decode on this CPU")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
