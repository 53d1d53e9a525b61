"""What the `gptj` commands share: the model and sampling options, and loading the model they name."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gptj.runtime.sampling import SamplingParams  # torch-free: `--help` must not import torch

if TYPE_CHECKING:
    from gptj.api import Model
    from gptj.loading import ModelInfo

DEFAULTS = SamplingParams()


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="folder, .gguf file, legacy GGML .bin, repo id or owner/name:QUANT (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--quantize", "-q", choices=["none", "bf16", "int8", "int4"], default=None,
                   help="weight quantization (default: int8 for the bundled model, as fast as it gets with the "
                        "same perplexity as float32; the weights as stored for others). none: float32 / as stored")
    p.add_argument("--revision", default=None, help="revision of a cached Hugging Face repo (e.g. float16)")
    p.add_argument("--max-memory", default=None, help="refuse to load above this size, e.g. 8GB")
    p.add_argument("--context-length", type=int, default=None, help="cap the context window (tokens)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="where the model runs (default auto: a CUDA GPU when torch sees one, else the CPU)")
    p.add_argument("--speculative", choices=["ngram", "none"], default="ngram",
                   help="speculative decoding by prompt lookup (default ngram: same text, faster where the "
                        "output repeats its input; used where a pass is exact, the quantized CPU path)")
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                   help="most drafted tokens one pass checks (default 6)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=None, help=f"tokens to generate (default {DEFAULTS.max_new_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=None, help=f"0 = greedy (default {DEFAULTS.temperature})")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (default {DEFAULTS.top_p})")
    g.add_argument("--top-k", type=int, default=None, help=f"0 disables (default {DEFAULTS.top_k})")
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = none")
    g.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--truncate", action="store_true", help="left-truncate a prompt that does not fit")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the text to JSON: 'object' for any JSON object, or a JSON schema (inline, or "
                        "the path of a .json file) for JSON valid for it (response_format in the API)")
    g.add_argument("--no-token-healing", dest="token_healing", action="store_false",
                   help="continue the prompt's last token as it stands (default: a prompt ending in a space, a newline "
                        "or punctuation lets the first token begin with it, e.g. a newline and an indent; "
                        "chat prompts are never healed)")


def sampling_settings(args: argparse.Namespace) -> dict:
    names = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed"]
    settings = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "truncate", False):
        settings["truncate_prompt"] = True
    if getattr(args, "token_healing", True) is False:
        settings["token_healing"] = False
    if getattr(args, "json_schema", None) is not None:
        settings["json_schema"] = json_schema_arg(args.json_schema)
    return settings


def json_schema_arg(value: str) -> dict | bool:
    """--json-schema's value: "object" is any JSON object; text starting with "{" is the schema;
    anything else is a file holding it."""
    from gptj.errors import InvalidRequest

    if value.strip() == "object":
        return True
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest("json_schema", f"cannot read {value}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("json_schema", f"not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("json_schema", "must be a JSON object (a JSON schema)")
    return schema


def model_from_args(args: argparse.Namespace, max_batch: int = 1) -> Model:
    """The model with its KV cache allocated: a cache that does not fit fails here, in one line."""
    import gptj
    from gptj.runtime.prefix_cache import DEFAULT_BYTES as PREFIX_STORE_BYTES

    model = gptj.load(
        args.model,
        quantize=args.quantize,
        revision=args.revision,
        max_memory=args.max_memory,
        context_length=args.context_length,
        max_batch=max_batch,
        device=getattr(args, "device", None),
        prefix_cache_bytes=getattr(args, "prefix_cache", PREFIX_STORE_BYTES),
        speculative=getattr(args, "speculative", "ngram"),
        speculative_tokens=getattr(args, "speculative_tokens", None),
    )
    model.engine.allocate_cache()
    return model


def weights_banner(info: ModelInfo, asked: str | None) -> str:
    """Which weights are in use, for the banner: "int8 (quantized at load)", "int4 (as stored)" or
    "float32 (not quantized)". `asked`: the quantization asked for, the default filled in."""
    mode = info.quantization
    if mode in ("none", None):
        return f"{info.dtype} (not quantized)"
    stored = None
    config = Path(info.path) / "config.json"
    if config.is_file():  # a `gptj quantize` folder says so in its config
        try:
            stored = (json.loads(config.read_text()).get("quantization_config") or {}).get("mode")
        except (OSError, ValueError, AttributeError, RecursionError):
            stored = None
    return f"{mode} (as stored)" if stored == mode or asked != mode else f"{mode} (quantized at load)"


def print_weights(model: Model, args: argparse.Namespace) -> None:
    """The banner's line on stderr (stdout keeps the text alone): the model and its weights."""
    from gptj.loading.resolve import default_quantization

    asked = args.quantize if args.quantize is not None else default_quantization(args.model)
    print(f"gptj: {model.name}, weights: {weights_banner(model.info, asked)}", file=sys.stderr, flush=True)
