"""Finding and loading checkpoints: Hugging Face folders (pytorch_model.bin, safetensors,
sharded), repo ids from the local Hugging Face cache, and GGUF files.

Weights stream tensor by tensor into a model built on the meta device: no full float32 copy
is ever made, safetensors and zip pickles are memory-mapped, and a weight that is to be
quantized is quantized as it arrives.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gptj.device import free_memory, resolve_device
from gptj.errors import ModelLoadError, ModelTooLarge
from gptj.memory import GB, available_memory, parse_size
from gptj.model_config import ARCHITECTURES, read_config, validate_config
from gptj.models.gptj import skip_checkpoint_key
from gptj.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL = "smollm2"
QUANT_MODES = (None, "none", "bf16", "int8", "int4")  # None and "none": the weights as stored
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
MADV_DONTNEED = 4  # Linux
_UNMAPPED: set[int] = set()  # storages of checkpoint tensors that were not memory-mapped
# `gptj pull` writes this into a snapshot folder before downloading and removes it once every
# file is there: a folder that still has it is never loaded (its text: what to pull again).
INCOMPLETE_MARKER = ".gptj-pull-incomplete"

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


def resolve(name_or_path: str | None, revision: str | None = None) -> Path:
    """A GGUF file or a Hugging Face folder for a name, path or repo id."""
    if name_or_path in (None, "", "default", "smollm2", "SmolLM2-135M-Instruct"):
        from gptj.tokenizer import bundled_gguf_path

        return bundled_gguf_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        repo, _, rev = name_or_path.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=revision or rev or None, local_files_only=True,
                                          cache_dir=hf_cache_dir()))
        except Exception as exc:
            # `gptj pull` takes only the files a model needs; huggingface_hub calls such a
            # snapshot incomplete against the repo's full file listing, and names its folder.
            partial = getattr(exc, "snapshot_path", None)
            if partial and (Path(partial) / "config.json").exists():
                return Path(partial)
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache ({exc.__class__.__name__}); "
                f"download it with: gptj pull {repo}" + (f" --revision {revision or rev}" if revision or rev else "")
            ) from None
    raise ModelLoadError(f"model {name_or_path!r} not found: not a file, a folder, or a repo id like EleutherAI/gpt-j-6b")


def hf_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def weight_files(folder: Path) -> tuple[list[Path], str]:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder")
    if (folder / INCOMPLETE_MARKER).exists():
        with (folder / INCOMPLETE_MARKER).open(errors="replace") as f:
            what = " ".join(f.read(300).split()) or "the model"
        raise ModelLoadError(f"{folder} is an incomplete download: gptj pull {what} did not finish; run it again")
    if not any(folder.iterdir()):
        raise ModelLoadError(f"model folder {folder} is empty")
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json (expected a Hugging Face model folder or a .gguf file)")
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{f} is not a valid shard index: {exc}") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise ModelLoadError(f"{f} names shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards], "safetensors" if "safetensors" in name else "pytorch"
        return [f], "safetensors" if name.endswith(".safetensors") else "pytorch"
    raise ModelLoadError(f"no weights in {folder}: looked for {', '.join(WEIGHT_FILES)}")


def iter_tensors(files: list[Path], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            if fmt == "safetensors":
                from safetensors import safe_open

                with safe_open(f, framework="pt") as st:
                    for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                        yield key, st.get_tensor(key)
            else:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    state = torch.load(f, map_location="cpu", weights_only=True)  # legacy format: no mmap
                    # These tensors live in ordinary memory, where dropping pages would zero
                    # them (and storages can be shared): mark them so none are released.
                    for t in state.values():
                        _UNMAPPED.add(t.untyped_storage().data_ptr())
                yield from state.items()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"weight file {f} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def release_mapped_pages(t: torch.Tensor) -> None:
    """Drops the whole pages of a memory-mapped checkpoint tensor from this process once the
    model holds its own copy: otherwise every page read stays resident until the file is
    closed, and loading a 12 GB pickle would peak at the file's size plus the model's."""
    if t.device.type != "cpu" or t.numel() == 0 or t.untyped_storage().data_ptr() in _UNMAPPED:
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def bytes_per_weight(mode: str | None, dtype: torch.dtype) -> float:
    # int4: a byte per 2 weights, an fp16 scale and min per group of 32
    return {"int8": 1.0, "int4": 0.5 + 4 / 32, "bf16": 2.0}.get(mode or "", torch.empty((), dtype=dtype).element_size())


def estimate_bytes(model: nn.Module, mode: str | None, dtype: torch.dtype) -> int:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    other = sum(p.numel() for p in model.parameters()) - linear
    element = torch.empty((), dtype=dtype).element_size()
    return int(linear * bytes_per_weight(mode, dtype) + other * element)


def check_memory(name: str, model: nn.Module, mode: str | None, dtype: torch.dtype, max_memory: int | None) -> None:
    need = estimate_bytes(model, mode, dtype)
    have = max_memory if max_memory is not None else available_memory()
    if need > have:
        alternatives = ", ".join(
            f"{m}: {estimate_bytes(model, m, dtype) / GB:.1f} GB" for m in ("int8", "int4") if m != mode
        )
        raise ModelTooLarge(
            f"{name} needs about {need / GB:.1f} GB of memory as {mode or str(dtype).removeprefix('torch.')}, "
            f"but only {have / GB:.1f} GB is available; quantize it ({alternatives})"
        )


def default_dtype(n_params: int) -> torch.dtype:
    # float32 is fastest on CPUs for small models; big ones would not fit (GPT-J: 24 GB).
    return torch.float32 if n_params < 1_000_000_000 else torch.bfloat16


def fill(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    quantize: str | None,
    skip: Callable[[str], bool] = lambda _: False,
    progress: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
    release: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Moves checkpoint tensors into a meta-device model on `device`, checking names and shapes.

    `release(t)` is called for each checkpoint tensor once the model holds a copy of it (or its
    quantized form), so that memory-mapped pages leave the process as loading goes on."""
    targets = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, tensor in tensors:
        if skip(name):
            continue
        if name not in targets:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (is this the right architecture?)")
        expected = targets.pop(name)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ModelLoadError(
                f"tensor {name!r} has shape {list(tensor.shape)}, the config says {list(expected.shape)}"
            )
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        if quantize and isinstance(module, nn.Linear):
            # Keep the checkpoint's dtype until the layer is complete, then quantize it: only
            # one full-precision matrix exists at a time.
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            if not any(p.is_meta for p in module.parameters()):
                from gptj.quant import quantize_linear

                parent_name, _, child = module_name.rpartition(".")
                setattr(modules[parent_name], child, quantize_linear(module, quantize).to(device))
                if release:
                    for p in module.parameters():
                        release(p)
        else:
            param = tensor.to(device=device, dtype=dtype).contiguous()
            module._parameters[leaf] = nn.Parameter(param, requires_grad=False)
            if release and param.data_ptr() != tensor.data_ptr():
                release(tensor)
        if progress:
            progress(tensor.numel() * tensor.element_size())
    if getattr(model.config, "tie_word_embeddings", False):
        targets.pop("lm_head.weight", None)
        model.lm_head.weight = model.model.embed_tokens.weight
        if quantize:
            from gptj.quant import quantize_linear

            model.lm_head = quantize_linear(model.lm_head, quantize).to(device)
    if targets:
        listed = ", ".join(list(targets)[:5]) + (" ..." if len(targets) > 5 else "")
        raise ModelLoadError(f"the checkpoint lacks {len(targets)} tensors: {listed}")


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
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, display, quantize, dtype, limit, device)
    if path.is_file():
        raise ModelLoadError(f"{path} is a file; give the model folder that holds config.json, or a .gguf file")
    files, fmt = weight_files(path)
    config = read_config(path / "config.json")
    arch = config.get("model_type", "?")
    model, cfg = build(arch, config, path / "config.json")
    n_params = sum(p.numel() for p in model.parameters())
    dtype = dtype or default_dtype(n_params)
    stored_mode = (config.get("quantization_config") or {}).get("mode")
    if stored_mode and quantize not in (None, stored_mode):
        raise ModelLoadError(f"{path} is already quantized to {stored_mode}; load it without quantize={quantize!r}")
    check_memory(display, model, quantize or stored_mode, dtype, limit)

    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total, path.name, progress)
    skip = skip_checkpoint_key if arch == "gptj" else (lambda n: n.endswith("rotary_emb.inv_freq"))
    tensors = iter_tensors(files, fmt)
    if stored_mode:
        # A `gptj quantize` checkpoint: its layers come quantized, used as mapped.

        state = dict(tensors)
        install_quantized_layers(model, state)
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
    info = ModelInfo(
        name=display,
        architecture=arch,
        path=str(path),
        parameters=n_params,
        quantization=quantize or "none",
        dtype=str(dtype).removeprefix("torch."),
        context_length=cfg.context_length,
        format=fmt,
        vocab_size=cfg.vocab_size,
        device=str(device),
    )
    return model, tokenizer, info


