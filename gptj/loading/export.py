"""`gptj quantize SRC DST.gguf --format gguf`: a GGUF file (Q8_0, or Q4_1) of any model gptj
loads (a Hugging Face folder, a GGUF, a legacy GGML GPT-J file), written tensor by tensor.

What is written is what llama.cpp's convert_hf_to_gguf.py (and llama-quantize) would write, so
that llama.cpp reads Llama-family files too:

* `llama`: the `llama.*` keys, `blk.N.attn_q` ... tensor names, the q and k rows permuted for
  ggml's rope (gptj.loading.gguf.permute_qk), no `output.weight` when the embeddings are tied;
  the tokenizer as `tokenizer.ggml.*` (copied from a GGUF source; from tokenizer.json: 'gpt2'
  byte-level BPE with its pre-tokenizer named, or a SentencePiece 'llama' vocab).
* `gptj` (gguf-py's MODEL_ARCH.GPTJ; llama.cpp has the name but no graph for it): the `gptj.*`
  keys and gguf-py's GPT-J tensor names, q and k as they are (GPT-J's rope rotates adjacent pairs
  like ggml's), with GPT-J's GPT-2 vocabulary.

2-D weights become Q8_0 (`--bits 8`) or Q4_1 (`--bits 4`; the embeddings and the output layer
stay Q8_0, as llama-quantize keeps them at higher precision); rows that are not a multiple of 32
values stay F16; 1-D tensors (norms, biases) F32. The file goes to a temporary name beside DST
and is renamed into place at the end: DST is never half-written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from gptj.errors import ModelLoadError

QUANT_TYPES = {8: T.Q8_0, 4: T.Q4_1}
FILE_TYPES = {8: gguf.LlamaFileType.MOSTLY_Q8_0, 4: gguf.LlamaFileType.MOSTLY_Q4_1}
KEEP_Q8 = ("token_embd.weight", "output.weight")  # at --bits 4


class _Source:
    """A model's config, tokenizer metadata and weights, in the order the source file has them."""

    def __init__(self, name: str, arch: str, config: dict[str, Any], order: list[tuple[str, tuple[int, ...]]],
                 stream: Callable[[], Iterator[tuple[str, torch.Tensor]]], tokenizer: dict[str, tuple[Any, V, V | None]],
                 qk_permuted: bool = False) -> None:
        self.name, self.arch, self.config, self.order, self.stream = name, arch, config, order, stream
        self.tokenizer = tokenizer  # key -> (value, type, array element type)
        self.qk_permuted = qk_permuted


def write_gguf(src: str, dst: str | Path, bits: int = 8, progress: bool = False) -> Path:
    """Writes SRC (a name gptj.load takes) as a GGUF file at DST; returns DST."""
    from gptj.loading import resolve

    if bits not in QUANT_TYPES:
        raise ModelLoadError(f"--format gguf takes --bits 8 (Q8_0) or 4 (Q4_1), got {bits}")
    out = Path(dst)
    if out.is_dir() or (out.exists() and out.suffix.lower() != ".gguf"):
        raise ModelLoadError(f"{out} exists and is not a .gguf file; choose another destination")
    path = resolve(src)
    source = _open_source(path, src)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        _write(tmp, source, bits, progress)
        os.replace(tmp, out)
    except BaseException:  # an error or Ctrl-C: nothing partial stays
        tmp.unlink(missing_ok=True)
        raise
    return out


# ------------------------------------------------------------------------------------- sources


