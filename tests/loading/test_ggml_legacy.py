"""Legacy GGML GPT-J files (ggml's gpt-j example, KoboldCpp's `ggml-gpt-j-6b-*.bin`) load directly:
every type (f16, q4_0, q4_1, q5_0, q5_1, q8_0; q4_2/q4_3 of the first quantized files) in every
quantization version's layout, checked against the Hugging Face checkpoint they were made from;
broken files fail with a ModelLoadError that names the file."""

from __future__ import annotations

import copy
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ggml_files import gptj_pieces, write_ggml_gptj
from transformers import GPTJForCausalLM

import gptj
from gptj import memory
from gptj.errors import ModelLoadError, ModelTooLarge
from gptj.loading.random_checkpoint import make_random_checkpoint

SHAPE = dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8)
IDS = [464, 3139, 286, 4881, 318, 6342, 13, 50256, 11, 50300]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("gptj") / "hf", SHAPE, "safetensors", torch.float16, seed=3)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> GPTJForCausalLM:
    return GPTJForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_logits(model: GPTJForCausalLM, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_f16_file_gives_the_checkpoints_logits_exactly(checkpoint: Path, hf_model: GPTJForCausalLM,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "ggml-gpt-j-tiny-f16.bin"
    write_ggml_gptj(checkpoint, path, "f16")
    model = gptj.load(str(path), dtype=torch.float32)
    assert (model.info.format, model.info.architecture, model.info.vocab_size) == ("ggml", "gptj", 50400)
    assert model.name == "ggml-gpt-j-tiny-f16"
    expected = gptj.load(str(checkpoint), dtype=torch.float32).logits(IDS)
    assert torch.equal(model.logits(IDS), expected)
    assert torch.allclose(model.logits(IDS), hf_logits(hf_model), atol=1e-4, rtol=0)
    assert model.tokenizer.encode("Hello world") == gptj.load_tokenizer("gpt-j").encode("Hello world")
    assert model.tokenizer.padding_ids == gptj.load_tokenizer("gpt-j").padding_ids


@pytest.mark.parametrize("kind, version", [
    ("q4_0", 2), ("q4_1", 2), ("q5_0", 2), ("q5_1", 2), ("q8_0", 2),
    ("q4_0", 1), ("q4_1", 1), ("q5_0", 1), ("q5_1", 1), ("q8_0", 1),
    ("q4_0", 0), ("q4_1", 0), ("q5_0", 0), ("q5_1", 0), ("q8_0", 0), ("q4_2", 0), ("q4_3", 0),
])
def test_quantized_files_hold_the_weights_of_their_blocks(checkpoint: Path, hf_model: GPTJForCausalLM, tmp_path: Path,
                                                          kind: str, version: int) -> None:
    path = tmp_path / f"ggml-{kind}-v{version}.bin"
    stands_for = write_ggml_gptj(checkpoint, path, kind, version)
    model = gptj.load(str(path), dtype=torch.float32)
    logits = model.logits(IDS)
    # transformers on the weights the blocks stand for: the layout was read right ...
    assert torch.allclose(logits, hf_logits(hf_model, stands_for), atol=2e-4, rtol=0)
    # ... and those are close to the checkpoint's
    assert cosine(logits, hf_logits(hf_model)) > (0.999 if kind == "q8_0" else 0.98)


def test_the_three_versions_of_a_file_load_the_same_weights(checkpoint: Path, tmp_path: Path) -> None:
    logits = []
    for version in (0, 1, 2):
        path = tmp_path / f"q4_1-v{version}.bin"
        write_ggml_gptj(checkpoint, path, "q4_1", version)
        logits.append(gptj.load(str(path), dtype=torch.float32).logits(IDS))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])


