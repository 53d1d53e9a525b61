"""How much memory this process may still take: the host's (MemAvailable, capped by a cgroup
limit) and a GPU's; and sizes as people write them ("512MB", "1GB")."""

from __future__ import annotations

from pathlib import Path

import torch

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


def free_bytes(device: torch.device) -> int:
    """Free bytes where tensors on `device` would go: the GPU's, else the host's."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory()