def _open_source(path: Path, display: str) -> _Source:
    from gptj.loading import file_kind
    from gptj.loading.resolve import model_name

    name = model_name(display)
    if path.is_file():
        kind = file_kind(path)
        if kind == "gguf":
            from gptj.loading.gguf import open_gguf

            gg = open_gguf(path)
            order = [(e.name, e.shape) for e in gg.entries]
            tok = _gguf_tokenizer_fields(gg.reader)
            # tensors() un-permutes llama's q/k: they are permuted again when written
            return _Source(name, gg.arch, gg.config, order, lambda: gg.tensors(torch.float32), tok)
        if kind == "ggml":
            from gptj.loading.ggml import open_ggml

            gm = open_ggml(path)
            order = [(t.name, t.shape[::-1] if gm.transposed and t.name.endswith(_transposed()) else t.shape)
                     for t in gm.table if not t.name.endswith((".attn.bias", ".attn.masked_bias"))]
            from gptj.tokenizer import ggml_vocab_metadata, is_gptj_vocab

            tok = (_gptj_tokenizer_fields(gm.config) if is_gptj_vocab(gm.pieces)
                   else _typed(ggml_vocab_metadata(gm.pieces)))
            return _Source(name, "gptj", gm.config, order, lambda: gm.tensors(torch.float32), tok)
        raise ModelLoadError(f"{path} is not a model file gptj can read (GGUF, GGML)")
    from gptj.loading.config import read_config, validate_config
    from gptj.loading.weights import iter_tensors, weight_files

    files, fmt = weight_files(path)
    config = read_config(path / "config.json")
    arch = config.get("model_type")
    if arch not in ("gptj", "llama"):
        raise ModelLoadError(f"{path / 'config.json'}: unknown architecture {arch!r} (model_type)")
    validate_config(arch, config, path / "config.json")
    if (config.get("quantization_config") or {}).get("mode"):
        raise ModelLoadError(f"{path} is a `gptj quantize` int8/int4 checkpoint; write the GGUF from the model it "
                             "was made from")
    order = _hf_order(files, fmt)
    tok = _gptj_tokenizer_fields(config) if arch == "gptj" else _hf_tokenizer_fields(path, config)
    return _Source(name, arch, config, order, lambda: iter_tensors(files, fmt), tok)


def _transposed() -> tuple[str, ...]:
    from gptj.loading.ggml import TRANSPOSED

    return TRANSPOSED


def _skip(name: str) -> bool:
    return name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))


