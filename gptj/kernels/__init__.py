"""The C++ kernels in this folder (GEMV, decode step), one shared library per instruction-set variant.

Layout, after ggml's ``ggml-cpu/``: ``simd.h`` (ISA shims), ``gemv.h``/``gemv.cpp`` (int8/int4
GEMVs and GEMMs, the int4 and int8 panels (the weight layouts they read), dequantization,
weight quantization; the exact arithmetic is stated in gemv.h),
``amx.cpp`` (int8 and int4 batches on AMX tiles), ``decode.h``/``decode.cpp`` (a Llama or GPT-J decode
step in one call) and ``bindings.cpp`` (the C functions, and ``gq_describe()``: their types and
the structs' layouts, which this module reads instead of mirroring them by hand).

Variants, from least to most: ``avx2`` (maddubs), ``avxvnni`` (256-bit dpbusd), ``avx512``
(512-bit maddubs), ``avx512vnni`` (512-bit dpbusd), ``amx`` (avx512vnni + tiles), and ``none``:
torch's ops, no C++. Every variant gives the same bits (gemv.h). The default is the best one the
CPU runs; ``GPTJ_ISA=<variant>`` forces one, ``GPTJ_QUANT_KERNEL=0`` means ``none`` and
``GPTJ_AMX=0`` keeps the default off ``amx``. A forced variant this machine cannot run is
refused with a WARNING, and the default serves instead.

Why ctypes and not ``torch.utils.cpp_extension``: the code needs no torch headers, so the
system g++ builds a variant in seconds (cpp_extension compiles against torch's headers, minutes
per build on 2 cores), and a machine without a compiler keeps torch's ops. Each variant is built
once into ~/.cache/gptj/kernels, keyed by the sources, the compiler and its flags, and written
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (loaded first: its libgomp then serves our OpenMP too, same soname)

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
NONE = "none"
_BASE = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_BASE, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
# name -> (/proc/cpuinfo flags it needs, compiler flags), from least to most
VARIANTS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx2": (frozenset({"avx2", "fma", "f16c"}), _BASE),
    "avxvnni": (frozenset({"avx2", "fma", "f16c", "avx_vnni"}), [*_BASE, "-mavxvnni"]),
    "avx512": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}), _AVX512),
    "avx512vnni": (
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
        [*_AVX512, "-mavx512vnni"],
    ),
    "amx": (
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "amx_tile",
                   "amx_int8"}),
        [*_AVX512, "-mavx512vnni", "-mamx-tile", "-mamx-int8"],
    ),
}  # fmt: skip
# -ffp-contract=off: a * b + c stays two roundings (no fused multiply-add), as in torch (gemv.h)
_COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]


class KernelUnavailable(RuntimeError):
    """A variant that cannot run here (the CPU, the platform, the compiler or the build)."""


# ---------------------------------------------------------------------------- the machine


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++ or c++ (None where there is none)."""
    cxx = os.environ.get("CXX")
    return shutil.which(cxx) if cxx else shutil.which("g++") or shutil.which("c++")


_amx_granted: bool | None = None


def _amx_permitted() -> bool:
    """Whether Linux grants this process AMX state (asked once; the kernels need it)."""
    global _amx_granted
    if _amx_granted is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
            _amx_granted = libc.syscall(158, 0x1023, 18) == 0
        except (OSError, AttributeError):
            _amx_granted = False
    return _amx_granted


def why_not(name: str) -> str | None:
    """None where `name` can run on this machine, else why not ("none" always runs)."""
    if name == NONE:
        return None
    if name not in VARIANTS:
        return f"unknown variant {name!r} (expected one of {', '.join([*VARIANTS, NONE])})"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernels are built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    missing = VARIANTS[name][0] - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if name == "amx" and not _amx_permitted():
        return "Linux refused this process AMX state"
    if compiler() is None:
        return "no C++ compiler (g++)"
    return None


def available_variants() -> list[str]:
    """The variants this machine can run, best first; "none" (torch's ops) last. Builds nothing."""
    return [name for name in reversed(VARIANTS) if why_not(name) is None] + [NONE]


