"""Any GGUF a user has (issue #15): K-quant files (Q4_K_M, Q5_K_M, Q6_K) and the other ggml
types load through gguf.quants; SentencePiece ('llama') and Llama 3 ('llama-bpe') tokenizers
tokenize as the Hugging Face tokenizers they came from; the memory check runs before any
tensor is dequantized; broken files fail with a ModelLoadError naming the file."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import MIXES, byte_vocab, gguf_name, llama_cpp_permute, random_llama, write_llama_gguf
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

import gptj
from gptj import memory
from gptj.errors import ModelLoadError, ModelTooLarge
from gptj.loading.gguf import read_gguf
from gptj.runtime.sampling import SamplingParams
from gptj.tokenizer import Tokenizer

IDS = [5, 17, 300, 42, 511, 7, 99, 256]


@pytest.fixture(scope="module")
def ref():  # noqa: ANN201
    return random_llama(seed=1)


def reference_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---- weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_k_quant_gguf_loads_close_to_the_float_model(tmp_path: Path, ref, mix: str) -> None:  # noqa: ANN001
    path = tmp_path / f"tiny.{mix}.gguf"
    stored = write_llama_gguf(path, ref, MIXES[mix])
    assert {k for _, k in stored.values()} >= ({T.Q6_K} if mix == "Q6_K" else {T.Q6_K, getattr(T, mix[:4])})
    model = gptj.load(str(path), dtype=torch.float32)
    assert model.info.format == "gguf" and model.info.architecture == "llama"
    # every weight is exactly what gguf.quants makes of its blocks, with the q/k rows put back
    _, _, state = read_gguf(path)
    cfg = ref.config
    for hf, _ in ref.state_dict().items():
        data, kind = stored[gguf_name(hf)]
        expected = gguf.quants.dequantize(data, kind).reshape(ref.state_dict()[hf].shape)
        got = state[hf].detach().numpy()
        if "q_proj" in hf:
            got = llama_cpp_permute(got, cfg.num_attention_heads)
        elif "k_proj" in hf:
            got = llama_cpp_permute(got, cfg.num_key_value_heads)
        np.testing.assert_array_equal(got, expected, err_msg=hf)
    logits = model.logits(IDS)
    # transformers on the weights the blocks stand for gives the same logits ...
    blocks_ref = copy.deepcopy(ref)
    blocks_ref.load_state_dict(state)
    assert torch.allclose(logits, reference_logits(blocks_ref, IDS), atol=1e-3, rtol=0)
    # ... and they are near the float model's (these encoders are plain min/max, not llama.cpp's)
    assert cosine(logits, reference_logits(ref, IDS)) > {"Q4_K_M": 0.95, "Q5_K_M": 0.99, "Q6_K": 0.995}[mix]


@pytest.mark.parametrize("kind", [T.Q5_0, T.Q5_1, T.BF16, T.F16, T.TQ2_0, T.MXFP4])
def test_other_ggml_types_load(tmp_path: Path, ref, kind: T) -> None:  # noqa: ANN001
    path = tmp_path / f"tiny.{kind.name}.gguf"
    write_llama_gguf(path, ref, lambda part, layer: kind if part != "token_embd" else T.Q8_0)
    model = gptj.load(str(path), dtype=torch.float32)
    _, _, state = read_gguf(path)
    blocks_ref = copy.deepcopy(ref)
    blocks_ref.load_state_dict(state)  # transformers on what the blocks stand for
    logits = model.logits(IDS)
    assert torch.allclose(logits, reference_logits(blocks_ref, IDS), atol=1e-3, rtol=0)
    if kind != T.TQ2_0:  # ternary weights are not this model's
        assert cosine(logits, reference_logits(ref, IDS)) > (0.9 if kind == T.MXFP4 else 0.98)


def test_k_quants_quantize_to_int8_and_int4(tmp_path: Path, ref) -> None:  # noqa: ANN001
    path = tmp_path / "tiny.Q4_K_M.gguf"
    write_llama_gguf(path, ref, MIXES["Q4_K_M"])
    float_logits = gptj.load(str(path), dtype=torch.float32).logits(IDS)
    for mode, floor in (("int8", 0.999), ("int4", 0.95)):
        model = gptj.load(str(path), quantize=mode, dtype=torch.float32)
        assert model.info.quantization == mode
        assert cosine(model.logits(IDS), float_logits) > floor, mode


def test_memory_check_runs_before_any_tensor_is_dequantized(tmp_path: Path, ref, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                            ) -> None:
    path = tmp_path / "tiny.Q8_0.gguf"
    write_llama_gguf(path, ref, lambda part, layer: T.Q8_0)
    gptj.load(str(path), dtype=torch.float32)  # it loads when memory is there

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor was dequantized before the memory check")

    from gptj.loading import gguf as gguf_loading

    for owner, attr in ((gguf_loading, "dequantize"), (gguf_loading, "dequantize_into"), (gguf.quants, "dequantize")):
        if hasattr(owner, attr):
            monkeypatch.setattr(owner, attr, forbidden)
    monkeypatch.setattr(torch.Tensor, "float", lambda self: forbidden())  # the old reader's f16/bf16 path
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000)
    with pytest.raises(ModelTooLarge, match=r"needs about 0\.0 GB .* float32, but only 0\.0 GB is available"):
        gptj.load(str(path), dtype=torch.float32)


def test_unreadable_tensor_type_names_file_tensor_and_type(tmp_path: Path, ref) -> None:  # noqa: ANN001
    path = tmp_path / "int.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = ref.config
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2), ("vocab_size", 300)):
        writer.add_uint32(f"llama.{key}", value)
    byte_vocab(writer, 300)
    writer.add_tensor("token_embd.weight", np.zeros((300, 32), np.int32))  # I32: not a weight type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(path))
    assert str(path) in str(err.value) and "token_embd.weight" in str(err.value) and "I32" in str(err.value)
    assert cfg is not None


# ---- broken files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory: pytest.TempPathFactory, ref) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("k") / "tiny.Q4_K_M.gguf"
    write_llama_gguf(path, ref, MIXES["Q4_K_M"])
    return path


@pytest.mark.parametrize("cut", [0.999, 0.7, 0.3, 0.05])
def test_truncated_k_quant_gguf(tmp_path: Path, kquant_file: Path, cut: float) -> None:
    path = tmp_path / "cut.gguf"
    blob = kquant_file.read_bytes()
    path.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(path), max_memory="100GB")
    assert str(path) in str(err.value)


def test_wrong_magic_and_absurd_dims(tmp_path: Path, kquant_file: Path) -> None:
    blob = bytearray(kquant_file.read_bytes())
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + blob[4:])
    with pytest.raises(ModelLoadError, match="magic.gguf"):
        gptj.load(str(bad))
    # the first tensor's first dim (ne[0]) set to 2**40: no huge allocation, a clear error
    name = b"token_embd.weight"
    at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4  # past the name and n_dims
    blob[at : at + 8] = struct.pack("<Q", 1 << 40)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="huge.gguf"):
        gptj.load(str(huge))


# ---- tokenizers ------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "It's 2024 and I'LL be there at 10:30, won't you?",
    "Hello world! Hello there, wonderful world.", "  indented line\n\nwith  double  spaces\tand tabs",
    "numbers 1234567 and 3.14159; emails a@b.c", "The theory of everything, then and there.",
] * 5
TEXTS = [
    "The quick brown fox", "Hello  world!\n\n  spaced out", "naïve café — 日本語 🙂", "I'LL see 12345678 things",
    " leading space", "tabs\tand\nnewlines\r\n", "theory, then, there", "x",
]


def spm_pair() -> tuple[HFTokenizer, dict]:
    """A Llama 2 style tokenizer.json (BPE over "▁"-text, byte fallback, <unk> <s> </s>, the 256
    <0xNN> pieces) trained on CORPUS, and the GGUF metadata llama.cpp's converter writes for its
    sentencepiece model: the pieces with scores (-id: the merge order), token types."""
    spm_norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.normalizer = spm_norm
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    import json

    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].__getitem__)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = spm_norm
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken

    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(259, len(tokens))],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}
    return hf, meta


LLAMA3_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's tokenizer.json


def llama3_pair() -> tuple[HFTokenizer, dict]:
    """A Llama 3 style tokenizer.json (its split regex, byte-level BPE, ignore_merges) trained on
    CORPUS, and its GGUF metadata ('gpt2' model, 'llama-bpe' pre-tokenizer)."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_HF_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    import json

    trained = json.loads(trainer_tok.to_str())["model"]
    tokens = sorted(trained["vocab"], key=trained["vocab"].__getitem__) + specials
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    hf.pre_tokenizer = pre
    hf.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 3) + [3, 3, 3],
            "tokenizer.ggml.merges": [" ".join(m) for m in merges],
            "tokenizer.ggml.bos_token_id": vocab["<|begin_of_text|>"], "tokenizer.ggml.eos_token_id": vocab["<|eot_id|>"]}
    return hf, meta