def _hf_order(files: list[Path], fmt: str) -> list[tuple[str, tuple[int, ...]]]:
    order: list[tuple[str, tuple[int, ...]]] = []
    try:
        for f in files:
            if fmt == "safetensors":
                from safetensors import safe_open

                with safe_open(f, framework="pt") as st:
                    order += [(k, tuple(st.get_slice(k).get_shape())) for k in st.keys()]  # noqa: SIM118
            else:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    state = torch.load(f, map_location="cpu", weights_only=True)
                order += [(k, tuple(v.shape)) for k, v in state.items()]
                del state
    except Exception as exc:
        raise ModelLoadError(f"weight file {f} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return order


# ---------------------------------------------------------------------------------- tokenizers


def _gguf_tokenizer_fields(reader: Any) -> dict[str, tuple[Any, V, V | None]]:
    """The tokenizer.* keys of a GGUF, with their value types, to copy as they are."""
    fields: dict[str, tuple[Any, V, V | None]] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = V(field.types[0])
        sub = V(field.types[1]) if vtype == V.ARRAY and len(field.types) > 1 else None
        fields[key] = (field.contents(), vtype, sub)
    return fields


def _typed(meta: dict[str, Any]) -> dict[str, tuple[Any, V, V | None]]:
    """GGUF value types for plain tokenizer metadata (strings, ids, lists of them)."""
    fields: dict[str, tuple[Any, V, V | None]] = {}
    for key, value in meta.items():
        if isinstance(value, str):
            fields[key] = (value, V.STRING, None)
        elif isinstance(value, bool):
            fields[key] = (value, V.BOOL, None)
        elif isinstance(value, int):
            fields[key] = (value, V.UINT32, None)
        elif value and isinstance(value[0], str):
            fields[key] = (value, V.ARRAY, V.STRING)
        elif value:
            fields[key] = (value, V.ARRAY, V.FLOAT32 if isinstance(value[0], float) else V.INT32)
    return fields


def _str_array(values: list[str]) -> tuple[list[str], V, V]:
    return values, V.ARRAY, V.STRING


def _gptj_tokenizer_fields(config: dict[str, Any]) -> dict[str, tuple[Any, V, V | None]]:
    """GPT-J's vocabulary as a 'gpt2' GGUF tokenizer: GPT-2's 50257 tokens and merges, then
    <|extratoken_1..143|> (control tokens: padding), as HF's GPT-J tokenizer has them."""
    from gptj.tokenizer import GPTJ_EXTRA_TOKENS, gpt2_vocab_files

    encoder, bpe = gpt2_vocab_files()
    vocab: dict[str, int] = json.loads(encoder.read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.__getitem__)
    tokens += [f"<|extratoken_{k}|>" for k in range(1, GPTJ_EXTRA_TOKENS + 1)]
    eos = vocab["<|endoftext|>"]
    types = [int(gguf.TokenType.CONTROL) if i >= eos else int(gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = [line for line in bpe.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#version")]
    return {
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": ("gpt-2", V.STRING, None),
        "tokenizer.ggml.tokens": _str_array(tokens),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": _str_array(merges),
        "tokenizer.ggml.bos_token_id": (eos, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (eos, V.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL, None),
    }


def _hf_tokenizer_fields(folder: Path, config: dict[str, Any]) -> dict[str, tuple[Any, V, V | None]]:
    """A Hugging Face tokenizer.json as GGUF tokenizer metadata: byte-level BPE as 'gpt2' (its
    pre-tokenizer named as llama.cpp names it), a SentencePiece-style BPE (byte fallback, "▁")
    as 'llama' with scores that rank pieces as the merges do."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json; a GGUF needs the tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelLoadError(f"{path}: a {model.get('type')!r} tokenizer cannot be written to GGUF (BPE only)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    n = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = int(gguf.TokenType.NORMAL)
    for t in added.values():
        types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}

    def token_of(key: str) -> int | None:
        value = tok_cfg.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in vocab:
            return vocab[value]
        value = config.get(f"{key}_token_id")
        return value[0] if isinstance(value, list) else value

    fields: dict[str, tuple[Any, V, V | None]] = {}
    if model.get("byte_fallback"):  # SentencePiece converted (Llama 2, TinyLlama, Mistral)
        unk = model.get("unk_token")
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types[i] = int(gguf.TokenType.BYTE)
            elif t == unk:
                types[i] = int(gguf.TokenType.UNKNOWN)
        # SentencePiece scores: the merges rank pieces by id (score -id), as sentencepiece did
        scores = [-float(i) if k == gguf.TokenType.NORMAL else 0.0 for i, k in enumerate(types)]
        normalizer = json.dumps(tj.get("normalizer") or {})
        pre = json.dumps(tj.get("pre_tokenizer") or {})
        space_prefix = "Prepend" in normalizer or ('"Metaspace"' in pre and '"never"' not in pre)
        fields |= {
            "tokenizer.ggml.model": ("llama", V.STRING, None),
            "tokenizer.ggml.pre": ("default", V.STRING, None),
            "tokenizer.ggml.tokens": _str_array(tokens),
            "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.add_space_prefix": (space_prefix, V.BOOL, None),
        }
        if unk in vocab:
            fields["tokenizer.ggml.unknown_token_id"] = (vocab[unk], V.UINT32, None)
        add_bos = tok_cfg.get("add_bos_token", True)
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        fields |= {
            "tokenizer.ggml.model": ("gpt2", V.STRING, None),
            "tokenizer.ggml.pre": (_pre_name(tj.get("pre_tokenizer"), path), V.STRING, None),
            "tokenizer.ggml.tokens": _str_array(tokens),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.merges": _str_array(merges),
        }
        add_bos = tok_cfg.get("add_bos_token", False)
    for key, gkey in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = token_of(key)
        if value is not None:
            fields[f"tokenizer.ggml.{gkey}"] = (int(value), V.UINT32, None)
    fields["tokenizer.ggml.add_bos_token"] = (bool(add_bos), V.BOOL, None)
    if isinstance(tok_cfg.get("chat_template"), str):
        fields["tokenizer.chat_template"] = (tok_cfg["chat_template"], V.STRING, None)
    return fields


def _pre_name(pre: Any, path: Path) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.ggml.pre)."""
    text = json.dumps(pre or {})
    if "\\\\p{N}{1,3}" in text and '"Split"' in text:
        return "llama-bpe"  # Llama 3's regex
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"  # SmolLM2 / StarCoder: digits one by one, then GPT-2's regex
    if '"ByteLevel"' in text and '"Split"' not in text:
        return "gpt-2"
    print(f"gptj: warning: {path}: pre-tokenizer not recognised; written as 'default' (GPT-2's)", file=sys.stderr)
    return "default"


# ------------------------------------------------------------------------------------ writing


def _arch_fields(arch: str, config: dict[str, Any]) -> dict[str, tuple[Any, V]]:
    if arch == "gptj":
        from gptj.models.gptj import GPTJConfig

        c = GPTJConfig.from_dict(config)
        return {
            "gptj.vocab_size": (c.vocab_size, V.UINT32),
            "gptj.context_length": (c.n_positions, V.UINT32),
            "gptj.embedding_length": (c.n_embd, V.UINT32),
            "gptj.feed_forward_length": (c.n_inner or 4 * c.n_embd, V.UINT32),
            "gptj.block_count": (c.n_layer, V.UINT32),
            "gptj.attention.head_count": (c.n_head, V.UINT32),
            "gptj.rope.dimension_count": (c.rotary_dim, V.UINT32),
            "gptj.attention.layer_norm_epsilon": (float(c.layer_norm_epsilon), V.FLOAT32),
        }
    from gptj.models.llama import LlamaConfig

    c = LlamaConfig.from_dict(config)
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    fields = {
        "llama.vocab_size": (c.vocab_size, V.UINT32),
        "llama.context_length": (c.max_position_embeddings, V.UINT32),
        "llama.embedding_length": (c.hidden_size, V.UINT32),
        "llama.block_count": (c.num_hidden_layers, V.UINT32),
        "llama.feed_forward_length": (c.intermediate_size, V.UINT32),
        "llama.rope.dimension_count": (head_dim, V.UINT32),
        "llama.attention.head_count": (c.num_attention_heads, V.UINT32),
        "llama.attention.head_count_kv": (c.num_key_value_heads or c.num_attention_heads, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (float(c.rms_norm_eps), V.FLOAT32),
        "llama.rope.freq_base": (float(c.rope_theta), V.FLOAT32),
    }
    if head_dim != c.hidden_size // c.num_attention_heads:
        fields["llama.attention.key_length"] = (head_dim, V.UINT32)
        fields["llama.attention.value_length"] = (head_dim, V.UINT32)
    return fields


def tensor_type(gguf_name: str, shape: tuple[int, ...], bits: int) -> T:
    if len(shape) != 2 or not gguf_name.endswith(".weight"):
        return T.F32
    if shape[-1] % 32:
        return T.F16
    return T.Q8_0 if bits == 8 or gguf_name in KEEP_Q8 else QUANT_TYPES[bits]


def _write(tmp: Path, source: _Source, bits: int, progress: bool) -> None:
    from gptj.loading.gguf import gguf_name, permute_qk

    arch, config = source.arch, source.config
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(source.name)
    writer.add_file_type(int(FILE_TYPES[bits]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, vtype) in _arch_fields(arch, config).items():
        writer.add_key_value(key, value, vtype)
    for key, (value, vtype, sub) in source.tokenizer.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)

    heads: dict[str, int] = {}
    if arch == "llama":
        n_head = config["num_attention_heads"]
        heads = {"attn_q": n_head, "attn_k": config.get("num_key_value_heads") or n_head}
    plan: list[tuple[str, str, T]] = []  # (HF name, GGUF name, type) in the source's order
    for name, shape in source.order:
        if _skip(name):
            continue
        try:
            gname = gguf_name(name, arch)
        except KeyError:
            raise ModelLoadError(f"tensor {name!r} has no GGUF name for a {arch} model") from None
        kind = tensor_type(gname, shape, bits)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        plan.append((name, gname, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done = 0
    for name, tensor in source.stream():
        if _skip(name):
            continue
        if done >= len(plan) or plan[done][0] != name:
            raise ModelLoadError(f"tensor {name!r} came out of the order the source listed")
        _, gname, kind = plan[done]
        w = tensor.detach().to(torch.float32)
        stem = gname.split(".")[-2]
        if stem in heads:
            w = permute_qk(w, heads[stem])  # what convert_hf_to_gguf does for ggml's rope
        data = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), kind)
        writer.write_tensor_data(data)
        done += 1
        if progress:
            print(f"\r{done}/{len(plan)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if done != len(plan):
        raise ModelLoadError(f"the source gave {done} of its {len(plan)} tensors")
    writer.close()
