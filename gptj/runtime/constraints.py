"""Constrained output: text that is valid JSON, or valid for a JSON schema, by masking the logits
at every step (OpenAI's `response_format` json_object / json_schema; `json_schema=` in Python).

The grammar library is llguidance (guidance-ai/llguidance: Rust, MIT), chosen over xgrammar and
outlines-core by benchmarks/bench_grammar.py (benchmarks/results/grammar.md), on this CPU and on
both our vocabularies:
- per token all three are cheap next to a decode step; per request and per engine llguidance is
  the cheapest: it builds its view of a vocabulary and compiles a schema faster than xgrammar, and
  needs no index over the vocabulary per schema, which outlines-core builds (slowly for "any JSON
  object"; its JSON is a regular expression, so nesting is also cut at a fixed depth);
- it installs as one self-contained wheel with no dependencies; xgrammar's wheel requires torch,
  transformers, apache-tvm-ffi and triton (a fresh CPU-only machine would fetch a GPU compiler);
- it bounds its own work (LLParserLimits: lexer fuel, Earley items per step, grammar size), so a
  hostile schema fails with an error instead of holding the engine, and it refuses
  unsatisfiable schemas when compiling them;
- it is kept up (frequent releases) and is a structured-output backend of vLLM, SGLang and
  llama.cpp.

How a constrained request runs (gptj.runtime.engine):
- At submit, the schema is checked (at most MAX_SCHEMA_BYTES of JSON, MAX_SCHEMA_DEPTH levels)
  and compiled; compiled schemas are cached by their JSON text, and each request gets a copy of
  the compiled matcher. A bad schema is an InvalidRequest naming `json_schema` (a 400 over HTTP).
- Every step, the tokens the grammar does not allow get a logit of -inf, before logprobs and
  sampling: logprobs and top_logprobs are those of the constrained distribution (the model's,
  renormalized over the allowed tokens), as for token healing. Ids past the tokenizer (GPT-J's
  padding rows) and special tokens are never allowed; the end-of-text tokens only where the text
  is complete JSON.
- The sampled token advances the matcher. Once the JSON is complete and nothing can follow (the
  closing brace of the top-level object), the request ends with finish_reason "stop" at once, with
  no extra step for an end-of-text token. An end-of-text token always ends a constrained request
  (ignore_eos would otherwise add its text after the JSON).
- max_new_tokens still ends a request ("length"), and the text is then cut-off JSON, as OpenAI's.
  Bound strings (maxLength) and arrays (maxItems) in the schema, or leave room.
- The JSON is compact: ", " between items, ": " after keys, no other whitespace (free whitespace
  lets a small model write newlines for ever; this form is also the one models saw most), with
  one optional space before it: after a prompt that ends in ":" a model's next token is " {",
  and forbidding it derails the text (SmolLM2 wrote `{", ": 1234567890...` instead).
- A constrained request does not speculate (drafts would need the matcher to check them) and is
  not token-healed (its first token must begin the JSON).
- When logit_bias bans every token the grammar allows, the grammar wins: the allowed token with
  the lowest id is taken, so the text stays valid.
- Schema keywords llguidance does not implement ("not", for one) are refused, not ignored: the
  output could not be promised to validate. A step past llguidance's work limits ends that
  request with finish_reason "error" (the others in the batch go on).

llguidance is imported on the first constrained request, so `import gptj` stays cheap.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptj.errors import InvalidRequest
from gptj.tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance

__all__ = ["MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH", "Constraint", "Grammars", "apply_bitmask", "check_schema",
           "grammars", "start"]

MAX_SCHEMA_BYTES = 64 * 1024  # of the schema as compact JSON text
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays in the schema
CACHED_SCHEMAS = 64  # compiled schemas kept per tokenizer (least recently used dropped)
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # json_schema=True, response_format json_object
SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
FIELD = "json_schema"


def _limits() -> llguidance.LLParserLimits:
    """The work a schema may take. Compiling and each step's mask are bounded by fuel, not by a
    clock (a Rust call cannot be interrupted; fuel also gives the same answer on any machine).
    llguidance's defaults, with a smaller grammar and lexer: ample for MAX_SCHEMA_BYTES of schema."""
    import llguidance

    return llguidance.LLParserLimits(max_grammar_size=200_000, max_lexer_states=50_000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)


