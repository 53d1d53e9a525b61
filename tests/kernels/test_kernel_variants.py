"""Choosing, building and loading the kernel variants (gptj.kernels): GPTJ_ISA and the older
switches, refusals, the build cache, and the library's description of itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptj import kernels

VARIANTS = [v for v in kernels.available_variants() if v != kernels.NONE]
BEST = kernels.available_variants()[0]


def in_fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter (the variant is chosen once per process)."""
    full = {k: v for k, v in os.environ.items() if k not in ("GPTJ_ISA", "GPTJ_QUANT_KERNEL", "GPTJ_AMX")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


ACTIVE = "import logging; logging.basicConfig(); from gptj import kernels, quant; print(quant.kernel_name())"


def test_available_variants() -> None:
    names = kernels.available_variants()
    assert names[-1] == kernels.NONE and len(set(names)) == len(names)
    assert set(names) <= {*kernels.VARIANTS, kernels.NONE}
    # best first: each variant needs the CPU flags of the ones before it in VARIANTS
    order = list(kernels.VARIANTS)
    assert [order.index(n) for n in names[:-1]] == sorted((order.index(n) for n in names[:-1]), reverse=True)


def test_the_default_is_the_best_variant() -> None:
    out = in_fresh_process(ACTIVE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [BEST]


@pytest.mark.parametrize("variant", VARIANTS[1:] + [kernels.NONE])
def test_gptj_isa_forces_a_variant(variant: str) -> None:
    out = in_fresh_process(ACTIVE, GPTJ_ISA=variant)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [variant]


def test_older_switches() -> None:
    assert in_fresh_process(ACTIVE, GPTJ_QUANT_KERNEL="0").stdout.split() == [kernels.NONE]
    no_amx = in_fresh_process(ACTIVE, GPTJ_AMX="0").stdout.split()
    assert no_amx == [BEST if BEST != "amx" else VARIANTS[1]]


@pytest.mark.parametrize("wanted", ["avx1024", *[v for v in kernels.VARIANTS if v not in VARIANTS]])
def test_a_variant_this_machine_cannot_run_is_refused(wanted: str) -> None:
    """GPTJ_ISA asking for more than the CPU has (or a name that is no variant): a warning that
    says why, and the default serves."""
    out = in_fresh_process(ACTIVE, GPTJ_ISA=wanted)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [BEST]
    assert f"GPTJ_ISA={wanted} refused" in out.stderr
    with pytest.raises(kernels.KernelUnavailable, match=wanted):
        kernels.load_variant(wanted)
    with pytest.raises(kernels.KernelUnavailable):
        with kernels.use(wanted):
            pass


def test_use_switches_and_restores() -> None:
    before = kernels.active_variant()
    with kernels.use(kernels.NONE) as lib:
        assert lib is None and kernels.active() is None and kernels.active_variant() == kernels.NONE
    assert kernels.active_variant() == before


@pytest.mark.skipif(not VARIANTS, reason="no kernel variant runs on this machine")
def test_the_library_describes_itself() -> None:
    """Python reads the functions' types and the structs' layouts from the library."""
    lib = kernels.load_variant(VARIANTS[-1])
    assert lib.variant == VARIANTS[-1]
    linear = lib.layouts["linear"]
    assert [f for f, _, _ in linear.fields] == ["w", "scales", "bias", "n", "k", "bits"]
    assert lib.layouts["llama_layer"].fields[2] == ("qkv", "linear", 16)
    assert {"llama_layer", "llama_dims", "gptj_layer", "gptj_dims"} <= lib.layouts.keys()
    buf = linear.array([{"w": 8, "scales": 16, "bias": None, "n": 3, "k": 32, "bits": 8}])
    assert len(buf) == linear.size
    with pytest.raises(ValueError, match="fields"):
        linear.array([{"w": 8}])
    assert lib.gq_linear_scratch_bytes(2, 64) >= 2 * 64


@pytest.mark.skipif(not VARIANTS, reason="no kernel variant runs on this machine")
def test_build_is_cached_and_atomic(tmp_path: Path) -> None:
    """One build per variant into the cache (a temporary file renamed into place, nothing else
    left behind), reused by the next process."""
    variant = VARIANTS[-1]
    code = f"from gptj import kernels; print(kernels.load_variant({variant!r}).path)"
    first = in_fresh_process(code, XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    assert path.parent == tmp_path / "gptj" / "kernels" and path.name.startswith(f"gq_{variant}_")
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    stamp = path.stat().st_mtime_ns
    second = in_fresh_process(code, XDG_CACHE_HOME=str(tmp_path))
    assert Path(second.stdout.strip()) == path and path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("vendor", "forced", "nta"),
    [("AuthenticAMD", "", True), ("GenuineIntel", "", False), ("", "", False), ("GenuineIntel", "nta", True),
     ("AuthenticAMD", "T1", False), ("AuthenticAMD", "bogus", True)],
)  # fmt: skip
def test_the_prefetch_hint_follows_the_vendor(monkeypatch: pytest.MonkeyPatch, vendor: str, forced: str, nta: bool) -> None:
    """Non-temporal weight prefetches on AMD, L2 ones elsewhere (Intel fills only L1 on a
    non-temporal prefetch); GPTJ_PREFETCH forces either."""
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setenv("GPTJ_PREFETCH", forced)
    assert (kernels.prefetch_flags() == ["-DGQ_PREFETCH_NTA=1"]) is nta
    assert kernels.prefetch_flags() in ([], ["-DGQ_PREFETCH_NTA=1"])


def test_no_compiler_means_torch_ops(tmp_path: Path) -> None:
    """No g++ (and an empty cache): a warning, and torch's ops serve."""
    out = in_fresh_process(ACTIVE, CXX=str(tmp_path / "no-such-compiler"), PATH=str(tmp_path),
                           XDG_CACHE_HOME=str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [kernels.NONE]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_with_torch_ops_only(mode: str) -> None:
    """No kernels at all ("none": no compiler, GPTJ_QUANT_KERNEL=0): loading quantizes in torch,
    every step runs torch's blocks and int8/int4 ops, and the counting prompt still counts."""
    import gptj
    from gptj import cpu_decode

    with kernels.use(kernels.NONE):
        model = gptj.load(quantize=mode)
        try:
            assert not cpu_decode.serves(model.module)
            out = model.generate("1, 2, 3, 4, 5,", max_new_tokens=12, temperature=0, ignore_eos=True)
        finally:
            model.engine.shutdown(grace=0)
    assert out.text.startswith(" 6, 7, 8,")
