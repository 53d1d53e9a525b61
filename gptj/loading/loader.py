"""Loading a model: the checkpoint's weights streamed into a model built on the meta device
(see gptj.loading). Everything here needs torch; the package's own `__init__` does not, so
`gptj models` and `gptj pull` start without it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gptj.device import free_memory, resolve_device
from gptj.errors import ModelLoadError
from gptj.loading.config import ARCHITECTURES, read_config, validate_config
from gptj.loading.resolve import DEFAULT_MODEL, model_name, resolve
from gptj.loading.weights import (
    fill,
    install_quantized_layers,
    iter_tensors,
    release_mapped_pages,
    weight_files,
)
from gptj.memory import check_memory, parse_size
from gptj.models.gptj import skip_checkpoint_key
from gptj.tokenizer import Tokenizer, load_tokenizer

QUANT_MODES = (None, "none", "bf16", "int8", "int4")  # None and "none": the weights as stored


@dataclass
class ModelInfo:
    name: str
    architecture: str
    path: str
    parameters: int
    quantization: str  # "none", "bf16", "int8", "int4", or the GGUF's types dequantized
    dtype: str
    context_length: int
    format: str
    vocab_size: int
    device: str = "cpu"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def default_dtype(n_params: int) -> torch.dtype:
    # float32 is fastest on CPUs for small models; big ones would not fit (GPT-J: 24 GB).
    return torch.float32 if n_params < 1_000_000_000 else torch.bfloat16


def build(arch: str, config: dict, source: str | Path = "config.json",
          names: Mapping[str, str] | None = None) -> tuple[nn.Module, object]:
    """The model on the meta device, once `config` has passed validate_config."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelLoadError(f"{source}: unknown architecture {arch!r} (model_type): supported are "
                             f"{', '.join(ARCHITECTURES)}")
    validate_config(arch, config, source, names)
    model_cls, cfg_cls = ARCHITECTURES[arch]
    try:
        cfg = cfg_cls.from_dict(config)
    except (ValueError, TypeError) as exc:  # e.g. an activation or rope scaling we do not support
        message = str(exc).removeprefix("config.json: ")
        raise ModelLoadError(f"{source}: {message}") from None
    with torch.device("meta"):
        model = model_cls(cfg)
    return model.eval(), cfg


