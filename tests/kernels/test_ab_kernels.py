"""benchmarks/ab_kernels.py, the paired comparison of two kernel builds: it builds the changed
copy, not the package's sources, and says whether the two give the same bits."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from gptj import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ab_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.active() is None, reason="no C++ kernels here")


def copies(tmp_path: Path, file: str, line: str, changed_line: str) -> tuple[Path, Path]:
    """Two copies of the kernels' sources: one as they are, one with `line` of `file` changed."""
    same = tmp_path / "same"
    shutil.copytree(kernels.SOURCE_DIR, same, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    changed = tmp_path / "changed"
    shutil.copytree(same, changed)
    source = changed / file
    text = source.read_text()
    assert text.count(line) == 1
    source.write_text(text.replace(line, changed_line))
    return same, changed


def test_a_copy_compares_as_the_same_and_a_change_as_different(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    same, changed = copies(tmp_path, "gemv.cpp", "const float s = am / 127.f;",
                           "const float s = am / 126.f;")  # every variant's xs  # fmt: skip

    small = ["--mode", "int8", "--rows", "1", "--layers", "1", "--rounds", "1", "--isa", kernels.active_variant()]
    ab_kernels.main([str(same), *small])
    assert "same bits" in capsys.readouterr().out
    ab_kernels.main([str(changed), *small])
    out = capsys.readouterr().out
    assert "DIFFERENT BITS" in out and "B/A" in out
    for mode in ("int8", "int4"):  # the same build on 4 KB and on huge pages: the same bits
        ab_kernels.main([str(same), *small[:1], mode, *small[2:], "--pages", "4k,huge"])
        assert "pages 4k,huge): same bits" in capsys.readouterr().out


def test_attention_mode_compares_builds_and_the_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    same, changed = copies(tmp_path, "decode.cpp", "const float scale = 1.f / sqrtf((float)hd);",
                           "const float scale = 1.f / sqrtf((float)hd + 1.f);")  # fmt: skip

    small = ["--mode", "attention", "--layers", "1", "--context", "300", "--rounds", "1"]
    ab_kernels.main([str(same), *small])
    out = capsys.readouterr().out
    assert "attention context=300" in out and "same bits" in out and "against a read of the same" in out
    ab_kernels.main([str(changed), *small])
    assert "DIFFERENT BITS" in capsys.readouterr().out


def test_two_variants_of_one_tree_compare_each_in_its_own_layout(capsys: pytest.CaptureFixture) -> None:
    """--isa A,B builds the same sources for two variants (e.g. amx's tiles against avx2's
    int8 rows); exact integer math makes their outputs the same bits."""
    variants = [v for v in kernels.available_variants() if v != kernels.NONE]
    if len(variants) < 2:
        pytest.skip("this CPU runs one kernel variant")
    pair = f"{variants[0]},{variants[-1]}"
    for mode in ("int8", "int4"):
        ab_kernels.main([str(kernels.SOURCE_DIR), "--mode", mode, "--layers", "1", "--rounds", "1", "--isa", pair])
        assert f"({pair}, pages huge,huge): same bits" in capsys.readouterr().out


def test_the_bundled_models_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--shapes smollm2 times SmolLM2's layers (576 and 1536 wide), where a change to the int4
    GEMM at GPT-J's shapes can cost the bundled model's prompts."""
    same, changed = copies(tmp_path, "gemv.cpp", "const float s = am / 127.f;", "const float s = am / 126.f;")
    small = ["--mode", "int4", "--rows", "20", "--layers", "1", "--rounds", "1", "--shapes", "smollm2"]
    ab_kernels.main([str(same), *small])
    assert "int4 rows=20" in (out := capsys.readouterr().out) and "same bits" in out and "of the same 2 MB" in out
    ab_kernels.main([str(changed), *small])
    assert "DIFFERENT BITS" in capsys.readouterr().out