def default_variant() -> str:
    """The variant that serves unless `use()` says otherwise: GPTJ_QUANT_KERNEL=0 -> "none", else
    GPTJ_ISA where this machine runs it, else the best it runs ("amx" only without GPTJ_AMX=0)."""
    if os.environ.get("GPTJ_QUANT_KERNEL", "1") == "0":
        return NONE
    wanted = os.environ.get("GPTJ_ISA", "").strip().lower()
    if wanted:
        reason = why_not(wanted)
        if reason is None:
            return wanted
        log.warning("gptj: GPTJ_ISA=%s refused: %s; using the default kernels", wanted, reason)
    best = available_variants()
    if os.environ.get("GPTJ_AMX", "1") == "0" and best[0] == "amx":
        best = best[1:]
    return best[0]


# ---------------------------------------------------------------------------- building


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptj" / "kernels"


def _compile(cxx: str, flags: list[str], sources: Sequence[Path], stem: str, text: str) -> Path:
    """Builds `sources` into the cache once per (source text, compiler, flags); returns the path."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([text, cxx, version, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{stem}_{key}.so"
    if out.exists():
        return out
    log.info("gptj: building %s with %s (once: cached in %s)", stem, cxx, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{stem}_", suffix=".so")
    os.close(fd)
    try:
        cmd = [cxx, *flags, f"-I{Path(sources[0]).parent}", *map(str, sources), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise KernelUnavailable(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders both end with a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _build(name: str) -> Path:
    return build_tree(SOURCE_DIR, name)


def build_tree(folder: Path, name: str) -> Path:
    """Variant `name` of the kernels' sources in `folder` (this package's, or a changed copy of
    them: benchmarks/ab_kernels.py), built once into the cache; returns the library's path."""
    cxx = compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler (g++)")
    sources = sorted(Path(folder).glob("*.cpp"))
    files = sorted([*Path(folder).glob("*.h"), *sources])
    text = "".join(f"{p.name}\0{p.read_text()}\0" for p in files)
    return _compile(cxx, [*_COMMON_FLAGS, *VARIANTS[name][1], *prefetch_flags()], sources, f"gq_{name}", text)


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def prefetch_flags() -> list[str]:
    """The weights' prefetch hint (simd.h): non-temporal on AMD, where it streamed the int8 and
    int4 GEMVs 4-25 % faster on the Zen 5 (README: CPU kernels); GPTJ_PREFETCH=nta|t1 forces one."""
    choice = os.environ.get("GPTJ_PREFETCH", "").lower()
    if choice not in ("nta", "t1"):
        choice = "nta" if cpu_vendor() == "AuthenticAMD" else "t1"
    return ["-DGQ_PREFETCH_NTA=1"] if choice == "nta" else []


def build_source(source: str, stem: str, variant: str | None = None) -> ctypes.CDLL | None:
    """A small extra library from C++ `source` (benchmarks), built with a variant's flags (the
    active one by default); None where no variant runs here or the build fails (logged)."""
    name = variant or active_variant()
    if name == NONE or why_not(name) is not None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}.cpp"
        path.write_text(source)
        try:
            return ctypes.CDLL(str(_compile(compiler() or "g++", [*_COMMON_FLAGS, *VARIANTS[name][1]], [path], stem,
                                            source)))  # fmt: skip
        except (KernelUnavailable, OSError) as e:
            log.warning("gptj: building %s failed: %s", stem, e)
            return None


# ---------------------------------------------------------------------------- the library

_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float, "v": None}
_PACK = {"p": "<Q", "q": "<q", "i": "<i", "f": "<f"}


class Layout:
    """One C struct as bindings.cpp describes it: fields filled by name into a ctypes buffer."""

    def __init__(self, name: str, size: int, fields: list[tuple[str, str, int]], layouts: Mapping[str, Layout]):
        self.name, self.size, self.fields, self._layouts = name, size, fields, layouts

    def pack_into(self, buf: Any, offset: int, values: Mapping[str, Any]) -> None:
        names = {f for f, _, _ in self.fields}
        if set(values) != names:
            raise ValueError(f"struct {self.name}: fields {sorted(names)}, got {sorted(values)}")
        for field, code, at in self.fields:
            v = values[field]
            if code in self._layouts:
                self._layouts[code].pack_into(buf, offset + at, v)
            else:
                struct.pack_into(_PACK[code], buf, offset + at, 0 if v is None else v)

    def array(self, rows: Sequence[Mapping[str, Any]]) -> ctypes.Array:
        """A buffer holding len(rows) structs (keep it alive while C++ reads it)."""
        buf = (ctypes.c_char * (self.size * max(1, len(rows))))()
        for i, row in enumerate(rows):
            self.pack_into(buf, i * self.size, row)
        return buf