def test_first_transposed_format_loads(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "ggml-super-old.bin"
    write_ggml_gptj(checkpoint, path, "f16", transposed=True)
    expected = gptj.load(str(checkpoint), dtype=torch.float32).logits(IDS)
    assert torch.equal(gptj.load(str(path), dtype=torch.float32).logits(IDS), expected)


def test_files_of_the_benchmarks_writer_load(checkpoint: Path, hf_model: GPTJForCausalLM, tmp_path: Path) -> None:
    """benchmarks/ggml_gptj.py writes bit-for-bit what ggml's own quantizer writes (checked against
    ctransformers in tests/e2e/test_bench_peers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import ggml_gptj
    finally:
        sys.path.pop(0)
    expected_f16 = gptj.load(str(checkpoint), dtype=torch.float32).logits(IDS)
    for kind in ("f16", "q8_0", "q4_0"):
        path = ggml_gptj.convert(checkpoint, tmp_path / f"bench-{kind}.bin", kind)
        logits = gptj.load(str(path), dtype=torch.float32).logits(IDS)
        if kind == "f16":
            assert torch.equal(logits, expected_f16)
            continue
        stands_for = {}
        for name, p in hf_model.state_dict().items():
            if name.endswith(".weight") and p.ndim == 2:
                a = p.numpy()
                quantize = {"q8_0": ggml_gptj.quantize_q8_0, "q4_0": ggml_gptj.quantize_q4_0}[kind]
                stands_for[name] = torch.from_numpy(ggml_gptj.dequantize(quantize(a), kind, a.shape))
        assert torch.allclose(logits, hf_logits(hf_model, stands_for), atol=2e-4, rtol=0), kind


def test_legacy_block_layouts_against_the_c_reference() -> None:
    """One block of each old layout, decoded by hand as KoboldCpp's ggml_v2.c does it."""
    from gptj.loading.ggml import Q4_0, Q4_1, Q4_2, Q5_1, Q8_0, dequantize_legacy

    qs = bytes((i % 16) | ((15 - i % 16) << 4) for i in range(16))
    lo = [b & 15 for b in qs]
    hi = [b >> 4 for b in qs]
    d32 = struct.pack("<f", 0.5)
    m32 = struct.pack("<f", -1.25)

    def run(raw: bytes, ttype: int, version: int) -> list[float]:
        return dequantize_legacy(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ttype, version).tolist()

    # version 0 q4_0: byte i = values 2i (low nibble), 2i + 1 (high); x = (q - 8) * d
    v0 = [v for i in range(16) for v in ((lo[i] - 8) * 0.5, (hi[i] - 8) * 0.5)]
    assert run(d32 + qs, Q4_0, 0) == v0
    # version 1 q4_0: byte i = values i, i + 16
    assert run(d32 + qs, Q4_0, 1) == [(q - 8) * 0.5 for q in lo] + [(q - 8) * 0.5 for q in hi]
    # q4_1: float32 d and m, x = q * d + m
    assert run(d32 + m32 + qs, Q4_1, 0) == [v for i in range(16) for v in (lo[i] * 0.5 - 1.25, hi[i] * 0.5 - 1.25)]
    # q5_1, version 0: fp16 d, m, uint32 qh (bit i = the fifth bit of value i), paired nibbles
    qh = (1 << 0) | (1 << 31) | (1 << 5)
    raw = struct.pack("<ee", 0.5, -1.0) + struct.pack("<I", qh) + qs
    q5 = [v for i in range(16) for v in (lo[i], hi[i])]
    q5 = [q | (16 if qh >> i & 1 else 0) for i, q in enumerate(q5)]
    assert run(raw, Q5_1, 0) == [q * 0.5 - 1.0 for q in q5]
    # q4_2 (version 0 only): 16 values, fp16 d, paired nibbles
    assert run(struct.pack("<e", 0.25) + qs[:8], Q4_2, 0) == [v for i in range(8) for v in ((lo[i] - 8) * 0.25,
                                                                                            (hi[i] - 8) * 0.25)]
    # q8_0 versions 0 and 1: float32 d
    q8 = bytes(range(256 - 16, 256)) + bytes(range(16))
    assert run(d32 + q8, Q8_0, 1) == [np.int8(b) * 0.5 for b in np.frombuffer(q8, np.uint8).view(np.int8)]


def test_other_vocab_gets_a_bpe_rebuilt_from_its_ranks(checkpoint: Path, tmp_path: Path) -> None:
    pieces = gptj_pieces(50400)
    pieces[50257:50260] = [b"<|im_start|>", b"<|im_end|>", b"<|pad|>"]  # not GPT-J's
    path = tmp_path / "other-vocab.bin"
    write_ggml_gptj(checkpoint, path, "q8_0", pieces=pieces)
    model = gptj.load(str(path))
    gpt2 = gptj.load_tokenizer("gpt2")
    text = "Hello world, it's 2024!\n  Indented: naïve café 🙂"
    assert model.tokenizer.encode(text) == gpt2.encode(text)
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    assert model.tokenizer.encode("<|im_end|>", allow_special=True) == [50258]


def test_memory_check_comes_before_any_weight_is_read(checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "q4_0.bin"
    write_ggml_gptj(checkpoint, path, "q4_0")
    from gptj.loading import ggml
    from gptj.loading import gguf as gguf_loading

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was read before the memory check")

    monkeypatch.setattr(ggml, "dequantize_legacy", forbidden)
    monkeypatch.setattr(gguf_loading, "dequantize_into", forbidden)
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000)
    with pytest.raises(ModelTooLarge, match=r"q4_0\.bin needs about"):
        gptj.load(str(path))


def test_cli_generates_from_a_ggml_file(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "ggml-gpt-j-tiny-q8_0.bin"
    write_ggml_gptj(checkpoint, path, "q8_0")
    done = subprocess.run([sys.executable, "-m", "gptj.cli", "generate", "--model", str(path), "Hello", "-n", "3",
                           "-t", "0", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"tokens"' in done.stdout


# ---- broken files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "q4_0.bin"
    write_ggml_gptj(checkpoint, path, "q4_0")
    return path


def _header_and_tensor_start(blob: bytes) -> int:
    n_vocab = struct.unpack_from("<i", blob, 4)[0]
    pos = 36
    for _ in range(n_vocab):
        pos += 4 + struct.unpack_from("<i", blob, pos)[0]
    return pos


@pytest.mark.parametrize("cut", [3, 20, 40, 5000, 0.6, 0.9999])
def test_truncated_ggml_file(good_file: Path, tmp_path: Path, cut: float) -> None:
    blob = good_file.read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(blob[: int(cut if cut >= 1 else len(blob) * cut)])
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(path), max_memory="100GB")
    message = str(err.value)
    assert message.startswith(str(path))
    assert "truncated GGML file" in message or (cut == 3 and "not a GGUF or GGML model" in message), message


def edit(blob: bytes, at: int, fmt: str, *values: object) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


def test_hostile_headers_and_tables(good_file: Path, tmp_path: Path) -> None:
    blob = good_file.read_bytes()
    tensors = _header_and_tensor_start(blob)
    cases = {
        "ggjt.bin": (edit(blob, 0, "<I", 0x67676A74), "convert it to GGUF"),
        "huge-vocab.bin": (edit(blob, 4, "<i", 2**31 - 1), "n_vocab must be a positive integer of at most"),
        "vocab-mismatch.bin": (edit(blob, 32, "<i", 7), "the vocab has 7 tokens, the header says n_vocab=50400"),
        "token-len.bin": (edit(blob, 36, "<i", 2**30), "token 0 claims 1073741824 bytes"),
        "layers.bin": (edit(blob, 20, "<i", 1_000_000), "n_layer must be at most 512"),
        "n-rot.bin": (edit(blob, 24, "<i", 33), "n_rot must be even and at most the head size"),
        "qnt-version.bin": (edit(blob, 28, "<i", 9002), "quantization version 9"),
        "n-dims.bin": (edit(blob, tensors, "<i", 100), "has 100 dims"),
        "name-len.bin": (edit(blob, tensors + 4, "<i", 2**30), "a name of 1073741824 bytes"),
        "ttype.bin": (edit(blob, tensors + 8, "<i", 77), "ggml type 77"),
        "huge-dims.bin": (edit(blob, tensors + 12, "<ii", 2**31 - 32, 2**31 - 1), "needs"),
        "negative-dims.bin": (edit(blob, tensors + 12, "<i", -64), "dims"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError) as err:
            gptj.load(str(path), max_memory="100GB")
        assert str(path) in str(err.value) and message in str(err.value), (name, str(err.value))


def test_a_ggml_file_of_another_model_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "ggml-llama.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<I7i", 0x67676D6C, 4, 4096, 256, 32, 32, 128, 1))  # llama's n_mult where n_embd is
        f.write(struct.pack("<i", 4) + b"".join(struct.pack("<i", 1) + bytes([65 + i]) for i in range(4)))
        name = b"tok_embeddings.weight"
        f.write(struct.pack("<iii", 2, len(name), 0) + struct.pack("<ii", 256, 4) + name + bytes(4 * 256 * 4))
    with pytest.raises(ModelLoadError, match="not a GPT-J GGML file: it holds tensor 'tok_embeddings.weight'"):
        gptj.load(str(path))
    other = tmp_path / "random.bin"
    other.write_bytes(b"\x00\x01\x02\x03" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF or GGML model"):
        gptj.load(str(other))


@pytest.mark.parametrize("kind", ["q5_1", "q4_1"])
def test_ctransformers_reads_the_same_logits(checkpoint: Path, tmp_path: Path, kind: str) -> None:
    """ggml itself (the copy ctransformers 0.2.27 vendors: quantization version 2) on the same file."""
    ctransformers = pytest.importorskip("ctransformers")
    from gptj.kernels import cpu_flags

    path = tmp_path / f"{kind}.bin"
    write_ggml_gptj(checkpoint, path, kind, 2)
    llm = ctransformers.AutoModelForCausalLM.from_pretrained(
        str(path), model_type="gptj", lib="avx2" if "avx2" in cpu_flags() else "basic", threads=2, context_length=64)
    llm.eval(IDS, batch_size=len(IDS))
    theirs = torch.tensor(np.array(llm.logits))
    ours = gptj.load(str(path), dtype=torch.float32).logits(IDS)[-1]
    assert cosine(ours, theirs) > 0.9995  # ggml rounds activations to q8 blocks and keeps an fp16 cache


def test_gptj_quantize_takes_a_ggml_file(checkpoint: Path, tmp_path: Path) -> None:
    """Both outputs of `gptj quantize` from a GGML file keep its weights and its (not GPT-J) vocab."""
    from gptj.loading.export import write_gguf
    from gptj.loading.quantized import write_quantized

    pieces = gptj_pieces(50400)
    pieces[50257:50259] = [b"<|im_start|>", b"<|im_end|>"]
    path = tmp_path / "other-vocab-f16.bin"
    write_ggml_gptj(checkpoint, path, "f16", pieces=pieces)
    source = gptj.load(str(path), dtype=torch.float32)
    text = "<|im_start|>user\nHi there, 2024!<|im_end|>"
    expected_ids = source.tokenizer.encode(text, allow_special=True)
    assert expected_ids[0] == 50257 and expected_ids[-1] == 50258
    folder = write_quantized(str(path), str(tmp_path / "int8"), 8)
    gguf_file = write_gguf(str(path), tmp_path / "q8.gguf", 8)
    for out in (folder, gguf_file):
        model = gptj.load(str(out), dtype=torch.float32)
        assert model.tokenizer.encode(text, allow_special=True) == expected_ids, out
        assert cosine(model.logits(IDS), source.logits(IDS)) > 0.999, out
