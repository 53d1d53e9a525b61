"""A quantized checkpoint's int8 layers are copied off the mapped file (decode streams them
faster from anonymous memory), with the same logits; GPTJ_MMAP=1 keeps them on the file, except
where the kernels read int8 panels, which are a copy."""

from __future__ import annotations

import bisect
from pathlib import Path

import pytest
import torch

import gptj
from gptj import quant
from gptj.loading.quantized import write_quantized
from gptj.loading.random_checkpoint import make_random_checkpoint
from gptj.quant import QuantizedLinear

SHAPE = dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8)


def file_backed() -> tuple[list[int], list[tuple[int, int]]]:
    """This process's file-backed address ranges (an inode in /proc/self/maps), sorted."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    ranges.sort()
    return [lo for lo, _ in ranges], ranges


def on_file(t: torch.Tensor, maps: tuple[list[int], list[tuple[int, int]]]) -> bool:
    starts, ranges = maps
    i = bisect.bisect_right(starts, t.data_ptr()) - 1
    return i >= 0 and ranges[i][1] >= t.data_ptr() + t.nbytes


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mapped")
    source = make_random_checkpoint(tmp / "f32", SHAPE, "safetensors", dtype=torch.float32)
    return write_quantized(str(source), str(tmp / "int8"), 8)


def int8_weights(model: gptj.Model) -> list[torch.Tensor]:
    """The int8 layers as loaded (not q/k/v: a small model's are fused after loading, a copy)."""
    layers = [m for name, m in model.module.named_modules() if isinstance(m, QuantizedLinear) and "qkv" not in name]
    assert len(layers) == 2 * 3 + 1 and all(m.mode == "int8" for m in layers)  # out, fc_in, fc_out; lm_head
    return [m.qweight if m.panels is None else m.panels for m in layers]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_int8_layers_leave_the_mapped_file(int8_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTJ_MMAP", "1")
    mapped = gptj.load(str(int8_folder))
    monkeypatch.delenv("GPTJ_MMAP")
    copied = gptj.load(str(int8_folder))
    maps = file_backed()
    lib = quant.native_kernel()
    # where the kernels read int8 panels, the weights are copied into them whatever GPTJ_MMAP says
    assert all(on_file(w, maps) != bool(lib and lib.int8_panels) for w in int8_weights(mapped))
    assert not any(on_file(w, maps) for w in int8_weights(copied))
    ids = list(range(5, 40))
    assert torch.equal(copied.logits(ids), mapped.logits(ids))
    settings = dict(max_new_tokens=6, temperature=0)
    assert copied.generate("The", **settings).tokens == mapped.generate("The", **settings).tokens
