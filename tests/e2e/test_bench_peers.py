"""The benchmarks' ggml GPT-J peer (benchmarks/ggml_gptj.py): its q4_0 / q8_0 blocks are
bit-for-bit those of the ggml that ctransformers 0.2.27 vendors, and ggml's GPT-J graph run
by ctransformers on the converted file gives transformers' logits. Skipped without ctransformers
(`pip install --no-deps ctransformers==0.2.27`)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ctransformers = pytest.importorskip("ctransformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ggml_gptj  # noqa: E402

from gptj.kernels import cpu_flags  # noqa: E402
from gptj.loading.random_checkpoint import make_random_checkpoint  # noqa: E402

LIB = "avx2" if "avx2" in cpu_flags() else "basic"
PROMPT = torch.randint(100, 50000, (24,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("gptj-tiny"), "tiny", "bin")


def _reference(checkpoint: Path, kind: str | None = None) -> tuple[np.ndarray, list[int]]:
    """transformers' last-position logits for PROMPT and its 8 greedy tokens; with `kind`, on the
    weights that kind's blocks stand for."""
    from transformers import GPTJForCausalLM

    hf = GPTJForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        if kind:
            quantize = {"q8_0": ggml_gptj.quantize_q8_0, "q4_0": ggml_gptj.quantize_q4_0}[kind]
            for name, p in hf.named_parameters():
                if name.endswith(".weight") and p.ndim == 2:
                    a = p.numpy()
                    p.copy_(torch.from_numpy(ggml_gptj.dequantize(quantize(a), kind, a.shape)))
        logits = hf(torch.tensor([PROMPT])).logits[0, -1].numpy()
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT) :]
    return logits, greedy.tolist()


def _ggml(path: Path) -> tuple[np.ndarray, list[int]]:
    llm = ctransformers.AutoModelForCausalLM.from_pretrained(
        str(path), model_type="gptj", lib=LIB, threads=2, context_length=64
    )
    llm.eval(PROMPT, batch_size=len(PROMPT))
    logits = np.array(llm.logits)
    tokens = [int(logits.argmax())]
    for _ in range(7):
        llm.eval(tokens[-1:])
        tokens.append(int(np.argmax(llm.logits)))
    return logits, tokens


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_blocks_are_ggmls_own(kind: str) -> None:
    lib = ctypes.CDLL(str(Path(ctransformers.__file__).parent / "lib" / LIB / "libctransformers.so"))
    fn = getattr(lib, f"ggml_quantize_{kind}")
    fn.restype = ctypes.c_size_t
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 512)) * 0.02).astype(np.float16).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :64] = rng.integers(-3, 4, 64) * 0.01  # ties in magnitude, halves to round
    block_bytes = ggml_gptj.TYPES[kind][2]
    theirs, hist = np.zeros(x.size // 32 * block_bytes, np.uint8), np.zeros(16, np.int64)
    fn(x.ctypes.data_as(ctypes.c_void_p), theirs.ctypes.data_as(ctypes.c_void_p), x.size, x.shape[1],
       hist.ctypes.data_as(ctypes.c_void_p))  # fmt: skip
    ours = {"q4_0": ggml_gptj.quantize_q4_0, "q8_0": ggml_gptj.quantize_q8_0}[kind](x)
    assert ours == theirs.tobytes()


def test_file_header_and_vocab(checkpoint: Path, tmp_path: Path) -> None:
    path = ggml_gptj.convert(checkpoint, tmp_path / "m.bin", "q8_0")
    assert ggml_gptj.read_header(path) == dict(n_vocab=50400, n_ctx=2048, n_embd=64, n_head=4, n_layer=2, n_rot=8,
                                               ftype=2007)  # fmt: skip
    pieces = ggml_gptj.vocab_pieces(checkpoint, 50400)
    assert pieces[50256] == b"<|endoftext|>" and pieces[50399] == b"<|extratoken_143|>"
    assert pieces[220] == b" " and pieces[198] == b"\n"


def test_f16_gives_transformers_logits(checkpoint: Path, tmp_path: Path) -> None:
    ref, ref_tokens = _reference(checkpoint)
    logits, tokens = _ggml(ggml_gptj.convert(checkpoint, tmp_path / "f16.bin", "f16"))
    assert np.abs(logits - ref).max() < 2e-3  # fp16 weights, fp16 KV cache, ggml's fp16 GELU table
    assert tokens == ref_tokens


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_gives_the_logits_of_its_blocks(checkpoint: Path, tmp_path: Path, kind: str) -> None:
    """Against transformers on the dequantized blocks: a wrong block layout would scramble the
    weights inside each block and break this, while the quantization error itself cancels."""
    ref, _ = _reference(checkpoint, kind)
    logits, _ = _ggml(ggml_gptj.convert(checkpoint, tmp_path / f"{kind}.bin", kind))
    assert np.corrcoef(logits, ref)[0, 1] > 0.9995  # ggml also rounds activations to q8 blocks
    assert np.abs(logits - ref).max() < 0.02
