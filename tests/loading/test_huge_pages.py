"""A loaded model's streamed weights live in huge-page-advised memory, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gptj
from gptj import huge_pages
from gptj.loading.quantized import write_quantized
from gptj.loading.random_checkpoint import make_random_checkpoint
from gptj.quant import QuantizedLinear

SHAPE = dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=16)  # fc_in and fc_out of 64 KB at int8

pytestmark = pytest.mark.skipif(not huge_pages.available(), reason="transparent huge pages are off on this machine")


def advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding t is advised MADV_HUGEPAGE (VmFlags `hg` in /proc/self/smaps).
    Not only ours are: numpy advises its large allocations, which may share the heap with torch's."""
    ptr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr and ptr + t.nbytes <= hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("huge")
    source = make_random_checkpoint(tmp / "f32", SHAPE, "safetensors", dtype=torch.float32)
    return write_quantized(str(source), str(tmp / "int8"), 8)  # int8 layers used as mapped from the file


def kernel_tensors(model: gptj.Model) -> list[torch.Tensor]:
    found = []
    for m in model.module.modules():
        if isinstance(m, QuantizedLinear):
            weights = m.kernel_weights()
            assert weights is not None
            found.append(weights[0])
    return found


def test_quantized_weights_leave_the_mapped_file_for_huge_pages(int8_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = list(range(5, 40))
    monkeypatch.setenv("GPTJ_HUGE_PAGES", "0")
    mapped = gptj.load(str(int8_folder))
    monkeypatch.delenv("GPTJ_HUGE_PAGES")
    moved = gptj.load(str(int8_folder))
    weights = kernel_tensors(moved)
    assert len(weights) == 2 * 4 + 1  # per layer qkv (fused), out, fc_in, fc_out; and the head
    assert all(advised(w) and huge_pages.in_arena(w) for w in weights if w.nbytes >= 1 << 16)
    assert not any(huge_pages.in_arena(w) for w in kernel_tensors(mapped))
    assert torch.equal(moved.logits(ids), mapped.logits(ids))
    assert moved.generate("The", max_new_tokens=6, temperature=0).tokens == mapped.generate("The", max_new_tokens=6, temperature=0).tokens


def test_int4_tiles_are_made_in_huge_pages(int8_folder: Path) -> None:
    source = int8_folder.parent / "f32"
    model = gptj.load(str(source), quantize="int4")
    tiles = [m.tiles for m in model.module.modules() if isinstance(m, QuantizedLinear) and m.tiles is not None]
    big = [t for t in tiles if t.nbytes >= huge_pages.HUGE_PAGE]
    if not tiles:
        pytest.skip("no native kernels: int4 stays in the portable layout")
    assert all(advised(t) for t in big)


def test_tied_weights_stay_tied_and_embeddings_stay_put() -> None:
    emb, head, alone = nn.Embedding(512, 128), nn.Linear(128, 512, bias=False), nn.Embedding(512, 128)
    head.weight = emb.weight  # tied, as Llama's lm_head and embed_tokens
    model = nn.ModuleDict({"emb": emb, "head": head, "alone": alone})
    alone_at = alone.weight.data_ptr()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    moved = huge_pages.move_weights(model)
    assert moved == 512 * 128 * 4
    assert model["head"].weight is model["emb"].weight and advised(model["head"].weight)
    assert model["alone"].weight.data_ptr() == alone_at  # read a row per token: not worth a copy
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert huge_pages.move_weights(model) == 0  # already there


def test_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTJ_HUGE_PAGES", "0")
    layer = nn.Linear(256, 256)
    at = layer.weight.data_ptr()
    assert huge_pages.move_weights(layer) == 0 and layer.weight.data_ptr() == at
    assert not huge_pages.in_arena(huge_pages.empty(4 * huge_pages.HUGE_PAGE))