def check_schema(schema: object) -> tuple[dict[str, Any], str]:
    """The schema to compile and its JSON text (the cache key), for `json_schema` as given:
    True is any JSON object, a dict is a JSON schema. Raises InvalidRequest naming json_schema."""
    if schema is True:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise InvalidRequest(FIELD, "must be a JSON schema (a JSON object; a dict in Python), or True for any JSON object")
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(FIELD, f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep (the limit)")
    try:
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(FIELD, f"must be JSON: {exc}") from None
    size = len(text.encode("utf-8", "surrogatepass"))  # (a Python str may hold a lone surrogate)
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(FIELD, f"is {size} bytes of JSON, over the limit of {MAX_SCHEMA_BYTES // 1024} KiB")
    return schema, text


def _depth(value: object) -> int:
    """How deep dicts and lists nest in `value` (without recursion: a hostile schema may nest
    deeper than Python's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_SCHEMA_DEPTH:
                return level
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


# byte -> the 8 logit offsets its bits stand for (bit k: id 8j + k), 0 allowed and -inf not
_OFFSETS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                    np.float32(0.0), np.float32(-np.inf))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """In place: -inf for every id whose bit is clear in `bitmask` (int32 words, bit k of word w
    is id 32w + k, llguidance's layout) and for every id from `n_tokens` on (rows past the
    tokenizer)."""
    words = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)  # little-endian bytes: bit order is id order
    # Adding 0 or -inf, looked up per byte: no branch per id, and numpy on the same memory (a
    # torch op over 50k floats wakes its thread pool, which on a small busy CPU costs a thousand
    # times the work).
    values = logits.numpy()
    values[:n_tokens] += _OFFSETS[words].reshape(-1)[:n_tokens]
    values[n_tokens:] = -np.inf
    return logits


class Grammars:
    """One tokenizer's vocabulary as llguidance sees it, and its compiled schemas (by JSON text)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        import llguidance

        self._llg = llguidance
        self.n_tokens = tokenizer.vocab_size

        class Vocabulary:  # what llguidance.TokenizerWrapper reads: every id's bytes, the special ids
            eos_token_id, bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
            tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
            special_token_ids = sorted(tokenizer.special_tokens.values())

            def __call__(self, data: bytes) -> list[int]:
                return tokenizer.encode(data.decode("utf-8", errors="replace"))

        # the end-of-text ids are allowed where the JSON is complete; other special ids never
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), eos_token=tokenizer.end_ids)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, schema: dict[str, Any], key: str) -> llguidance.LLMatcher:
        """A fresh matcher for `schema` (checked by check_schema; `key` its JSON text)."""
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self.compile(schema)
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > CACHED_SCHEMAS:
                    self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def compile(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """A matcher for `schema` (checked by check_schema) at its start, to copy for each request."""
        llg = self._llg
        # One optional space, then the JSON. "x-guidance" is llguidance's own schema key for its
        # JSON options: a schema may set some (coerce_one_of, lenient), the separators are ours.
        options = schema.get("x-guidance")
        options = {**options, **SEPARATORS} if isinstance(options, dict) else SEPARATORS
        body = json.dumps({**schema, "x-guidance": options}, allow_nan=False)
        grammar = llg.LLMatcher.grammar_from_lark(f'start: " "? json\njson: %json {body}')
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            why = _error(matcher.get_error())
            if "coerce_one_of" in why:  # an option of llguidance's: say where it goes
                why += ' (in the schema: "x-guidance": {"coerce_one_of": true})'
            raise InvalidRequest(FIELD, f"cannot be used: {why}")
        self._check_satisfiable(matcher)
        return matcher

    def _check_satisfiable(self, matcher: llguidance.LLMatcher) -> None:
        """Refuses a schema no JSON can meet that compiles anyway (a $ref to itself and nothing
        else): its first token, with or without the optional space, would find nothing allowed,
        and the request would fail mid-way instead of with a 400."""
        probe = Constraint(matcher.deep_copy(), self.n_tokens)
        ok = len(probe.allowed()) > 0 and probe.error is None
        space = self.tokenizer.tokenize_bytes(b" ")
        if ok and len(space) == 1 and probe.allows(space[0]):
            ok = probe.advance(space[0]) and len(probe.allowed()) > 0 and probe.error is None
        if not ok:
            raise InvalidRequest(FIELD, "cannot be used: no JSON value satisfies it")


def _error(message: str) -> str:
    """llguidance's message: its first line, without the place in our wrapping grammar."""
    line = message.strip().splitlines()[0] if message.strip() else "the grammar library refused it"
    line = re.sub(r"^at \d+\(\d+\): ", "", line).removeprefix("failed to compile JSON schema: ")
    return line[:300]


_grammars: weakref.WeakKeyDictionary[Tokenizer, Grammars] = weakref.WeakKeyDictionary()
_grammars_lock = threading.Lock()


def grammars(tokenizer: Tokenizer) -> Grammars:
    """The tokenizer's Grammars, built on first use and kept as long as the tokenizer is."""
    with _grammars_lock:
        found = _grammars.get(tokenizer)
        if found is None:
            found = _grammars[tokenizer] = Grammars(tokenizer)
        return found


class Constraint:
    """One request's matcher: mask() before sampling, advance() with the token sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, n_tokens: int) -> None:
        self.matcher = matcher
        self.n_tokens = n_tokens
        self.bitmask = torch.zeros((n_tokens + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """In place: -inf for every token the grammar does not allow next (see `error`)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        return apply_bitmask(logits, self.bitmask, self.n_tokens)

    @property
    def error(self) -> str | None:
        """Why the matcher gave up (a step past its work limits, a token it refused), else None;
        once set, it stays."""
        return f"JSON output: {_error(self.matcher.get_error())}" if self.matcher.is_error() else None

    def allows(self, token: int) -> bool:
        """Whether the last mask allowed `token`."""
        return 0 <= token < self.n_tokens and bool((int(self.bitmask[token // 32]) >> (token % 32)) & 1)

    def allowed(self) -> np.ndarray:
        """The ids the grammar allows next (a fresh mask)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        return self._allowed()

    def _allowed(self) -> np.ndarray:
        words = self.bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
        return np.flatnonzero(np.unpackbits(words, bitorder="little", count=self.n_tokens))

    def fallback(self) -> int:
        """The allowed token with the lowest id (see the module: logit_bias banned all of them)."""
        allowed = self._allowed()
        return int(allowed[0]) if len(allowed) else 0

    def advance(self, token: int) -> bool:
        """Feeds the sampled token; False when the matcher refused it (see `error`)."""
        return self.matcher.consume_token(token)

    def is_complete(self) -> bool:
        """The text is complete JSON and nothing more can follow it."""
        return self.matcher.is_stopped()


def start(tokenizer: Tokenizer, json_schema: object) -> Constraint:
    """The constraint for a request's `json_schema` (True or a schema dict); InvalidRequest
    naming json_schema when the schema is not one."""
    schema, key = check_schema(json_schema)
    g = grammars(tokenizer)
    return Constraint(g.matcher(schema, key), g.n_tokens)
