"""The zero-copy recall kernel (lsa.cache.zero_copy) and LSACache(recall="zero_copy").

On CUDA the kernel reads the pinned host mirror through its mapped address; on CPU it runs in
Triton's interpreter, which must be chosen before triton is imported::

    TRITON_INTERPRET=1 python -m pytest -q tests/test_cache_zero_copy.py
"""

from __future__ import annotations

import pytest
import torch
from test_cache import generate, lsa_model, make_cache, prompt

from lsa.cache.zero_copy import zero_copy_recall, zero_copy_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    zero_copy_unavailable(DEVICE) is not None,
    reason=f"zero-copy recall: {zero_copy_unavailable(DEVICE)} (TRITON_INTERPRET=1 on CPU)",
)


def _to_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_copies_chunks_of_every_layer_into_their_slots(dtype):
    g = torch.Generator().manual_seed(0)
    layers, batch, heads, n_slots, cs, d = 3, 2, 2, 5, 4, 8
    # a mirror segment [B, n, L, 2, H, cs, D], pinned on CUDA
    mirror = torch.randn(batch, 6, layers, 2, heads, cs, d, generator=g).to(dtype)
    if DEVICE.type == "cuda":
        mirror = mirror.pin_memory()
    reserves = [
        (
            torch.zeros(batch, heads, n_slots, cs, d, dtype=dtype, device=DEVICE),
            torch.zeros(batch, heads, n_slots, cs, d, dtype=dtype, device=DEVICE),
        )
        for _ in range(layers)
    ]
    items = [(0, 3, 1), (1, 0, 4), (1, 5, 0), (0, 1, 2)]  # (row, chunk, slot)
    rows, _, slots = torch.tensor(items).T
    addresses = torch.tensor([mirror[b, c].data_ptr() for b, c, _ in items])
    zero_copy_recall(addresses, reserves, rows, slots, _to_device)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for layer, (k, v) in enumerate(reserves):
        expected_k = torch.zeros_like(k, device="cpu")
        expected_v = torch.zeros_like(v, device="cpu")
        for b, c, s in items:
            expected_k[b, :, s] = mirror[b, c, layer, 0]
            expected_v[b, :, s] = mirror[b, c, layer, 1]
        assert torch.equal(k.cpu(), expected_k) and torch.equal(v.cpu(), expected_v)


def test_zero_copy_cache_equals_copies_cache():
    model = lsa_model().to(DEVICE)
    ids, mask = prompt([150, 97])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    results = {}
    for recall in ("copies", "zero_copy"):
        cache = make_cache(model, budget=0.3, chunk_size=8, refresh_every=5, recall=recall)
        seq, logits = generate(model, ids, mask, cache, 30)
        results[recall] = (seq, logits, [r.resident for r in cache.refreshes], cache)
    seq, logits, resident, copies = results["copies"]
    zseq, zlogits, zresident, zero = results["zero_copy"]
    assert torch.equal(seq, zseq) and torch.equal(logits, zlogits)
    assert resident == zresident
    assert zero.recall_stats.bytes == copies.recall_stats.bytes > 0
    assert zero.recall_stats.copies == len(zero.refreshes)  # one launch per refresh
    for layer in zero.layers:
        other = copies.layers[layer.layer_idx]
        assert torch.equal(layer.reserve_k, other.reserve_k)
        assert torch.equal(layer.reserve_v, other.reserve_v)