class Library:
    """One built variant: its gq_* functions (ctypes, typed from the library's own description)
    and struct layouts."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.cdll = path, ctypes.CDLL(str(path))
        self._scratch_sizes: dict[tuple[int, int], int] = {}
        self.cdll.gq_describe.restype = ctypes.c_char_p
        self.layouts: dict[str, Layout] = {}
        self.variant = ""
        for line in self.cdll.gq_describe().decode().splitlines():
            kind, rest = line.split(" ", 1)
            if kind == "variant":
                self.variant = rest
            elif kind == "fn":
                fn_name, result, args = (rest + " ").split(" ")[:3]
                fn = getattr(self.cdll, fn_name)
                fn.restype, fn.argtypes = _CTYPES[result], [_CTYPES[c] for c in args]
                setattr(self, fn_name, fn)
            elif kind == "struct":
                struct_name, size, *fields = rest.split(" ")
                parts = [f.split(":") for f in fields]
                self.layouts[struct_name] = Layout(struct_name, int(size), [(f, c, int(o)) for f, c, o in parts],
                                                   self.layouts)  # fmt: skip
        if self.variant != name:
            raise KernelUnavailable(f"{path} says it is the {self.variant!r} variant, not {name!r}")
        self.amx = bool(self.gq_amx_ready())  # int8 batches on AMX tiles (the amx variant, where Linux allows)
        self.int8_panels = bool(self.gq_int8_panels())  # its int8 kernels read 16-row panels (gemv.h)

    def linear_scratch_bytes(self, rows: int, in_features: int) -> int:
        """Scratch bytes gq_linear_int8/int4 need (asked once per shape: a call costs a microsecond)."""
        key = (rows, in_features)
        size = self._scratch_sizes.get(key)
        if size is None:
            size = self._scratch_sizes[key] = self.gq_linear_scratch_bytes(rows, in_features)
        return size

    def __repr__(self) -> str:
        return f"<gptj kernels {self.variant}>"


_loaded: dict[str, Library] = {}
_lock = threading.RLock()


def load_variant(name: str) -> Library | None:
    """The library of variant `name`, built on first call (None for "none": torch's ops).
    Raises KernelUnavailable (with the reason) where it cannot run here."""
    if name == NONE:
        return None
    with _lock:
        if name not in _loaded:
            reason = why_not(name)
            if reason is not None:
                raise KernelUnavailable(f"kernels {name!r}: {reason}")
            _loaded[name] = Library(_build(name), name)
        return _loaded[name]


_active: tuple[str, Library | None] | None = None  # the default variant, once loaded
_override: list[tuple[str, Library | None]] = []  # use()'s stack


def _default() -> tuple[str, Library | None]:
    """The default variant, loaded; where its build fails, the next one down ("none" last)."""
    global _active
    if _active is None:
        with _lock:
            if _active is None:
                first = default_variant()
                candidates = available_variants()
                candidates = candidates[candidates.index(first) :] if first in candidates else [first]
                for name in candidates:
                    try:
                        lib = load_variant(name)
                    except (KernelUnavailable, OSError) as e:
                        log.warning("gptj: kernels %s unavailable: %s", name, e)
                        continue
                    if lib is None:
                        log.warning("gptj: kernels: none (torch's quantized ops: slower decode)")
                    else:
                        log.info("gptj: kernels: %s (%s)", name, lib.path)
                    _active = (name, lib)
                    break
    assert _active is not None
    return _active


def active() -> Library | None:
    """The library in use (the default variant's, built on first call), or None: torch's ops."""
    return _override[-1][1] if _override else _default()[1]


def active_variant() -> str:
    """The name of the variant in use ("none": torch's ops)."""
    return _override[-1][0] if _override else _default()[0]


@contextlib.contextmanager
def use(name: str) -> Iterator[Library | None]:
    """Makes `name` the variant in use, for every thread, until the block ends (tests and
    benchmarks compare variants in one process). Raises KernelUnavailable where it cannot run."""
    lib = load_variant(name)
    _override.append((name, lib))
    try:
        yield lib
    finally:
        _override.pop()
