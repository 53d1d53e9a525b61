"""A loaded model's weights moved into one arena of anonymous memory advised for transparent
huge pages, on Linux CPUs.

Decode reads every weight once per token, a stream of gigabytes. A memory-mapped checkpoint
(int8 layers are used in place) or a torch allocation sits in 4 KB pages: a TLB miss every
4 KB, doubled in cost under a VM's nested paging, and the hardware prefetchers stop at each page
boundary. In 2 MB pages the same stream reads measurably faster (README: Speed). llama.cpp
reads weights from the page cache by default; this copy costs a second or two at load instead.

Off where the kernel never gives huge pages (transparent_hugepage is `never`), off the CPU, and
with GPTJ_HUGE_PAGES=0. The source pages of a file-mapped checkpoint are released tensor by
tensor, so the peak stays near one copy of the model.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each tensor starts on a page: as aligned as any kernel wants
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux 5.14: a mapped file's page tables filled in one call, not a fault per 4 KB
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_ARENAS: dict[int, tuple[int, int]] = {}  # live arenas' address ranges, by id of their mapping


def available() -> bool:
    """Whether weights are moved: Linux, GPTJ_HUGE_PAGES not 0, and the kernel's setting not `never`."""
    if os.environ.get("GPTJ_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping with room for nbytes from a huge-page boundary, advised for huge pages;
    returns it and that boundary's offset in it."""
    # whole huge pages, all inside the mapping: advice past its end would reach a neighbouring one
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buf = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    start = -(-addr // HUGE_PAGE) * HUGE_PAGE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_HUGEPAGE)  # advice: failure is harmless
    _ARENAS[id(buf)] = (addr, addr + len(buf))
    weakref.finalize(buf, _ARENAS.pop, id(buf), None)
    return buf, start - addr


def in_arena(t: torch.Tensor) -> bool:
    """Whether t already lies in huge-page-advised memory of this module's."""
    ptr = t.data_ptr()
    return any(lo <= ptr and ptr + t.nbytes <= hi for lo, hi in _ARENAS.values())


def empty(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 tensor of nbytes, in huge-page-advised memory where `available()`
    (freed with the tensor), else torch's."""
    if nbytes < HUGE_PAGE or not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    buf, offset = arena(nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)


class _FileMappings:
    """This process's file-backed address ranges (/proc/self/maps), to tell whose pages may be
    dropped: dropping anonymous pages would zero them."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            for line in Path("/proc/self/maps").read_text().splitlines():
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0":  # an inode: a file
                    lo, hi = fields[0].split("-")
                    self.ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass
        self.ranges.sort()
        self.starts = [lo for lo, _ in self.ranges]

    def holds(self, ptr: int, nbytes: int) -> bool:
        i = bisect.bisect_right(self.starts, ptr) - 1
        return i >= 0 and self.ranges[i][1] >= ptr + nbytes


def _advise(t: torch.Tensor, advice: int) -> None:
    """madvise over the whole pages inside t."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def _key(slot: tuple[nn.Module, str, bool]) -> tuple:
    mod, name, is_param = slot
    t = mod._parameters[name] if is_param else mod._buffers[name]
    return (t.data_ptr(), t.dtype, tuple(t.shape))


def move_weights(module: nn.Module, min_bytes: int = 1 << 16) -> int:
    """Copies every contiguous CPU parameter and buffer of at least min_bytes that a forward pass
    reads whole (not an untied embedding table) and that is not in an arena yet into one new
    arena, tied tensors staying tied; returns the bytes moved (0 where `available()` says no)."""
    if not available():
        return 0
    slots: list[tuple[nn.Module, str, bool]] = []
    sources: dict[tuple, torch.Tensor] = {}
    streamed: set[tuple] = set()  # read whole every token: all but an untied embedding table
    for mod in module.modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.nbytes < min_bytes or not t.is_contiguous():
                    continue
                if in_arena(t):  # made there (an int4 layer's tiles)
                    continue
                key = _key((mod, name, is_param))
                slots.append((mod, name, is_param))
                sources.setdefault(key, t)
                if not isinstance(mod, nn.Embedding):
                    streamed.add(key)
    slots = [s for s in slots if _key(s) in streamed]
    sources = {k: t for k, t in sources.items() if k in streamed}
    if not sources:
        return 0
    offsets, total = {}, 0
    for key, t in sources.items():
        offsets[key], total = total, total + -(-t.nbytes // ALIGN) * ALIGN
    buf, base = arena(total)
    mapped = _FileMappings()
    moved: dict[tuple, torch.Tensor] = {}
    for key, t in sources.items():
        new = torch.frombuffer(buf, dtype=torch.uint8, count=t.nbytes, offset=base + offsets[key])
        new = new.view(t.dtype).view(t.shape)
        from_file = mapped.holds(t.data_ptr(), t.nbytes)
        if from_file:
            _advise(t, MADV_POPULATE_READ)
        new.copy_(t.detach())
        if from_file:
            _advise(t, MADV_DONTNEED)  # a checkpoint's file pages: re-read from the file if anything still reads t
        moved[key] = new
    params: dict[int, nn.Parameter] = {}  # one Parameter per old one: `a.weight is b.weight` stays true
    for mod, name, is_param in slots:
        old = mod._parameters[name] if is_param else mod._buffers[name]
        new = moved[_key((mod, name, is_param))]
        if is_param:
            if id(old) not in params:
                params[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad)
            mod._parameters[name] = params[id(old)]
        else:
            mod._buffers[name] = new
    return total
