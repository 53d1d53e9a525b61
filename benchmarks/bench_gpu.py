"""GPT-J-6B shape on a CUDA GPU: decode ms/token and prefill through the engine, bf16 and int8.

    python benchmarks/bench_gpu.py [--prompt 512] [--tokens 64] [--modes bf16,int8]

Random weights are made on the GPU (no 12 GB checkpoint needed); transformers' GPTJForCausalLM
in bf16 on the same weights runs beside it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gptj
from gptj.api import Model
from gptj.loading import ModelInfo, build
from gptj.loading.random_checkpoint import SHAPES, gptj_config
from gptj.quant import quantize_model


def random_gptj(shape: str, device: str) -> torch.nn.Module:
    model, _ = build("gptj", gptj_config(shape))
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def time_engine(model: Model, n_prompt: int, n_new: int) -> tuple[float, float]:
    ids = torch.randint(100, 50000, (n_prompt,)).tolist()
    model.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)  # warm-up (kernel plans per shape)
    torch.cuda.synchronize()
    start = time.perf_counter()
    handle = model.submit(ids, max_new_tokens=n_new, temperature=0, ignore_eos=True)
    stamps = [time.perf_counter() for _ in handle]
    if handle.result().error:
        raise RuntimeError(handle.result().error)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[0] - start, 1000 * statistics.median(gaps)


def time_transformers(module: torch.nn.Module, n_prompt: int, n_new: int) -> tuple[float, float]:
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(**{k: v for k, v in gptj_config("6b").items() if k not in ("architectures", "model_type")})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = GPTJForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    hf.load_state_dict(module.state_dict(), strict=False)
    ids = torch.randint(100, 50000, (1, n_prompt), device="cuda")
    with torch.no_grad():
        hf(ids[:, :16])
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf(ids, use_cache=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        gaps = []
        for _ in range(n_new):
            t = time.perf_counter()
            out = hf(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            gaps.append(time.perf_counter() - t)
    return prefill, 1000 * statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default="bf16,int8")
    parser.add_argument("--shape", default="6b", choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    tokenizer = gptj.load_tokenizer("gpt-j")
    for mode in args.modes.split(","):
        module = random_gptj(args.shape, "cuda")
        if mode == "bf16" and "transformers" not in [r[0] for r in rows]:
            try:
                rows.append(("transformers bf16", *time_transformers(module, args.prompt, args.tokens)))
            except Exception as exc:  # a failed peer must not hide our own figures
                print(f"transformers: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        if mode != "bf16":
            t = time.perf_counter()
            quantize_model(module, mode)
            print(f"quantized to {mode} in {time.perf_counter() - t:.1f} s", flush=True)
        params = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        info = ModelInfo(f"random GPT-J {args.shape}", "gptj", "-", params, mode if mode != "bf16" else "none",
                         "bfloat16", 2048, "random", 50400)
        model = Model(module, tokenizer, info)
        try:
            prefill, decode = time_engine(model, args.prompt, args.tokens)
            rows.append((f"gptj-studio {mode}", prefill, decode))
        except Exception as exc:
            print(f"{mode}: {type(exc).__name__}: {exc}", flush=True)
        print(f"{mode}: peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", flush=True)
        del model, module
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"\nGPT-J {args.shape} on {torch.cuda.get_device_name()}, prompt {args.prompt}, {args.tokens} new tokens\n")
    print(f"| engine | prefill {args.prompt} (ms) | decode ms/token |")
    print("|---|---:|---:|")
    for name, prefill, decode in rows:
        print(f"| {name} | {prefill * 1000:.0f} | {decode:.1f} |")


if __name__ == "__main__":
    main()