@pytest.mark.parametrize("pair", [spm_pair, llama3_pair])
def test_gguf_tokenizer_matches_the_hf_tokenizer(pair) -> None:  # noqa: ANN001
    hf, meta = pair()
    tok = Tokenizer.from_gguf_metadata(meta)
    for text in TEXTS + CORPUS[:6]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == hf.decode(expected) == text, text
    special = "<s>Hello world</s>" if pair is spm_pair else "<|begin_of_text|>Hello world<|eot_id|>"
    ids = tok.encode(special, allow_special=True)
    assert ids == hf.encode(special, add_special_tokens=False).ids
    assert ids[0] == meta["tokenizer.ggml.bos_token_id"] and ids[-1] == meta["tokenizer.ggml.eos_token_id"]
    assert tok.eos_token_id in tok.end_ids and tok.add_bos_token
    assert tok.decode(ids, skip_special=True) == "Hello world"
    literal = tok.encode(special)  # special-token text is ordinary text unless asked for
    assert meta["tokenizer.ggml.eos_token_id"] not in literal


def test_spm_pieces_stream_with_their_spaces_and_bytes() -> None:
    from gptj.tokenizer import StreamDecoder

    _, meta = spm_pair()
    tok = Tokenizer.from_gguf_metadata(meta)
    text = "Hello world 日本"
    ids = tok.encode(text)
    assert tok.token_bytes(ids[0]).startswith(b" ")  # a continuation keeps its space
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == " " + text
    assert any(tok.token_bytes(i) in {bytes([b]) for b in "日".encode()} for i in ids)  # byte fallback pieces


