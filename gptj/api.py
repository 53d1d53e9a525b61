"""The Python API: `load()` returns a Model whose generate/stream/logits use the one engine."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch

from gptj.errors import InvalidRequest
from gptj.loading import ModelInfo, load_model
from gptj.loading.resolve import default_quantization
from gptj.memory import parse_size
from gptj.runtime import speculative as speculation
from gptj.runtime.engine import Completion, Engine, RequestHandle
from gptj.runtime.prefix_cache import DEFAULT_BYTES as PREFIX_STORE_BYTES
from gptj.runtime.sampling import SamplingParams
from gptj.tokenizer import Tokenizer

_SETTING_NAMES = {f.name for f in fields(SamplingParams)}
# Fusing q/k/v saves a fixed cost per layer call, which matters when layers take microseconds
# (the bundled 135M model); a 6B model's layers take milliseconds, and fusing would copy weights
# that are memory-mapped (the copies and the mapped pages both count as resident).
FUSE_BELOW_PARAMETERS = 2_000_000_000


def sampling_params(**settings: object) -> SamplingParams:
    """SamplingParams from keyword settings, rejecting unknown names with the list of known ones."""
    unknown = sorted(set(settings) - _SETTING_NAMES)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown setting; known settings are {', '.join(sorted(_SETTING_NAMES))}")
    clean = {k: v for k, v in settings.items() if v is not None or k == "seed"}
    if isinstance(clean.get("stop"), str):
        clean["stop"] = [clean["stop"]]
    return SamplingParams(**clean).validate()


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias may name only rows the model has (0..vocab_size-1)."""
    bad = next((t for t in params.logit_bias if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest("logit_bias", f"token id {bad} is outside 0..{vocab_size - 1}")


def check_token_ids(ids: Sequence[object], vocab_size: int, field: str) -> list[int]:
    """A prompt's token ids as ints (numpy's and torch's integers pass), each a row of the
    embedding (0..vocab_size-1): one past them would fail inside the step."""
    for t in ids:
        if isinstance(t, bool) or not hasattr(type(t), "__index__"):
            raise InvalidRequest(field, f"token ids must be integers, got {t!r}")
    out = [operator.index(t) for t in ids]  # type: ignore[call-overload]
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside 0..{vocab_size - 1}")
    return out


class Model:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, info: ModelInfo, max_batch: int = 1,
                 context_length: int | None = None, prefix_cache: bool = True,
                 prefix_cache_bytes: int = PREFIX_STORE_BYTES, speculative: str = "ngram",
                 speculative_tokens: int | None = None) -> None:
        self.module = model
        self.tokenizer = tokenizer
        self.info = info
        self.config = model.config
        # Embedding rows no text maps to are never sampled: padding tokens, and rows past the
        # tokenizer (GPT-J has 50400 rows for 50257 tokens).
        banned = [*tokenizer.padding_ids, *range(tokenizer.vocab_size, model.config.vocab_size)]
        kv_dtype = torch.float32 if info.dtype == "float32" else torch.bfloat16
        self.engine = Engine(
            model,
            tokenizer,
            max_batch=max_batch,
            context_length=context_length,
            kv_dtype=kv_dtype,
            banned_token_ids=banned,
            eos_token_ids=tokenizer.end_ids,
            prefix_cache=prefix_cache,
            prefix_cache_bytes=prefix_cache_bytes,
            speculative=speculative,
            speculative_tokens=speculative_tokens or speculation.DEFAULT_TOKENS,
        )

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def device(self) -> torch.device:
        """Where the weights and the KV cache are (`load(device=...)`)."""
        return self.engine.device

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            return self.tokenizer.encode_prompt(prompt)
        ids = check_token_ids(prompt, self.config.vocab_size, "prompt")
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        return ids

    def submit(self, prompt: str | Sequence[int], preset: str | None = None, **settings: object) -> RequestHandle:
        if preset is not None:  # the preset's template around the prompt, its settings under ours
            from gptj.presets import apply_preset

            prompt, settings = apply_preset(preset, str(prompt), settings)
        params = sampling_params(**settings)
        check_logit_bias(params, self.config.vocab_size)
        return self.engine.submit(self.encode_prompt(prompt), params)

    def generate(self, prompt: str | Sequence[int], **settings: object) -> Completion:
        """Generate a continuation. Settings: max_new_tokens, temperature, top_p, top_k, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, stop, stop_token_ids, seed,
        ignore_eos, logprobs, truncate_prompt, logit_bias ({token id: -100..100}, -100 bans),
        token_healing (True: a prompt ending in a space or newline is continued as if the model
        had written it, see gptj.runtime.healing; False turns it off),
        json_schema (True: the text is a JSON object; a dict: JSON valid for that JSON schema, e.g.
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]};
        see gptj.runtime.constraints; a bad schema raises ValueError naming json_schema);
        `preset="translation"` (see gptj.presets) puts the
        prompt into that preset's template and takes its settings where none are given."""
        return self.submit(prompt, **settings).result()

    def stream(self, prompt: str | Sequence[int], **settings: object) -> Iterator[str]:
        """Yields text pieces as they are generated (never half a UTF-8 character, never part
        of a stop sequence). Closing the iterator early cancels the generation."""
        handle = self.submit(prompt, **settings)  # type: ignore[arg-type]
        try:
            for event in handle:
                if event.text:
                    yield event.text
        finally:
            handle.cancel()

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 next-token logits [len(token_ids), vocab] for every position (no cache), on the CPU."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        if ids.shape[1] == 0 or ids.shape[1] > self.config.context_length:
            raise InvalidRequest("token_ids", f"need 1 to {self.config.context_length} tokens, got {ids.shape[1]}")
        # in the engine's driving thread, between steps: torch work stays in one thread
        return self.engine.call(lambda: self.module(ids)[0].cpu())

    def __repr__(self) -> str:
        i = self.info
        return f"<gptj.Model {i.name} ({i.architecture}, {i.parameters / 1e6:.0f}M params, {i.quantization})>"


def load(
    name_or_path: str | None = None,
    quantize: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    revision: str | None = None,
    max_batch: int = 1,
    context_length: int | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    prefix_cache: bool = True,
    prefix_cache_bytes: int | str = PREFIX_STORE_BYTES,
    speculative: str = "ngram",
    speculative_tokens: int | None = None,
) -> Model:
    """Load a model: None for the bundled SmolLM2-135M-Instruct, a folder in Hugging Face layout,
    a .gguf file, or a repo id (`EleutherAI/gpt-j-6b`) already in the local Hugging Face cache.
    `quantize`: "none" (the weights as stored; a GGUF's dequantized), "bf16", "int8" or "int4";
    None, the default, is int8 for the bundled model (several times faster than float32 with the
    same perplexity, README: Speed; "none" gives float32) and the weights as stored for others.
    `device`: "cpu" (None), "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU); weights and
    the KV cache go there. `prefix_cache` reuses the
    keys and values of a shared prompt prefix; `prefix_cache_bytes` bounds what is kept beyond
    the cache rows in use (e.g. "1GB"). `speculative`: "ngram" (prompt-lookup drafts checked in
    one pass, where that pass is exact: the text never changes) or "none"; `speculative_tokens`:
    the most drafted tokens a pass checks."""
    if speculative not in speculation.MODES:
        raise InvalidRequest("speculative", f"{speculative!r}; expected one of {', '.join(speculation.MODES)}")
    if speculative_tokens is not None and not 1 <= speculative_tokens <= speculation.MAX_TOKENS:
        raise InvalidRequest("speculative_tokens", f"{speculative_tokens}; expected 1..{speculation.MAX_TOKENS}")
    if quantize is None:  # the CLI, the server and the notebook all come here: one default
        quantize = default_quantization(name_or_path)
    module, tokenizer, info = load_model(name_or_path, quantize, dtype, max_memory, revision, progress, device)
    if info.parameters < FUSE_BELOW_PARAMETERS:
        module.fuse_projections()  # fewer, bigger GEMVs per token (gptj.fusion)
    return Model(module, tokenizer, info, max_batch=max_batch, context_length=context_length,
                 prefix_cache=prefix_cache, prefix_cache_bytes=parse_size(prefix_cache_bytes) or 0,
                 speculative=speculative, speculative_tokens=speculative_tokens)