def load_model(
    name_or_path: str | None = None,
    quantize: str | None = None,
    dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    revision: str | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Tokenizer, ModelInfo]:
    if quantize not in QUANT_MODES:
        raise ModelLoadError(f"quantize must be one of {', '.join(str(m) for m in QUANT_MODES)}, got {quantize!r}")
    if quantize == "none":
        quantize = None
    path = resolve(name_or_path, revision)
    device = resolve_device(device)
    limit = parse_size(max_memory)
    if limit is None:
        limit = free_memory(device)  # on a GPU its free memory; on the CPU the host's (check_memory)
    display = str(name_or_path or DEFAULT_MODEL)
    if path.is_file():
        kind = file_kind(path)
        if kind == "gguf":
            return _load_gguf(path, display, quantize, dtype, limit, device)
        if kind == "ggml":
            return _load_ggml(path, display, quantize, dtype, limit, device)
        raise ModelLoadError(f"{path} is a file but not a GGUF or GGML model; give the model folder that holds "
                             "config.json, a .gguf file or a legacy GGML GPT-J .bin file")
    files, fmt = weight_files(path)
    config = read_config(path / "config.json")
    arch = config.get("model_type", "?")
    model, cfg = build(arch, config, path / "config.json")
    n_params = sum(p.numel() for p in model.parameters())
    dtype = dtype or default_dtype(n_params)
    stored_mode = (config.get("quantization_config") or {}).get("mode")
    if stored_mode and quantize not in (None, stored_mode):
        raise ModelLoadError(
            f"{path} is already quantized to {stored_mode}; load it as it is (no --quantize {quantize}, "
            f"or quantize=None in Python)"
        )
    check_memory(display, model, quantize or stored_mode, dtype, limit)

    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total, path.name, progress)
    skip = skip_checkpoint_key if arch == "gptj" else (lambda n: n.endswith("rotary_emb.inv_freq"))
    tensors = iter_tensors(files, fmt)
    if stored_mode:
        # A `gptj quantize` checkpoint: its layers come quantized, used as mapped.

        state = dict(tensors)
        install_quantized_layers(model, state, on_cpu=device.type == "cpu")
        tensors, quantize = iter(state.items()), None
    release = release_mapped_pages if fmt == "pytorch" else None  # torch.load(mmap=True) maps the file
    fill(model, tensors, dtype, quantize, skip, bar.update if bar else None, device, release)
    if device.type != "cpu":
        model.to(device)  # what fill did not place: the layers of a `gptj quantize` checkpoint
    if bar:
        bar.close()
    quantize = quantize or stored_mode
    if (path / "gguf_tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.from_gguf_metadata(json.loads((path / "gguf_tokenizer.json").read_bytes()))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            raise ModelLoadError(f"{path / 'gguf_tokenizer.json'} is unusable ({type(exc).__name__}: {exc})") from None
    else:
        tokenizer = Tokenizer.gptj() if arch == "gptj" else load_tokenizer(str(path))
    return model, tokenizer, _model_info(name_or_path, arch, path, n_params, quantize, dtype, cfg, fmt, device)


def file_kind(path: Path) -> str | None:
    """'gguf' or 'ggml' (the legacy format of ggml's gpt-j example) by the file's magic, else None."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if head == b"GGUF" or (path.suffix == ".gguf" and len(head) < 4):  # a short .gguf: the GGUF reader says why
        return "gguf"
    from gptj.loading.ggml import LEGACY_MAGICS

    if len(head) == 4 and int.from_bytes(head, "little") in LEGACY_MAGICS:
        return "ggml"
    return "gguf" if path.suffix == ".gguf" else None


def _load_gguf(path: Path, display: str, quantize: str | None, dtype: torch.dtype | None, limit: int | None,
               device: torch.device | str = "cpu"):
    from gptj.loading.gguf import open_gguf

    gg = open_gguf(path)  # metadata, config and tensor table checked; no weight read yet
    try:
        tokenizer = Tokenizer.from_gguf_metadata(gg.meta)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{path}: unusable tokenizer metadata ({type(exc).__name__}: {exc})") from None
    return _load_streamed(path, display, gg.config, gg.keys, gg.tensors, tokenizer, "gguf", quantize, dtype, limit,
                          device)


def _load_ggml(path: Path, display: str, quantize: str | None, dtype: torch.dtype | None, limit: int | None,
               device: torch.device | str = "cpu"):
    from gptj.loading.ggml import open_ggml

    gm = open_ggml(path)  # header, vocab and tensor table checked; no weight read yet
    return _load_streamed(path, display, gm.config, gm.keys, gm.tensors, gm.tokenizer(), "ggml", quantize, dtype,
                          limit, device)


def _load_streamed(path: Path, display: str, config: dict, keys: Mapping[str, str], tensors, tokenizer: Tokenizer,  # noqa: ANN001
                   fmt: str, quantize: str | None, dtype: torch.dtype | None, limit: int | None,
                   device: torch.device | str = "cpu"):
    """A single-file model (GGUF, GGML) whose weights `tensors(dtype, expected_shapes)` yields one
    at a time: the memory check runs before the first one is read and dequantized."""
    arch = config.get("model_type", "?")
    model, cfg = build(arch, config, path, keys)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = dtype or default_dtype(n_params)
    check_memory(display, model, quantize, dtype, limit)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    fill(model, tensors(dtype, expected), dtype, quantize, device=device)
    return model, tokenizer, _model_info(display, arch, path, n_params, quantize, dtype, cfg, fmt, device)


def _model_info(display: str, arch: str, path: Path, n_params: int, quantize: str | None, dtype: torch.dtype,
                cfg, fmt: str, device: torch.device | str) -> ModelInfo:  # noqa: ANN001
    return ModelInfo(name=model_name(display), architecture=arch, path=str(path), parameters=n_params,
                     quantization=quantize or "none", dtype=str(dtype).removeprefix("torch."),
                     context_length=cfg.context_length, format=fmt, vocab_size=cfg.vocab_size, device=str(device))


def _progress_bar(total: int, label: str, enabled: bool | None):
    if enabled is None:
        enabled = total > 500e6 and os.isatty(2)
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {label}", leave=False)


