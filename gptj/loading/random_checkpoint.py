"""Random GPT-J checkpoints in the exact Hugging Face layout.

Real weights cannot be downloaded everywhere (CI, this project's machines), so tests and
benchmarks write random ones with the same files, names, dtypes and sizes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "tiny": dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8),
    "small": dict(n_embd=512, n_head=8, n_layer=4, rotary_dim=32),
    "1b": dict(n_embd=2048, n_head=16, n_layer=16, rotary_dim=64),
    "6b": dict(n_embd=4096, n_head=16, n_layer=28, rotary_dim=64),
}
FORMATS = ("bin", "safetensors", "sharded-safetensors", "sharded-bin")


def gptj_config(shape: str | dict, vocab_size: int = 50400, n_positions: int = 2048) -> dict:
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    # The keys and values of EleutherAI/gpt-j-6b's config.json.
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "activation_function": "gelu_new",
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "embd_pdrop": 0.0,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "n_inner": None,
        "n_positions": n_positions,
        "resid_pdrop": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": vocab_size,
        **dims,
    }


def random_tensors(config: dict, dtype: torch.dtype, seed: int, with_buffers: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) in checkpoint order, one layer at a time."""
    g = torch.Generator().manual_seed(seed)
    d, vocab, n_pos = config["n_embd"], config["vocab_size"], config["n_positions"]
    inner = config.get("n_inner") or 4 * d

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(kind: str) -> torch.Tensor:
        return (1 + normal(d, std=0.1)) if kind == "weight" else normal(d, std=0.1)

    yield "transformer.wte.weight", normal(vocab, d)
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", norm("weight")
        yield p + "ln_1.bias", norm("bias")
        if with_buffers:  # what the float16 revision's pickle carries
            yield p + "attn.bias", torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
            yield p + "attn.masked_bias", torch.tensor(-1e9)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield p + f"attn.{proj}.weight", normal(d, d)
        yield p + "mlp.fc_in.weight", normal(inner, d)
        yield p + "mlp.fc_in.bias", normal(inner)
        yield p + "mlp.fc_out.weight", normal(d, inner)
        yield p + "mlp.fc_out.bias", normal(d)
    yield "transformer.ln_f.weight", norm("weight")
    yield "transformer.ln_f.bias", norm("bias")
    yield "lm_head.weight", normal(vocab, d)
    yield "lm_head.bias", normal(vocab)


def make_random_checkpoint(
    out: str | Path,
    shape: str | dict = "tiny",
    fmt: str = "bin",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    vocab_size: int = 50400,
    n_positions: int = 2048,
    shard_bytes: int = 2_000_000_000,
) -> Path:
    """Writes config.json and weights in one of FORMATS; returns the folder."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = gptj_config(shape, vocab_size, n_positions)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(out)
    safetensors = "safetensors" in fmt
    tensors = random_tensors(config, dtype, seed, with_buffers=not safetensors)
    if not fmt.startswith("sharded"):
        state = dict(tensors)
        if safetensors:
            from safetensors.torch import save_file

            save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        else:
            torch.save(state, out / "pytorch_model.bin")
        return out
    _write_shards(out, tensors, safetensors, shard_bytes)
    return out


def write_tokenizer_files(out: Path) -> None:
    """The tokenizer files of EleutherAI/gpt-j-6b: GPT-2's BPE plus 143 added tokens (50400 ids)."""
    from gptj.tokenizer import gpt2_vocab_files

    encoder, bpe = gpt2_vocab_files()
    (out / "vocab.json").write_bytes(encoder.read_bytes())
    (out / "merges.txt").write_bytes(bpe.read_bytes())
    added = {f"<|extratoken_{k}|>": 50256 + k for k in range(1, 144)}
    (out / "added_tokens.json").write_text(json.dumps(added))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048, "add_prefix_space": False, **special,
    }))


def _write_shards(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], safetensors: bool, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    base, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{base}-{i:05d}-of-{len(shards):05d}.{ext}"
        if safetensors:
            from safetensors.torch import save_file

            save_file(shard, out / fname, metadata={"format": "pt"})
        else:
            torch.save(shard, out / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))
