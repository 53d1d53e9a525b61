"""Sampling settings and the logits processors that apply them, for one sequence at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from gptj.errors import InvalidRequest

if TYPE_CHECKING:
    import torch
# torch is imported where the sampler runs, not here: SamplingParams (validating settings, the
# CLI's defaults, presets) must not cost the seconds torch takes to import (`gptj presets`).

__all__ = ["InvalidRequest", "SamplingParams", "apply_logit_bias", "apply_penalties", "candidates", "choose_token"]

BAN = -100.0  # a logit_bias of -100 bans the token outright (OpenAI: "should result in a ban")


MAX_TEMPERATURE = 5.0  # every surface: Python, CLI, each HTTP API


@dataclass
class SamplingParams:
    # Defaults follow the common local-LLM tools (Ollama, llama.cpp): a little randomness.
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely
    prompt_logprobs: int | None = None  # the same for each prompt token (computed in its prefill chunks)
    truncate_prompt: bool = False  # left-truncate a prompt that does not fit instead of failing
    # OpenAI's logit_bias: token id -> -100..100 added to its logit before sampling (-100 bans it);
    # the ids must be below the model's vocabulary size (the Python API and the server check it)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # token healing (gptj.runtime.healing): back up over the prompt's last token when it may be the
    # start of a longer one (a trailing space or newline), and let the first token begin with its text
    token_healing: bool = True
    # constrained output (gptj.runtime.constraints): None or False, free text; True, any JSON
    # object; a dict, JSON valid for that JSON schema (checked and compiled at submit)
    json_schema: dict[str, Any] | bool | None = None

    def validate(self) -> SamplingParams:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise InvalidRequest(name, message)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens", "must be an integer >= 0")
        need(0.0 <= self.temperature <= MAX_TEMPERATURE and math.isfinite(self.temperature), "temperature",
             f"must be between 0 and {MAX_TEMPERATURE:g}")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be > 0 and <= 1")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 disables it)")
        need(0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1")
        need(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be > 0 and <= 10")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
        need(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        need(len(self.stop) <= 16, "stop", "at most 16 stop sequences")
        need(all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop), "stop", "each stop sequence must be 1 to 256 characters")
        need(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20")
        need(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be between 0 and 20")
        need(isinstance(self.token_healing, bool), "token_healing", "must be true or false")
        need(self.json_schema is None or isinstance(self.json_schema, bool | dict), "json_schema",
             "must be a JSON schema (a dict), True for any JSON object, or None")
        need(isinstance(self.logit_bias, dict), "logit_bias", "must map token ids to numbers from -100 to 100")
        for token, bias in self.logit_bias.items():
            need(isinstance(token, int) and not isinstance(token, bool) and token >= 0, "logit_bias",
                 f"keys must be token ids (integers >= 0), got {token!r}")
            need(isinstance(bias, int | float) and not isinstance(bias, bool) and -100.0 <= bias <= 100.0, "logit_bias",
                 f"the bias of token {token} must be a number from -100 to 100, got {bias!r}")
        return self

    @cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (ids, values), built once per request; a ban's value is -inf."""
        import torch

        ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
        values = torch.tensor([float("-inf") if b <= BAN else float(b) for b in self.logit_bias.values()])
        return ids, values

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def apply_penalties(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor) -> torch.Tensor:
    """Repetition penalty as in CTRL/transformers (divide positive logits, multiply negative),
    then OpenAI's presence and frequency penalties, over the prompt and the generated tokens."""
    if history.numel() == 0:
        return logits
    if params.repetition_penalty != 1.0:
        import torch

        seen = history.unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        ids, counts = history.unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's logit_bias, in place: each listed token's logit plus its bias; -100 bans the
    token (its logit becomes -inf), 100 all but forces it."""
    if params.logit_bias:
        ids, values = params.bias_tensors
        logits[ids] += values.to(logits.dtype)
    return logits


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the settings keep and their probabilities: (ids, probs), most likely first
    (all ids in vocabulary order when nothing is filtered). Temperature, then top-k, top-p
    (the smallest set whose mass reaches top_p; the most likely token always stays) and min-p.

    Found without sorting the vocabulary: torch.sort of 50k logits is slow on a small CPU,
    more than a forward pass of the bundled model. top-k takes the k best directly; top-p alone
    looks at the 256 most likely tokens first (the nucleus is almost always among them) and at
    more only when their mass falls short of top_p. Raises RuntimeError when the settings
    leave no distribution (a temperature of 1e-309 overflows the logits).

    Probabilities and the top-p cut are computed in float64: a float32 softmax and cumulative
    sum round differently with each instruction set's summation order, which moved the cut by a
    token on one CPU; in float64 only masses within ~1e-15 of top_p could still differ."""
    import torch

    scaled = logits.double() / params.temperature
    vocab = scaled.shape[-1]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k == vocab and params.top_p >= 1.0 and params.min_p <= 0.0:
        ids, probs = torch.arange(vocab), scaled.softmax(-1)
    else:
        if k == vocab and params.top_p < 1.0:  # top-p measures mass over the whole vocabulary
            everything = scaled.softmax(-1)
            probs, ids = torch.topk(everything, min(256, vocab))  # sorted, most likely first
            # tokens past these are all dropped once their mass reaches top_p
            while len(ids) < vocab and float(probs.sum()) < params.top_p:
                probs, ids = torch.topk(everything, min(vocab, 4 * len(ids)))
        else:  # top-k renormalizes over its k tokens
            values, ids = torch.topk(scaled, k)
            probs = values.softmax(-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if params.top_p < 1.0:
            keep &= (probs.cumsum(-1) - probs) < params.top_p  # the mass before a token is below top_p
            keep[0] = True  # the most likely token always stays, also when top_p rounds to 0 in float32
        if params.min_p > 0.0:
            keep &= probs >= params.min_p * probs[0]
        ids, probs = ids[keep], probs[keep]
        probs = probs / probs.sum()
    if probs.numel() == 0 or not bool(torch.isfinite(probs).all()):  # NaNs drop every token too
        raise RuntimeError("no distribution to sample from")  # the engine takes the most likely token
    return ids, probs


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from float32 logits [vocab] after penalties and masking. Adds the
    request's logit_bias to `logits` in place first (so a caller that falls back to the
    argmax of the same tensor still respects its bans)."""
    import torch

    apply_logit_bias(logits, params)
    if params.greedy:
        return int(torch.argmax(logits))
    ids, probs = candidates(logits, params)
    # Inverse CDF with one uniform draw (torch.multinomial is slow over 50k ids).
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), len(ids) - 1)
    return int(ids[i])