def _load_gguf(path: Path, display: str, quantize: str | None, dtype: torch.dtype | None, limit: int | None,
               device: torch.device | str = "cpu"):
    from gptj.gguf import GGUF_KEYS, read_gguf

    meta, config, tensors = read_gguf(path)  # ModelLoadErrors that name the file
    arch = config.get("model_type", "?")
    model, cfg = build(arch, config, path, GGUF_KEYS)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = dtype or default_dtype(n_params)
    check_memory(display, model, quantize, dtype, limit)
    fill(model, iter(tensors.items()), dtype, quantize, device=device)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{path}: unusable tokenizer metadata ({type(exc).__name__}: {exc})") from None
    info = ModelInfo(
        name="SmolLM2-135M-Instruct" if display == DEFAULT_MODEL else display,
        architecture=arch,
        path=str(path),
        parameters=n_params,
        quantization=quantize or "none",
        dtype=str(dtype).removeprefix("torch."),
        context_length=cfg.context_length,
        format="gguf",
        vocab_size=cfg.vocab_size,
        device=str(device),
    )
    return model, tokenizer, info


def _progress_bar(total: int, label: str, enabled: bool | None):
    if enabled is None:
        enabled = total > 500e6 and os.isatty(2)
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {label}", leave=False)


def install_quantized_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replaces each Linear whose `qweight` is in `state` by a QuantizedLinear over those
    tensors (no copy) and removes its tensors from `state`."""
    from gptj.quant import QuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in state:
            prefix = f"{name}."
            layer = QuantizedLinear.from_state(state, prefix)
            if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
                raise ModelLoadError(
                    f"quantized layer {name} is {layer.in_features}x{layer.out_features}, "
                    f"the config says {module.in_features}x{module.out_features}"
                )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            for key in [k for k in state if k.startswith(prefix) and k.count(".") == name.count(".") + 1]:
                del state[key]
