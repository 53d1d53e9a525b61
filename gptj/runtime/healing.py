"""Token healing: a prompt that stops where the model's own text would go on inside one token.

SmolLM2's tokenizer spells "def f(n):\\n    return" as "):", "\\n   ", " return": the newline
goes with the next line's indent. A prompt that ends in "\\n" ends on the lone "\\n" token, which
in the model's training text comes only before a line that is not indented, and the model writes
unindented Python. The same happens with a trailing space (" Paris" is one token, the lone " "
rare) and with "http:" ("://" is one token): the old GPT-J advice was "no trailing spaces in the
prompt".

Healing (as guidance and llama.cpp's token healing do it): the engine takes the prompt's last
token off and lets the first generated token be only one whose bytes begin with the removed text
R: the removed token itself, or a longer one such as "\\n   ". The model so chooses how the
text goes on from R, as its training text had it. The rest is unconstrained.

What a caller sees stays a continuation of the prompt as sent:
- The text (streamed and final) leaves R out: the first token's text begins with R, and only
  what follows R is emitted. Nothing is dropped or said twice: prompt + text reads right.
- When the first token is the removed token itself, the prompt stands as it was sent: that token
  goes back onto the prompt, is not counted or reported as generated, and generation goes on
  unconstrained, as it would have without healing.
- Otherwise tokens and token_infos report the real ids generated; the first one's `healed` (and
  the Completion's) is R, which its text starts with. Its logprob and top_logprobs are those of
  the healed step: the model's distribution over the allowed tokens (all others at -inf), i.e. of
  the first token given the whole prompt text. prompt_tokens counts the prompt as sent.

The rule (plan()): the last token is healed only when all of these hold.
- `token_healing` is on (the default) and at least one token is to be generated.
- The prompt's logprobs are not asked for (echo with logprobs scores the prompt as sent).
- The prompt has two tokens or more: one is left to condition on.
- The last token is ordinary text: not a special or control token (an end-of-text, a chat
  template's marker), and its bytes are whole UTF-8 characters.
- Its text ends in whitespace or punctuation, not in a letter or a digit. A prompt that ends in a
  word ("Hello world") may end in a whole word the user meant, and healing would let the model
  change it ("Hello worldwide"); the tokenizer never joins a word with the space after it, so a
  whole word is already a natural boundary. Whitespace and punctuation are where tokens run on
  across the prompt's end ("\\n" + "    ", " " + "Paris", ":" + "//"), and a prompt cannot mean
  "the token stops here" by them.
- Some longer token begins with it (otherwise there is nothing to heal).
Chat prompts are never healed (gptj.chat and the chat presets turn it off): they end in a chat
template's generation prompt ("<|im_start|>assistant\n") or a play script's "GPT-J:", a boundary
the model knows exactly as it stands; healing could only move it.

Only one token is backed up: guidance's older multi-token healing (its TokenHealingLogitsProcessor
backs up over several tokens and constrains as many steps) is not done here.

The allowed tokens come from a PrefixIndex, built once per tokenizer: its ids sorted by their
bytes, so the tokens that begin with R are one run of them, found by two binary searches.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import torch

from gptj.runtime.sampling import SamplingParams
from gptj.tokenizer import Tokenizer

__all__ = ["Healing", "PrefixIndex", "plan", "prefix_index"]


def _after(prefix: bytes) -> bytes | None:
    """The least byte string above every string that begins with `prefix` (None: there is none,
    `prefix` is all 0xff bytes)."""
    head = prefix.rstrip(b"\xff")
    if not head:
        return None
    return head[:-1] + bytes([head[-1] + 1])


class PrefixIndex:
    """The tokenizer's ordinary tokens (special ones and empty ids left out) sorted by their
    bytes: the tokens that begin with given bytes are one contiguous run."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = [i for i in range(tokenizer.vocab_size) if not tokenizer.is_special(i) and tokenizer.token_bytes(i)]
        ids.sort(key=tokenizer.token_bytes)
        self.keys = [tokenizer.token_bytes(i) for i in ids]
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.keys)

    def _run(self, prefix: bytes) -> tuple[int, int, int]:
        """(lo, exact, hi): keys[lo:hi] begin with `prefix`, keys[lo:exact] are equal to it."""
        lo = bisect_left(self.keys, prefix)
        exact = bisect_right(self.keys, prefix, lo)
        end = _after(prefix)
        hi = len(self.keys) if end is None else bisect_left(self.keys, end, exact)
        return lo, exact, hi

    def starting_with(self, prefix: bytes) -> torch.Tensor:
        """Ids of the tokens whose bytes begin with `prefix` (itself included), by their bytes."""
        lo, _, hi = self._run(prefix)
        return self.ids[lo:hi]

    def longer(self, prefix: bytes) -> torch.Tensor:
        """Ids of the tokens whose bytes begin with `prefix` and go on past it."""
        _, exact, hi = self._run(prefix)
        return self.ids[exact:hi]


_indexes: weakref.WeakKeyDictionary[Tokenizer, PrefixIndex] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def prefix_index(tokenizer: Tokenizer) -> PrefixIndex:
    """The tokenizer's PrefixIndex, built on first use (~0.1 s for 50k tokens) and kept as long
    as the tokenizer is."""
    with _lock:
        index = _indexes.get(tokenizer)
        if index is None:
            index = _indexes[tokenizer] = PrefixIndex(tokenizer)
        return index


@dataclass
class Healing:
    """One request's healing: its prompt's last token, taken off, and the first tokens allowed."""

    token: int  # the removed token
    text: str  # its text (R)
    prefix: bytes  # its bytes
    allowed: torch.Tensor  # the removed token, then every token that begins with its bytes and goes on

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """In place: every token but the allowed ones gets a logit of -inf."""
        keep = logits[self.allowed]
        logits.fill_(float("-inf"))
        logits[self.allowed] = keep
        return logits

    def allows(self, token: int) -> bool:
        return token == self.token or bool((self.allowed == token).any())


def plan(tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> Healing | None:
    """How to heal this prompt's end, or None where the rule (see the module) says not to."""
    if not params.token_healing or params.max_new_tokens < 1 or params.prompt_logprobs is not None:
        return None
    if len(prompt_ids) < 2:
        return None
    last = prompt_ids[-1]
    if not 0 <= last < tokenizer.vocab_size or tokenizer.is_special(last):
        return None
    prefix = tokenizer.token_bytes(last)
    try:
        text = prefix.decode("utf-8")
    except UnicodeDecodeError:  # part of a character
        return None
    if not text or text[-1].isalnum():
        return None
    longer = prefix_index(tokenizer).longer(prefix)
    if not len(longer):
        return None
    return Healing(last, text, prefix, torch.cat([torch.tensor([last]), longer]))
