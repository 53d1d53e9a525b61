"""Prompt-lookup drafting for speculative decoding (transformers' `prompt_lookup_num_tokens`,
vLLM's `ngram` method): the tokens that followed the latest earlier occurrence of the text's
last n tokens are proposed as its next ones, and one forward pass of the model checks them all.

Input-grounded text (code that edits its prompt, translation, chat that quotes) repeats long
runs of earlier tokens; a drafted run that the model confirms costs one pass over the weights
instead of one per token. The engine verifies drafts so that the output is exactly what decoding
token by token gives (gptj.runtime.engine), so drafting only ever changes the speed.
"""

from __future__ import annotations

from collections.abc import Sequence

MODES = ("ngram", "none")
DEFAULT_TOKENS = 6  # most drafted tokens a pass checks
MAX_TOKENS = 16
# tokens in one verifying pass, all requests together: past this a pass stops costing about what
# one token's pass costs (the weights' reads) and drafts that miss slow the batch down
# (benchmarks/bench_speculative.py --batch shows the crossover)
MAX_PASS_TOKENS = 12
MIN_NGRAM, MAX_NGRAM = 2, 4  # a single repeated token is too weak a hint to spend a pass on


class NgramDrafter:
    """An index of a request's token n-grams (MIN_NGRAM..MAX_NGRAM) to where each last ended,
    updated as tokens arrive, so that a proposal costs a few dictionary lookups, not a scan."""

    def __init__(self, tokens: Sequence[int], max_tokens: int = DEFAULT_TOKENS) -> None:
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}
        self.max_tokens = max_tokens
        self.budget = max_tokens  # the next draft's length: halves after a miss, doubles after a hit
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams that end here are followed by `token`
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self.ends[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to min(limit, budget) tokens that followed the longest n-gram the text ends with,
        at its latest earlier place; [] when none recurs."""
        k = min(limit, self.budget)
        if k <= 0:
            return []
        length = len(self.tokens)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if length <= n:
                continue
            end = self.ends.get(tuple(self.tokens[length - n :]))
            if end is not None:
                return self.tokens[end : min(end + k, length)]
        return []

    def accepted(self, drafted: int, accepted: int) -> None:
        """Adapts the draft length: a pass that confirms every drafted token earns a longer one
        next; a miss halves it (at least one), so free text wastes little."""
        if drafted == 0:
            return
        if accepted == drafted:
            self.budget = min(self.max_tokens, 2 * self.budget)
        elif accepted == 0:
            self.budget = max(1, self.budget // 2)
