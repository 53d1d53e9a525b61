"""Where the model runs: `cpu`, `cuda` (`cuda:N`) or `auto` (CUDA when torch sees a GPU).

On CUDA the weights (float32/bfloat16, or int8/int4 via `gptj.quant.QuantizedLinear`) and the
KV cache live on the GPU; the engine builds its input tensors there and brings the logits of
each step back to the CPU, where sampling runs (so a seed gives the same draws on any device).
"""

from __future__ import annotations

import torch

from gptj.errors import ModelLoadError

DEVICE_CHOICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A concrete torch.device: None and "cpu" are the CPU, "auto" is CUDA when available."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        name = device.strip().lower()
        if name == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ModelLoadError(f"device: {device!r} is not one of cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ModelLoadError(f"device: {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {str(device)!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}); use --device cpu, or auto to take a GPU only when there is one"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices (0..{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a GPU; None for the CPU (the loader measures host memory itself)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's weights (buffers count: quantized layers hold only buffers)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
