"""DeepseekV4LSACache on tiny random DeepSeek-V4 models (CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from transformers import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4CSACache,
    DeepseekV4HCACache,
)

from lsa.cache.model import cache_kwarg
from lsa.deepseek_v4 import DeepseekV4LSACache, MemoryIndexer
from lsa.deepseek_v4.tiny import greedy, tiny_model

CSA_LAYER = 1  # tiny_config: sliding, CSA, HCA


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(1))


def lsa_cache(model, **kw):
    settings = dict(budget=3, refresh_every=4, page_size=2, sink_pages=1, recent_pages=1)
    settings.update(kw)
    return DeepseekV4LSACache(model, MemoryIndexer.from_model(model, [CSA_LAYER]), **settings)


def test_gate_off_and_all_resident_are_token_identical_to_stock(model, prompt):
    stock = greedy(model, prompt, DynamicCache(config=model.config), 40)
    off = lsa_cache(model, gate=False)
    assert torch.equal(greedy(model, prompt, off, 40), stock)
    assert off.refreshes == []
    full = lsa_cache(model, budget=1.0)
    assert torch.equal(greedy(model, prompt, full, 40), stock)
    assert len(full.refreshes) == 10  # after the prefill and every 4th decode forward
    assert all(r["resident"] == r["entries"] for r in full.refreshes)
    # a partial budget does change what the model sees (the property above is not vacuous)
    part = lsa_cache(model, budget=2)
    greedy(model, prompt, part, 8)
    assert part.refreshes[0]["resident"] < part.refreshes[0]["entries"]


def test_generate_with_the_cache(model, prompt):
    kw = cache_kwarg(model)
    stock = model.generate(prompt, max_new_tokens=12, do_sample=False)
    off = model.generate(
        prompt, max_new_tokens=12, do_sample=False, **{kw: lsa_cache(model, gate=False)}
    )
    assert torch.equal(off, stock)
    cache = lsa_cache(model)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, **{kw: cache})
    assert out.shape == (1, 112)
    assert cache.refreshes and cache.refreshes[0]["resident"] < cache.refreshes[0]["entries"]


def test_non_csa_layers_are_stock(model):
    cache = lsa_cache(model)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[CSA_LAYER].__name__ == "LSACSALayer"
    assert kinds[2] is DeepseekV4HCACache and kinds[0].__name__ == "DynamicSlidingWindowLayer"
    # the stock DynamicCache still builds transformers' own CSA layer after our import
    assert type(DynamicCache(config=model.config).layers[CSA_LAYER]) is DeepseekV4CSACache


class _Probe:
    """Records the native indexer's logits and picks and the CSA attention output; can force
    the native picks (to run stock attention over a given set of entries)."""

    def __init__(self, model):
        attn = model.model.layers[CSA_LAYER].self_attn
        native = attn.compressor.indexer
        self.force: torch.Tensor | None = None
        self.handles = [
            native.scorer.register_forward_hook(self._scores),
            native.register_forward_hook(self._picks),
            attn.register_forward_hook(self._attn),
        ]

    def _scores(self, module, args, out):
        self.scores = out.detach().clone()  # [B, 1, n]

    def _picks(self, module, args, out):
        self.picks = out.detach().clone()  # [B, 1, k]
        if self.force is not None:
            return self.force

    def _attn(self, module, args, out):
        self.attn = out[0].detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def test_native_topk_and_attention_over_the_resident_set(model, prompt):
    """Teacher-forced decode through an LSA cache and a stock cache with the same tokens: the
    native logits on resident entries equal the stock ones, the native top-k equals the stock
    top-k restricted to the resident set, and attention equals stock attention forced onto the
    same selected entries."""
    kw = cache_kwarg(model)
    lsa, stock = lsa_cache(model), DynamicCache(config=model.config)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    probe = _Probe(model)
    checked_partial = untied = 0
    try:
        with torch.no_grad():
            model(input_ids=prompt, **{kw: lsa})
            model(input_ids=prompt, **{kw: stock})
            layer = lsa.csa_layers[CSA_LAYER]
            for i in range(tokens.shape[1]):
                tok = tokens[:, i : i + 1]
                probe.force = None
                model(input_ids=tok, **{kw: lsa})
                ids = layer.resident_ids  # entry id of each reserve row, at this step
                lsa_scores, lsa_picks, lsa_attn = probe.scores, probe.picks, probe.attn
                picked = ids.gather(1, lsa_picks[:, 0])  # reserve rows -> entry ids
                probe.force = picked[:, None]  # stock attention over exactly these entries
                model(input_ids=tok, **{kw: stock})
                full = probe.scores[:, 0]
                assert ids.shape[1] < full.shape[1]  # a real restriction
                checked_partial += 1
                torch.testing.assert_close(
                    lsa_scores[:, 0], full.gather(1, ids), rtol=1e-6, atol=1e-7
                )
                masked = torch.full_like(full, float("-inf"))
                masked.scatter_(1, ids, full.gather(1, ids))
                k = min(model.config.index_topk, ids.shape[1])
                expect = masked.topk(k, dim=-1)
                # relu makes exact ties (often at 0); top-k may break them either way, so the
                # picks must carry the same logits, and be the same set where the k-th is unique
                assert set(picked[0].tolist()) <= set(ids[0].tolist())
                got = masked.gather(1, picked).sort(-1).values
                torch.testing.assert_close(got, expect.values.sort(-1).values, rtol=0, atol=0)
                kth = expect.values[0, -1]
                if int((masked[0] == kth).sum()) == 1:
                    assert set(picked[0].tolist()) == set(expect.indices[0].tolist())
                    untied += 1
                torch.testing.assert_close(lsa_attn, probe.attn, rtol=1e-5, atol=1e-6)
    finally:
        probe.remove()
    assert checked_partial == tokens.shape[1] and untied > 0


def test_mirror_holds_every_entry_past_2048_generated_tokens():
    """Regression for the seed's decode store, which dropped entries after 512 decode chunks
    (2048 generated tokens): every entry, prompt and generated, is in the host mirror and equals
    what a one-shot forward over the whole sequence compresses."""
    model = tiny_model(seed=3, layer_types=("compressed_sparse_attention",))
    prompt = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    cache = DeepseekV4LSACache(
        model, MemoryIndexer.from_model(model, [0]), budget=4, page_size=4, recent_pages=1
    )
    steps = 2048 + 64
    seq = greedy(model, prompt, cache, steps)
    forwarded = seq[:, :-1]  # the last token is sampled, never forwarded
    layer = cache.csa_layers[0]
    n = forwarded.shape[1] // 4
    assert layer.n_entries == n and n > (16 + 2048) // 4
    assert layer.codes.shape[1] == n
    assert cache.refreshes[-1]["resident"] < cache.refreshes[-1]["entries"]
    got = {}
    compressor = model.model.layers[0].self_attn.compressor
    h1 = compressor.register_forward_hook(lambda m, a, out: got.update(kv=out[0][:, 0]))
    h2 = compressor.indexer.scorer.register_forward_hook(lambda m, a, out: got.update(ik=a[1]))
    try:
        with torch.no_grad():
            model(input_ids=forwarded, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(layer.mirror["compressor"].view(), got["kv"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.mirror["indexer"].view(), got["ik"], rtol=1e-4, atol=1e-5)
    # the device reserve holds exactly the mirror's rows of the resident entries
    reserve = layer.compressed_kv["compressor"]
    expect = layer.mirror["compressor"].view()[0, layer.resident_ids[0]]
    assert torch.equal(reserve[0], expect)


def test_reset_leaves_no_state_of_the_previous_request(model, prompt):
    """Regression for the seed's per-slot state reused across requests: after reset() a cache
    decodes a new request exactly like a fresh cache (tokens, refresh records, resident set)."""
    other = torch.randint(0, 64, (1, 90), generator=torch.Generator().manual_seed(5))
    used = lsa_cache(model)
    greedy(model, prompt, used, 20)
    used.reset()
    fresh = lsa_cache(model)
    assert torch.equal(greedy(model, other, used, 20), greedy(model, other, fresh, 20))
    assert used.refreshes == fresh.refreshes
    a, b = used.csa_layers[CSA_LAYER], fresh.csa_layers[CSA_LAYER]
    assert torch.equal(a.resident_ids, b.resident_ids) and a.n_entries == b.n_entries


def test_batch_rows_keep_their_own_resident_sets(model, prompt):
    """Each row of a batch is its own request: its resident set and tokens are those of the
    row decoded alone (the seed's row compaction reset other live rows' state)."""
    other = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(7))
    both = lsa_cache(model)
    out = greedy(model, torch.cat([prompt, other]), both, 30)
    for row, alone in enumerate((prompt, other)):
        solo = lsa_cache(model)
        assert torch.equal(out[row : row + 1], greedy(model, alone, solo, 30))
        ids = both.csa_layers[CSA_LAYER].resident_ids[row]
        assert torch.equal(ids, solo.csa_layers[CSA_LAYER].resident_ids[0])
    sets = both.csa_layers[CSA_LAYER].resident_ids
    assert not torch.equal(sets[0], sets[1])  # the rows really chose differently


def test_footprint_counts_the_reserve_not_the_history(model, prompt):
    cache = lsa_cache(model, budget=2)
    greedy(model, prompt, cache, 10)
    fp = cache.footprint()
    layer = cache.csa_layers[CSA_LAYER]
    assert fp["dense_csa"] == sum(m.nbytes for m in layer.mirror.values())
    assert fp["device_csa"] < fp["dense_csa"] and fp["host"] == fp["dense_csa"]
    assert cache.refreshes[-1]["resident"] == layer.resident_ids.shape[1]


def test_bad_input_is_refused_by_name(model, prompt):
    indexer = MemoryIndexer.from_model(model, [CSA_LAYER])
    with pytest.raises(ValueError, match="budget"):
        DeepseekV4LSACache(model, indexer, budget=0)
    with pytest.raises(ValueError, match="budget"):
        DeepseekV4LSACache(model, indexer, budget=1.5)
    with pytest.raises(TypeError, match="memory_indexer"):
        DeepseekV4LSACache(model, object())
    with pytest.raises(ValueError, match="target_layers"):
        MemoryIndexer.from_model(model, [0])
    with pytest.raises(ValueError, match="refresh_every"):
        DeepseekV4LSACache(model, indexer, refresh_every=0)
    kw = cache_kwarg(model)
    cache = lsa_cache(model)
    greedy(model, prompt, cache, 3)
    with pytest.raises(ValueError, match="one token per forward"), torch.no_grad():
        model(input_ids=prompt[:, :5], **{kw: cache})
    mask = torch.ones(1, 100, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"), torch.no_grad():
        model(input_ids=prompt, attention_mask=mask, **{kw: lsa_cache(model)})


def test_host_mirror_grows_and_gathers_exactly():
    from lsa.deepseek_v4.mirror import HostMirror

    mirror = HostMirror()
    parts = [torch.randn(2, n, 3) for n in (1, 70, 5, 200)]  # past the first capacity twice
    for part in parts:
        mirror.append(part)
    whole = torch.cat(parts, 1)
    assert mirror.length == 276 and torch.equal(mirror.view(), whole)
    assert mirror.nbytes == whole.numel() * 4
    rows, ids = torch.tensor([0, 1, 1]), torch.tensor([275, 0, 71])
    assert torch.equal(mirror.gather(rows, ids), whole[rows, ids])
    with pytest.raises(ValueError, match="ids must be < 276"):
        mirror.gather(torch.tensor([0]), torch.tensor([276]))
    with pytest.raises(ValueError, match="entries must be"):
        mirror.append(torch.randn(3, 1, 3))
