"""The decode steps' attention alone (gq_attention, which benchmarks/ab_kernels.py times) against
torch's, on every variant this CPU runs: chunks of keys combined past 256, query heads grouped on
a kv head, runs of entries of one row that share their reads of the cache, head sizes of whole
vectors and not, float32 and bfloat16 caches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptj import kernels

VARIANTS = [v for v in kernels.available_variants() if v != kernels.NONE]
pytestmark = pytest.mark.skipif(not VARIANTS, reason="no kernel variant runs here")


def attend(lib: kernels.Library, q: torch.Tensor, pos: list[int], rows: list[int], k: torch.Tensor,
           v: torch.Tensor, nh: int) -> tuple[int, torch.Tensor]:  # fmt: skip
    cache_rows, nkv, max_len, hd = k.shape
    threads, B = torch.get_num_threads(), len(pos)
    att = torch.full((B, nh * hd), float("nan"))
    scratch = torch.empty(lib.gq_attention_scratch(B, nh, hd, max_len, threads), dtype=torch.uint8)
    p, r = torch.tensor(pos, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)
    rc = lib.gq_attention(q.data_ptr(), B, p.data_ptr(), r.data_ptr(), nh, nkv, hd, k.data_ptr(), v.data_ptr(),
                          int(k.dtype == torch.bfloat16), cache_rows, max_len, att.data_ptr(), scratch.data_ptr(),
                          threads)  # fmt: skip
    return rc, att


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("nh", "nkv", "hd"), [(4, 4, 256), (6, 2, 64), (3, 3, 24)])
def test_attention_matches_torch(variant: str, dtype: torch.dtype, nh: int, nkv: int, hd: int) -> None:
    lib = kernels.load_variant(variant)
    torch.manual_seed(0)
    max_len = 640
    k, v = (torch.randn(2, nkv, max_len, hd).to(dtype) for _ in range(2))
    # row 1 at 600 keys (three chunks); a run of three entries of row 0 at consecutive positions
    # (which read each key once for all three where heads are not grouped); one lone early entry
    pos, rows = [599, 300, 301, 302, 4], [1, 0, 0, 0, 0]
    q = torch.randn(len(pos), nh * hd)
    rc, att = attend(lib, q, pos, rows, k, v, nh)
    assert rc == 0
    for b, (n, row) in enumerate(zip(pos, rows, strict=True)):
        keys = k[row, :, : n + 1].float().repeat_interleave(nh // nkv, dim=0)
        values = v[row, :, : n + 1].float().repeat_interleave(nh // nkv, dim=0)
        want = F.scaled_dot_product_attention(q[b].view(nh, 1, hd), keys, values).reshape(-1)
        torch.testing.assert_close(att[b], want, rtol=1e-4, atol=1e-5)


def test_attention_refuses_entries_outside_the_cache() -> None:
    lib = kernels.load_variant(VARIANTS[0])
    k = v = torch.zeros(2, 2, 16, 32)
    q = torch.zeros(1, 4 * 32)
    assert attend(lib, q, [16], [0], k, v, 4)[0] == -1  # past max_len
    assert attend(lib, q, [3], [2], k, v, 4)[0] == -1  # a row the cache does not have
    assert attend(lib, torch.zeros(1, 3 * 32), [3], [0], k, v, 3)[0] == -1  # 2 kv heads do not divide 3
    assert attend(lib, q, [3], [1], k, v, 4)[0] == 0
