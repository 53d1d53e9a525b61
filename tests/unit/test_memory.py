"""gptj.memory.huge_page_empty: the buffers the kernels stream, and its ways back to torch.empty."""

from __future__ import annotations

import mmap

import pytest
import torch

from gptj import memory


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this OS")
def test_a_large_buffer_starts_on_a_huge_page_and_holds_what_is_written() -> None:
    t = memory.huge_page_empty(3, memory.HUGE_PAGE, dtype=torch.int8)
    assert t.shape == (3, memory.HUGE_PAGE) and t.dtype == torch.int8 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0  # its whole 2 MB spans are the tensor's own
    t.copy_(torch.arange(t.numel()).reshape(t.shape) % 251 - 125)
    assert torch.equal(t[2, -5:], (torch.arange(t.numel() - 5, t.numel()) % 251 - 125).to(torch.int8))
    f = memory.huge_page_empty(memory.HUGE_PAGE, dtype=torch.float32)  # 8 MB of float32
    assert f.data_ptr() % memory.HUGE_PAGE == 0 and f.numel() == memory.HUGE_PAGE


def test_small_buffers_and_failed_mappings_are_torch_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    small = memory.huge_page_empty(16, 1024)
    assert small.untyped_storage().nbytes() == small.nbytes == 16 * 1024

    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(memory.mmap, "mmap", refuse)
    big = memory.huge_page_empty(4, memory.HUGE_PAGE)
    assert big.shape == (4, memory.HUGE_PAGE) and big.untyped_storage().nbytes() == big.nbytes