def test_llama3_splits_digits_in_threes_and_keeps_whole_words() -> None:
    hf, meta = llama3_pair()
    tok = Tokenizer.from_gguf_metadata(meta)
    pieces = [tok.token_bytes(i) for i in tok.encode("1234567")]
    assert b"".join(pieces) == b"1234567" and all(len(p) <= 3 for p in pieces)
    gpt2_style = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "gpt-2"}))
    text = "I'LL pay 1234567"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids != gpt2_style.encode(text)


def test_sentencepiece_gguf_model_loads_and_generates(tmp_path: Path, ref) -> None:  # noqa: ANN001
    _, meta = spm_pair()
    n = len(meta["tokenizer.ggml.tokens"])
    model_ref = random_llama(seed=2, vocab_size=n)

    def spm_vocab(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(meta["tokenizer.ggml.tokens"])
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
        writer.add_token_types(meta["tokenizer.ggml.token_type"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    path = tmp_path / "spm.gguf"
    write_llama_gguf(path, model_ref, lambda part, layer: T.Q8_0, tokenizer=spm_vocab)
    model = gptj.load(str(path))
    assert model.tokenizer.decode(model.tokenizer.encode("Hello world")) == "Hello world"
    out = model.generate("Hello world", max_new_tokens=4, temperature=0)
    assert len(out.tokens) == 4 or out.finish_reason == "stop"
    # add_bos_token: a text prompt starts with BOS, as llama.cpp tokenizes it; once, where the
    # text (a chat template's output) already begins with it; token-id prompts are taken as sent
    plain = model.tokenizer.encode("Hello world")
    assert model.encode_prompt("Hello world") == [1, *plain]
    assert model.encode_prompt("<s>Hello world") == [1, *plain]
    assert model.encode_prompt(plain) == plain
    with_bos = model.generate([1, *plain], max_new_tokens=4, temperature=0)
    assert out.tokens == with_bos.tokens and out.prompt_tokens == len(plain) + 1
    long = [1, *range(5, 5 + model.context_length)]  # left-truncated: BOS stays first
    ids, dropped = model.engine.prepare_prompt(long, SamplingParams(max_new_tokens=4, truncate_prompt=True))
    budget = model.context_length - 4
    assert ids == [1, *long[len(long) - budget + 1 :]] and dropped == len(long) - budget
