"""The `gptj` command: generate, chat, serve, tokenize, models, quantize, pull, make-random-checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gptj.cli.common import (
    add_model_args,
    add_sampling_args,
    model_from_args,
    print_weights,
    sampling_settings,
)


def cmd_generate(args: argparse.Namespace) -> int:
    from gptj.api import sampling_params
    from gptj.presets import apply_preset

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    settings = sampling_settings(args)
    if args.preset:
        prompt, settings = apply_preset(args.preset, prompt, settings)
    sampling_params(**settings)  # bad settings fail before a long model load
    model = model_from_args(args)
    print_weights(model, args)
    stream = args.stream if args.stream is not None else sys.stdout.isatty()
    if stream:
        if args.echo:
            sys.stdout.write(prompt)
        for piece in model.stream(prompt, **settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = model.generate(prompt, **settings)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens}))
    else:
        print((prompt if args.echo else "") + result.text)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    import gptj

    try:
        tok = gptj.load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as exc:
        print(f"gptj: error: --tokenizer: {exc}", file=sys.stderr)
        return 2
    text = args.text if args.text != "-" else sys.stdin.read()
    pieces = tok.pieces(text)
    spans, start, data = [], 0, text.encode("utf-8")
    for _, raw in pieces:  # which characters each piece belongs to (a byte piece: part of one)
        spans.append(_characters(data, start, start + len(raw)) if data[start : start + len(raw)] == raw else None)
        start += len(raw)
    if args.json:
        out = []
        for (i, b), chars in zip(pieces, spans, strict=True):
            entry = {"id": i, **_piece_json(b)}
            if "bytes" in entry and chars:
                entry["part_of"] = chars
            out.append(entry)
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"{len(pieces)} tokens")
    for (token_id, raw), chars in zip(pieces, spans, strict=True):
        display = _display(raw)
        if display.startswith("bytes") and chars:
            display += f"  (part of {json.dumps(chars, ensure_ascii=False)})"
        print(f"{token_id:>7}  {display}")
    return 0


def _characters(data: bytes, a: int, b: int) -> str:
    """The whole characters that bytes a..b of UTF-8 `data` belong to."""
    while a > 0 and data[a] & 0xC0 == 0x80:
        a -= 1
    while b < len(data) and data[b] & 0xC0 == 0x80:
        b += 1
    return data[a:b].decode("utf-8", errors="replace")


def _piece_json(raw: bytes) -> dict:
    """A piece as JSON: its text, or (part of a character) its bytes in hex."""
    try:
        return {"piece": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"bytes": raw.hex(" ")}


def _display(raw: bytes) -> str:
    try:
        return json.dumps(raw.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:
        return "bytes " + " ".join(f"{b:02x}" for b in raw)


def cmd_models(args: argparse.Namespace) -> int:
    from gptj.loading.catalog import list_models
    from gptj.loading.resolve import models_dir

    rows = list_models(extra_dirs=args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<44} {'ARCH':<7} {'QUANT':<8} {'SIZE':>9}  {'SOURCE':<8} PATH")
    for r in rows:
        print(f"{r['name']:<44} {r['architecture']:<7} {r['quantization']:<8} {r['size_bytes'] / 1e9:>7.2f}GB  "
              f"{r['source']:<8} {r['path']}")
    print(f"\nthe models directory: {models_dir()} (GPTJ_MODELS; gptj quantize and make-random-checkpoint write there)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from gptj.presets import load_presets, user_preset_dir

    presets, errors = load_presets()
    if args.json:
        print(json.dumps({"presets": [p.as_dict() for p in presets.values()], "errors": errors}, indent=2, ensure_ascii=False))
        return 0
    for p in presets.values():
        print(f"{p.name:<14} {p.kind:<10} {p.source if p.source != 'built-in' else '(built-in)'}\n    {p.description}")
    for e in errors:
        print(f"skipped: {e}", file=sys.stderr)
    print(f"\nyour own presets: JSON files in {user_preset_dir()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptj.cli.serve import serve

    return serve(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from gptj.cli.chat import run_chat

    return run_chat(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.dst is None:  # into the models directory, where `gptj models` and `--model NAME` find it
        from gptj.loading.catalog import default_output

        gguf = args.format == "gguf"
        suffix = (".Q8_0.gguf" if args.bits == 8 else ".Q4_1.gguf") if gguf else f"-int{args.bits}"
        args.dst = str(default_output(args.src, suffix))
    fmt = args.format or ("gguf" if args.dst.lower().endswith(".gguf") else "safetensors")
    if fmt == "gguf":
        from gptj.loading.export import write_gguf

        out = write_gguf(args.src, args.dst, args.bits, progress=sys.stderr.isatty())
    else:
        from gptj.loading.quantized import write_quantized

        out = write_quantized(args.src, args.dst, args.bits)
    print(f"wrote {out}")
    return 0


def cmd_make_random(args: argparse.Namespace) -> int:
    import torch

    from gptj.loading.random_checkpoint import make_random_checkpoint

    if args.out is None:  # into the models directory, where `gptj models` and `--model NAME` find it
        from gptj.loading.resolve import models_dir

        args.out = str(models_dir() / f"random-gptj-{args.shape}")
    out = make_random_checkpoint(args.out, args.shape, args.format, getattr(torch, args.dtype), args.seed)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote a random GPT-J ({args.shape}, {args.format}) to {out}: {size / 1e9:.2f} GB")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from gptj.loading.hub import pull

    path = pull(args.repo, revision=args.revision, gguf=args.gguf)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptj", description="Run GPT-J (or the bundled SmolLM2) locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("prompt", help="the prompt ('-' reads standard input)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--preset", default=None, help="a preset: code, chat, story, translation, knowledge, or your own")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None, help="stream text (default: when a terminal)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)

    from gptj.cli.chat import HELP as CHAT_COMMANDS

    p = sub.add_parser("chat", help="talk with the model in the terminal", epilog=CHAT_COMMANDS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--user-name", default="You")
    p.add_argument("--bot-name", default=None, help="the bot's name in a play-script chat (base models)")
    p.add_argument("--system", default=None, help="system prompt / intro text")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="the web playground and the HTTP APIs")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (continuous batching)")
    p.add_argument("--prefix-cache", default="1GB", help="memory for keys/values of earlier prompts that later ones share (0 turns it off)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; past it: 503")
    p.add_argument("--served-model-name", action="extend", nargs="+", default=None, metavar="NAME",
                   help="names /v1/models lists for the model besides its own (repeatable, or several after one flag "
                        "as in vLLM); the first is the one responses name. Any name is answered: one model is served")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (or set GPTJ_API_KEY); repeat for one key per tenant: "
                        "tenants never share cached prompts")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback host without an API key")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="NAMES",
                   help="Host names to answer besides loopback and --host (comma-separated, repeatable; '*': any). "
                        "Others get 421: a guard against DNS rebinding")
    p.add_argument("--max-connections", type=int, default=256, help="open connections past this get 503")
    p.add_argument("--cors", action="append", default=None, help="allowed CORS origin (repeatable)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a generation past this (queueing included) ends with finish_reason 'timeout'; 0: no limit")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, running requests get this long to finish, then end with finish_reason 'shutdown'")
    p.add_argument("--upstream", default=None, help="serve in front of an OpenAI-compatible server (vLLM, TGI, gptj)")
    p.add_argument("--upstream-key", default=None)
    p.add_argument("--open", action="store_true", help="open the playground in a browser")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenize", help="show how text splits into tokens")
    p.add_argument("text", help="the text ('-' reads standard input)")
    p.add_argument("--tokenizer", default="gpt-j", help="gpt-j (this command's default), gpt2, smollm2 (the bundled model's, which the HTTP API calls 'default'), a GPT-J folder, a folder with tokenizer.json, or a .gguf")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("presets", help="list the presets (built-in and your own)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("models", help="list bundled, local and cached models, their quantization and size on disk")
    p.add_argument("--dir", action="append", default=None,
                   help="also look in this folder (repeatable); the models directory ($GPTJ_MODELS, default "
                        "~/.cache/gptj/models) is always listed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("quantize", help="write an int8/int4 checkpoint that loads by memory map, or a GGUF file")
    p.add_argument("src", help="a model folder, .gguf, legacy GGML .bin or repo id (smollm2: the bundled model)")
    p.add_argument("dst", nargs="?", default=None,
                   help="the folder to write (safetensors), or a .gguf file (default: NAME-int8 or NAME.Q8_0.gguf "
                        "in the models directory, $GPTJ_MODELS or ~/.cache/gptj/models)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8: int8 / Q8_0; 4: int4 / Q4_1")
    p.add_argument("--format", choices=["safetensors", "gguf"], default=None,
                   help="safetensors (a folder gptj loads by memory map) or gguf (also for llama.cpp); "
                        "default: gguf when DST ends in .gguf")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("pull", help="download a model into the Hugging Face cache")
    p.add_argument("repo", help="e.g. EleutherAI/gpt-j-6b, or a GGUF repo with its quantization: owner/name:Q4_K_M")
    p.add_argument("--revision", default=None, help="e.g. float16")
    p.add_argument("--gguf", default=None, metavar="FILE", help="the .gguf file of the repo to download")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("make-random-checkpoint", help="write a random GPT-J in the Hugging Face layout")
    p.add_argument("out", nargs="?", default=None,
                   help="the folder to write (default: random-gptj-SHAPE in the models directory, $GPTJ_MODELS or "
                        "~/.cache/gptj/models)")
    p.add_argument("--shape", default="tiny", choices=["tiny", "small", "1b", "6b"])
    p.add_argument("--format", default="bin", choices=["bin", "safetensors", "sharded-safetensors", "sharded-bin"])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_random)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gptj.errors import InvalidRequest, ModelLoadError
    from gptj.presets import PresetError

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except (ModelLoadError, InvalidRequest, PresetError) as exc:
        print(f"gptj: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

