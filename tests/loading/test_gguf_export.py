"""`gptj quantize SRC DST.gguf --format gguf`: Q8_0 / Q4_1 GGUF files that gptj reads back (GPT-J
and Llama, from Hugging Face folders, GGUF and legacy GGML sources) and, for Llama, what llama.cpp's
converter writes: its metadata keys, tensor names, q/k permutation, and tokenizer. With a built
llama.cpp (benchmarks/build_llama_cpp.sh, or LLAMA_CPP_BIN), llama-bench runs the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import llama_cpp_permute, random_llama, write_llama_gguf
from test_gguf_any import llama3_pair, spm_pair

import gptj
from gptj.errors import ModelLoadError
from gptj.loading.random_checkpoint import make_random_checkpoint

GPTJ_SHAPE = dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8)
GPTJ_IDS = [464, 3139, 286, 4881, 318, 6342, 13, 50256]
LLAMA_IDS = [5, 17, 30, 42, 99, 3]
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/var/tmp/gptj-bench/llama.cpp/bin"))


def write_gguf(src: str, dst: Path, bits: int) -> Path:
    from gptj.loading.export import write_gguf as write

    return write(src, dst, bits)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def gptj_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("gptj") / "hf", GPTJ_SHAPE, "safetensors", torch.float16,
                                  seed=5)


def llama_folder(base: Path, pair) -> Path:  # noqa: ANN001
    """A Hugging Face Llama folder: random weights, the tokenizer.json of `pair`."""
    hf, meta = pair()
    tokens = meta["tokenizer.ggml.tokens"]
    model = random_llama(seed=4, vocab_size=len(tokens))
    folder = base / pair.__name__
    model.save_pretrained(folder)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]], "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return folder


@pytest.mark.parametrize("bits, floor", [(8, 0.9999), (4, 0.99)])
def test_gptj_folder_round_trip(gptj_folder: Path, tmp_path: Path, bits: int, floor: float) -> None:
    out = write_gguf(str(gptj_folder), tmp_path / "gptj.gguf", bits)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "gptj"
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert names["blk.0.attn_q.weight"] == (T.Q8_0 if bits == 8 else T.Q4_1)
    assert names["token_embd.weight"] == names["output.weight"] == T.Q8_0 and names["output.bias"] == T.F32
    expected_names = {n.replace("{bid}", "0") for n in
                      (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPTJ])}
    assert {n.rsplit(".", 1)[0] for n in names if not n.startswith("blk.1.")} == expected_names
    model = gptj.load(str(out), dtype=torch.float32)
    assert model.info.architecture == "gptj" and model.info.format == "gguf"
    assert cosine(model.logits(GPTJ_IDS), gptj.load(str(gptj_folder), dtype=torch.float32).logits(GPTJ_IDS)) > floor
    gptj_tok = gptj.load_tokenizer("gpt-j")
    text = "Hello world, it's GPT-J!"
    assert model.tokenizer.encode(text) == gptj_tok.encode(text) and model.tokenizer.padding_ids == gptj_tok.padding_ids


@pytest.mark.parametrize("pair", [spm_pair, llama3_pair])
def test_llama_folder_is_written_as_llama_cpp_writes_it(tmp_path: Path, pair) -> None:  # noqa: ANN001
    folder = llama_folder(tmp_path, pair)
    out = write_gguf(str(folder), tmp_path / "llama.Q8_0.gguf", 8)
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "rope.dimension_count",
                "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon"):
        assert f"llama.{key}" in fields, key
    assert fields["tokenizer.ggml.model"] == ("llama" if pair is spm_pair else "gpt2")
    if pair is llama3_pair:
        assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    for t in reader.tensors:
        assert t.name.rsplit(".", 1)[0].replace(".0.", ".{bid}.").replace(".1.", ".{bid}.") in allowed, t.name
    # q and k are stored permuted exactly as convert_hf_to_gguf.py permutes them
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    stored = gguf.quants.dequantize(q.data, q.tensor_type).reshape(ref.config.num_key_value_heads * 64, -1)
    expected = llama_cpp_permute(ref.model.layers[1].self_attn.k_proj.weight.detach().numpy(),
                                 ref.config.num_key_value_heads)
    assert np.abs(stored - expected).max() < 0.01 * np.abs(expected).max()
    # and gptj reads it back: logits and tokens
    model = gptj.load(str(out), dtype=torch.float32)
    source = gptj.load(str(folder), dtype=torch.float32)
    assert cosine(model.logits(LLAMA_IDS), source.logits(LLAMA_IDS)) > 0.999
    text = "Hello world, 12345 naïve café"
    assert model.tokenizer.encode(text) == source.tokenizer.encode(text)
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    assert model.tokenizer.chat_template == source.tokenizer.chat_template


@pytest.mark.skipif(not (LLAMA_BIN / "llama-bench").exists(), reason="no built llama.cpp (benchmarks/build_llama_cpp.sh)")
@pytest.mark.parametrize("pair", [spm_pair, llama3_pair])
def test_llama_cpp_runs_the_written_file(tmp_path: Path, pair) -> None:  # noqa: ANN001
    out = write_gguf(str(llama_folder(tmp_path, pair)), tmp_path / "llama.Q4_1.gguf", 4)
    # --repack 0: llama.cpp reads and runs the file as written (its repacked layouts include ggml's
    # AMX matmul, which segfaults on a Xeon with AMX whatever the file: benchmarks/results/gptj-6b-xeon.md)
    done = subprocess.run([str(LLAMA_BIN / "llama-bench"), "-m", str(out), "-p", "8", "-n", "4", "-t", "2", "-r", "1",
                           "--repack", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "llama" in done.stdout and "Q4_1" in done.stdout


def test_gguf_source_is_requantized(tmp_path: Path) -> None:
    ref = random_llama(seed=6)
    src = tmp_path / "src.F32.gguf"
    write_llama_gguf(src, ref)
    ids = [5, 17, 300, 42, 511]
    expected = gptj.load(str(src), dtype=torch.float32).logits(ids)
    source_meta = {k: f.contents() for k, f in gguf.GGUFReader(src).fields.items() if k.startswith("tokenizer.")}
    for bits, floor in ((8, 0.999), (4, 0.95)):  # 4 bits of random normal weights
        out = write_gguf(str(src), tmp_path / f"src.{bits}.gguf", bits)
        meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
        assert meta == source_meta  # the tokenizer copied as it is
        assert cosine(gptj.load(str(out), dtype=torch.float32).logits(ids), expected) > floor


def test_ggml_source_and_the_cli(gptj_folder: Path, tmp_path: Path) -> None:
    from ggml_files import write_ggml_gptj

    legacy = tmp_path / "ggml-gpt-j-q8_0.bin"
    write_ggml_gptj(gptj_folder, legacy, "q8_0")
    out = tmp_path / "from-ggml.gguf"
    done = subprocess.run([sys.executable, "-m", "gptj.cli", "quantize", str(legacy), str(out), "--format", "gguf"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    ids = GPTJ_IDS
    assert cosine(gptj.load(str(out), dtype=torch.float32).logits(ids), gptj.load(str(legacy), dtype=torch.float32).logits(ids)) > 0.9999


def test_write_is_atomic(gptj_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "m.gguf"
    write_gguf(str(gptj_folder), dst, 8)
    before = dst.read_bytes()
    calls = {"n": 0}
    original = gguf.quants.quantize

    def failing(data, qtype):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(str(gptj_folder), dst, 4)
    assert dst.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no partial file left
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        write_gguf(str(gptj_folder), tmp_path / "folder.gguf", 8)
    shutil.rmtree(tmp_path / "folder.gguf")


def test_permutation_is_convert_hf_to_gguf_s() -> None:
    from gptj.loading.gguf import permute_qk, unpermute_qk

    w = torch.randn(4 * 16, 24)
    assert np.array_equal(permute_qk(w, 4).numpy(), llama_cpp_permute(w.numpy(), 4))
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
