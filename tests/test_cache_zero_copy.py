"""The zero-copy kernels (lsa.cache.zero_copy: recall, prompt writes) and
LSACache(recall="zero_copy").

On CUDA the kernel reads the pinned host mirror through its mapped address; on CPU it runs in
Triton's interpreter, which must be chosen before triton is imported::

    TRITON_INTERPRET=1 python -m pytest -q tests/test_cache_zero_copy.py
"""

from __future__ import annotations

import pytest
import torch
from test_cache import generate, lsa_model, make_cache, prompt

from lsa.cache.mirror import HostMirror
from lsa.cache.zero_copy import zero_copy_recall, zero_copy_unavailable, zero_copy_write

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_write_kernel_fills_the_mirror_like_copies(dtype):
    """Left-padded rows, a partial last chunk (zeros past it), K/V with transformers' strides
    ([B, S, H, D] transposed), one layer of three: the kernel writes what the copy path writes."""
    g = torch.Generator().manual_seed(1)
    batch, layers, heads, cs, d, s = 2, 3, 2, 8, 16, 29
    pads, layer = [0, 11], 1
    k = torch.randn(batch, s, heads, d, generator=g).to(dtype).transpose(1, 2).to(DEVICE)
    v = torch.randn(batch, s, heads, d, generator=g).to(dtype).transpose(1, 2).to(DEVICE)
    mirrors = [
        HostMirror(batch, layers, heads, cs, d, dtype, device=torch.device("cpu"), pin=False)
        for _ in range(2)
    ]
    items = []
    for b, pad in enumerate(pads):
        n = s - pad
        for c in range(-(-n // cs)):
            items.append((b, c, pad + c * cs, min(cs, n - c * cs)))
        kv = torch.zeros(2, heads, -(-n // cs) * cs, d, dtype=dtype)
        kv[0, :, :n], kv[1, :, :n] = k[b, :, pad:].cpu(), v[b, :, pad:].cpu()
        kv = kv.view(2, heads, -1, cs, d).permute(2, 0, 1, 3, 4).contiguous()
        mirrors[0].write_chunks(b, 0, layer, kv)
    mirrors[1].ensure(mirrors[0].capacity)
    for seg in mirrors[1].segments:
        seg.fill_(7)  # what the kernel does not write must stay as it was
    t = torch.tensor(items, dtype=torch.int64).T.contiguous()
    addresses = mirrors[1].chunk_addresses(t[0], t[1])
    meta = [x.to(DEVICE) for x in (addresses, t[0], t[2], t[3])]
    zero_copy_write((k, v), layer, *meta, chunk_size=cs)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    got, want = mirrors[1].segments[0], mirrors[0].segments[0]
    for b, c, _, _ in items:
        torch.testing.assert_close(got[b, c, layer], want[b, c, layer], rtol=0, atol=0)
    written = torch.zeros(got.shape[:2], dtype=torch.bool)
    written[t[0], t[1]] = True
    assert bool((got[~written] == 7).all()) and bool((got[:, :, [0, 2]] == 7).all())
