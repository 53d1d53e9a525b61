"""A Hugging Face folder's weights, streamed tensor by tensor into a model built on the meta
device: shards found, safetensors and zip pickles memory-mapped (and their pages released once
copied), each linear quantized as it arrives, quantized checkpoints installed as they are."""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from gptj.errors import ModelLoadError
from gptj.loading.resolve import INCOMPLETE_MARKER
from gptj.memory import huge_page_empty

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
MADV_DONTNEED = 4  # Linux
_UNMAPPED: set[int] = set()  # storages of checkpoint tensors that were not memory-mapped


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


def keep_mapped() -> bool:
    """GPTJ_MMAP=1: a quantized checkpoint's int8 layers read the mapped file (pages shared with
    other processes through the page cache) instead of a copy in this process's memory, except
    where the kernels read int8 panels (gptj.quant), which are a copy in any case."""
    return os.environ.get("GPTJ_MMAP", "0") == "1"


def install_quantized_layers(model: nn.Module, state: dict[str, torch.Tensor], on_cpu: bool = True) -> None:
    """Replaces each Linear whose `qweight` is in `state` by a QuantizedLinear over those
    tensors, copied into this process's memory (int4: into the kernels' panels; int8: into
    theirs where the kernels read them) and their mapped pages dropped, and removes its tensors
    from `state`.

    Decode streams every weight each token, and from anonymous memory it does so measurably
    faster than from the page cache's file mapping (benchmarks/bench_mapped_weights.py); the
    copy costs a second or two at load. int8 layers stay on the file with keep_mapped(), or
    where they go to a GPU next (on_cpu False): that move copies them anyway."""
    from gptj.quant import QuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in state:
            prefix = f"{name}."
            layer = QuantizedLinear.from_state(state, prefix)
            copied: tuple[str, ...] = ()
            if layer.mode == "int8" and on_cpu and not keep_mapped():
                copied = ("qweight", "scales", "bias")
                for buffer in copied:
                    t = getattr(layer, buffer)
                    if t is not None:  # the rows the kernels stream: in huge pages (gptj.memory)
                        setattr(layer, buffer, huge_page_empty(*t.shape, dtype=t.dtype).copy_(t))
            elif layer.mode == "int4" and layer.panels is not None:
                copied = ("qweight", "scales", "mins", "zeros")  # int4: into the kernels' panels
            if layer.mode == "int8" and layer.panels is not None and "qweight" not in copied:
                copied += ("qweight",)  # into the kernels' panels, mapped or not
            for key in copied:
                if prefix + key in state:
                    release_mapped_pages(state[prefix + key])
            if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
                raise ModelLoadError(
                    f"quantized layer {name} is {layer.in_features}x{layer.out_features}, "
                    f"the config says {module.in_features}x{module.out_features}"
                )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            for key in [k for k in state if k.startswith(prefix) and k.count(".") == name.count(".") + 1]:
                del state[key]
