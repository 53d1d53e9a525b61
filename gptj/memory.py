"""How much memory this process may still take (the host's MemAvailable capped by a cgroup
limit, or a GPU's), how much a model will need, sizes as people write them ("512MB"), and
buffers in huge pages for the weights the kernels stream."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from gptj.errors import ModelTooLarge

GB = 1e9


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit."""
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        avail = 1 << 62
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            pass
    return avail


def parse_size(text: str | int | None) -> int | None:
    if text is None or isinstance(text, int):
        return text
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "b": 1}
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(float(t))


HUGE_PAGE = 2 << 20


def anonymous_mapping(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A private anonymous mapping and a uint8 tensor over all of it (which keeps it alive): pages
    the kernel provides, zeroed, only when first touched."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, torch.frombuffer(region, dtype=torch.uint8)


def huge_page_empty(*shape: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """torch.empty for weights the kernels stream: the tensor's whole 2 MB spans are asked for as
    transparent huge pages.

    The one-row GEMVs read every weight once a token; on 4 KB pages each 4 KB costs a TLB miss
    (benchmarks/results). Linux's default THP mode ("madvise") gives huge pages only to memory
    that asks. Elsewhere, below two huge pages, or with GPTJ_HUGE_PAGES=0 (where finding free 2 MB
    blocks makes the load stall on compaction), this is torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < 2 * HUGE_PAGE or os.environ.get("GPTJ_HUGE_PAGES", "1") == "0":
        return torch.empty(*shape, dtype=dtype)
    try:
        region, whole = anonymous_mapping(nbytes + HUGE_PAGE)
    except OSError:  # e.g. strict overcommit refusing the 2 MB of slack: torch's allocation
        return torch.empty(*shape, dtype=dtype)
    start = -whole.data_ptr() % HUGE_PAGE
    try:  # only the spans inside the tensor: a huge page past its end would be resident for nothing
        region.madvise(advice, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # THP "never", or a kernel without it: 4 KB pages, as torch.empty gives
        pass
    return whole[start : start + nbytes].view(dtype).view(shape)


def free_bytes(device: torch.device) -> int:
    """Free bytes where tensors on `device` would go: the GPU's, else the host's."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory()


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
