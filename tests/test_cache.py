"""LSACache on tiny random decoders: exactness at full budget, the mirror, the policy, batches."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import lsa
from lsa.cache import LSACache
from lsa.cache.model import cache_kwarg
from lsa.reference.select import budget_count, forced_chunks
from lsa.scorers.mean_key import MeanKeyScorer
from lsa.testing import TINY_DECODER

VOCAB = 128
TINY = dict(
    **TINY_DECODER,
    num_hidden_layers=3,
    vocab_size=VOCAB,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)).eval()


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)).eval()


def prompt(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros((len(lengths), s), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, s - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, s - n :] = 1
    return ids, mask


def generate(model, ids, mask, cache, new_tokens):
    out = model.generate(
        ids,
        attention_mask=mask,
        **{cache_kwarg(model): cache},
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, T], [B, new, vocab]


def dense_generate(model, ids, mask, new_tokens):
    model.set_attn_implementation("sdpa")
    try:
        return generate(model, ids, mask, DynamicCache(), new_tokens)
    finally:
        model.set_attn_implementation("lsa")


def lsa_model(factory=tiny_llama):
    model = factory()
    model.set_attn_implementation("lsa")
    return model


def make_cache(model, *, target_layers=(1,), chunk_size=16, **kw) -> LSACache:
    kw.setdefault("refresh_every", 8)
    scorer = MeanKeyScorer(model, target_layers, chunk_size)
    return LSACache(model, scorer, **kw)


class Recorder:
    """Wraps cache.update to keep every K/V it was given, per layer."""

    def __init__(self, cache: LSACache):
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        inner = cache.update

        def update(k, v, layer_idx, *args, **kw):
            self.k.setdefault(layer_idx, []).append(k.detach().clone())
            self.v.setdefault(layer_idx, []).append(v.detach().clone())
            return inner(k, v, layer_idx, *args, **kw)

        cache.update = update

    def full(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything written to ``layer``: [B, H, S_physical, D] each."""
        return torch.cat(self.k[layer], dim=2), torch.cat(self.v[layer], dim=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-wait on a shared 2-core machine
    (65 ms instead of 0.4 ms per reference attention call under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [tiny_llama, tiny_qwen2, tiny_qwen3, tiny_mistral],
    ids=["llama", "qwen2", "qwen3", "mistral"],
)
def test_full_budget_is_token_identical_to_dynamic_cache(factory):
    model = lsa_model(factory)
    ids, mask = prompt([70])
    ref_seq, ref_logits = dense_generate(model, ids, mask, 48)
    cache = make_cache(model, budget=1.0)
    seq, logits = generate(model, ids, mask, cache, 48)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert len(cache.refreshes) == 6  # steps 1, 9, ..., 41 of 47 decode forwards
    # everything is resident: each row's resident set is all chunks
    assert cache.footprint().resident_chunks == cache.footprint().total_chunks


def test_mirror_holds_exactly_what_was_written_at_low_budget():
    model = lsa_model()
    ids, mask = prompt([75, 50])
    cache = make_cache(model, budget=0.25, refresh_every=5)
    rec = Recorder(cache)
    generate(model, ids, mask, cache, 60)
    for layer in range(model.config.num_hidden_layers):
        k_all, v_all = rec.full(layer)
        rows = cache.mirror_kv(layer)
        for b, (k, v) in enumerate(rows):
            pad = cache.pad[b]
            assert k.shape[1] == k_all.shape[2] - pad
            assert torch.equal(k, k_all[b, :, pad:])
            assert torch.equal(v, v_all[b, :, pad:])


def test_mirror_matches_dynamic_cache_contents():
    model = lsa_model()
    ids, mask = prompt([70, 33])
    dense = DynamicCache()
    model.set_attn_implementation("sdpa")
    generate(model, ids, mask, dense, 30)
    model.set_attn_implementation("lsa")
    cache = make_cache(model, budget=1.0)
    generate(model, ids, mask, cache, 30)
    s = ids.shape[1]
    for layer in range(model.config.num_hidden_layers):
        dk, dv = dense.layers[layer].keys, dense.layers[layer].values
        for b, (k, v) in enumerate(cache.mirror_kv(layer)):
            pad = cache.pad[b]
            assert k.shape[1] == dk.shape[2] - pad
            # the prompt went through the same dense prefill: bit-identical
            assert torch.equal(k[:, : s - pad], dk[b, :, pad:s])
            assert torch.equal(v[:, : s - pad], dv[b, :, pad:s])
            torch.testing.assert_close(k, dk[b, :, pad:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, dv[b, :, pad:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "policy",
    [
        dict(budget=0.3),
        dict(budget=3, sink_chunks=1, recent_chunks=1),
        dict(threshold=0.0, sink_chunks=2, recent_chunks=0),
        dict(budget=0.5, threshold=0.0, sink_chunks=0, recent_chunks=2),
    ],
    ids=["fraction", "count", "threshold", "both"],
)
def test_keep_masks_follow_the_policy_at_every_refresh(policy):
    model = lsa_model()
    ids, mask = prompt([120, 90])
    cache = make_cache(model, chunk_size=8, refresh_every=6, **policy)
    generate(model, ids, mask, cache, 40)
    assert [r.step for r in cache.refreshes] == list(range(1, 40, 6))
    sink, recent = cache.sink_chunks, cache.recent_chunks
    for rec in cache.refreshes:
        for b in range(2):
            n = rec.kv_len[b] // 8
            keep, logits = rec.keep[b], rec.logits[b]
            assert keep.shape == (n,) and logits.shape == (n,)
            expected = lsa.select_chunks(
                logits[None, None],
                budget=policy.get("budget"),
                threshold=policy.get("threshold"),
                sink_chunks=sink,
                recent_chunks=recent,
            )[0, 0]
            assert torch.equal(keep, expected)
            forced = forced_chunks(n, sink, recent)
            assert bool(keep[forced].all()), "forced chunks must be resident"
            if "budget" in policy:
                cap = max(budget_count(policy["budget"], n), int(forced.sum()))
                assert int(keep.sum()) <= cap
            if "threshold" in policy:
                assert bool((logits[keep & ~forced] > policy["threshold"]).all())
            tail = [n] if rec.kv_len[b] % 8 else []
            assert rec.resident[b] == sorted(keep.nonzero().flatten().tolist() + tail)
    # not everything is resident: the policy really evicts
    assert any(len(r.resident[0]) < r.kv_len[0] // 8 for r in cache.refreshes)


@pytest.mark.parametrize(
    ("backend", "cs", "lengths", "lag"),
    [
        ("reference", 8, [90, 61], 0),
        ("flex", 16, [170, 121], 0),
        ("compact", 8, [90, 61], 0),
        ("compact", 16, [170, 121], 0),
        ("compact", 16, [77], 0),
        ("compact", 8, [90, 61], 3),
        ("reference", 4, [45, 30], 4),
    ],
)
def test_sparse_decode_equals_reference_over_the_full_history(backend, cs, lengths, lag):
    """Each decode step's attention = lsa.sparse_attention over the whole logical history with
    keep = the chunks in the block table (resident set + tail), for each reserve backend (flex
    reuses one plan across layers and steps until the block table changes), and with a recall
    lag (chunks begun during the lag kept in the tail)."""
    model = lsa_model()
    ids, mask = prompt(lengths)
    cache = make_cache(
        model, budget=0.3, chunk_size=cs, refresh_every=5, backend=backend, recall_lag=lag
    )
    rec = Recorder(cache)
    inner = cache.decode_attention
    checked = []

    def checking(layer, query, k_res, v_res, scaling):
        # read before the call: after the last layer it issues the next step's refresh
        resident = cache.resident_chunks()
        out = inner(layer, query, k_res, v_res, scaling)  # [B, 1, H_q, D]
        k_all, v_all = rec.full(layer.layer_idx)
        for b in range(cache.batch):
            pad, n = cache.pad[b], cache.kv_len_host[b]
            k, v = k_all[b : b + 1, :, pad:], v_all[b : b + 1, :, pad:]
            assert k.shape[2] == n
            n_chunks = -(-n // cs)
            keep = torch.zeros(n_chunks, dtype=torch.bool)
            keep[resident[b]] = True
            ref = lsa.sparse_attention(
                query[b : b + 1],
                k,
                v,
                keep=keep[None, None],
                chunk_size=cs,
                scale=scaling,
                enable_gqa=True,
                backend="reference",
            )
            torch.testing.assert_close(out[b : b + 1].transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
            checked.append(int(keep.sum()) < n_chunks)
        return out

    cache.decode_attention = checking
    generate(model, ids, mask, cache, 25)
    assert len(checked) == 24 * 3 * len(lengths)
    assert cache.compact_fallbacks == {}
    assert sum(checked) > len(checked) // 2, "most checks must run with chunks evicted"


@pytest.mark.parametrize(("lag", "tau", "cs"), [(3, 8, 8), (5, 6, 4), (1, 2, 8)])
def test_lagged_refresh_places_its_set_lag_steps_later(lag, tau, cs):
    """With recall_lag L, the set chosen after decode step t is in use from step t + 1 + L; the
    steps between read the previous set (plus every chunk begun since), and the first set, the
    prefill's, is used at once. The mirror still holds every token written."""
    model = lsa_model()
    ids, mask = prompt([75, 52])
    cache = make_cache(model, chunk_size=cs, refresh_every=tau, budget=3, recall_lag=lag)
    rec = Recorder(cache)
    seen = {}  # decode step -> per row, the chunks in the block table
    inner = cache.decode_attention

    def watching(layer, query, k_res, v_res, scaling):
        if layer.layer_idx == 0:
            seen[cache.decode_step] = cache.resident_chunks()
        return inner(layer, query, k_res, v_res, scaling)

    cache.decode_attention = watching
    new = 30
    generate(model, ids, mask, cache, new)
    chosen_after = range(tau, new - 1, tau)  # decode steps after which a lagged refresh ran
    expected = [1] + [t + 1 + lag for t in chosen_after if t + 1 + lag <= new - 1]
    assert [r.step for r in cache.refreshes] == expected
    assert cache._pending is None or cache._pending.step > new - 1
    for step, resident in seen.items():
        placed = max((r for r in cache.refreshes if r.step <= step), key=lambda r: r.step)
        for b in range(2):
            kept = placed.keep[b].nonzero().flatten().tolist()
            n_done = placed.kv_len[b] // cs
            tail = resident[b][len(kept) :]
            assert resident[b][: len(kept)] == kept, (step, b)
            assert tail == list(range(n_done, n_done + len(tail))), "a consecutive tail"
            written = placed.kv_len[b] + step - placed.step + (lag if placed.step > 1 else 0)
            assert tail[-1] == written // cs  # the chunk of the token this step writes
    # the lag is observable: some lagged refresh changed the kept set
    keeps = [[k.nonzero().flatten().tolist() for k in r.keep] for r in cache.refreshes]
    assert any(keeps[i] != keeps[i - 1] for i in range(1, len(keeps)))
    cache.flush()
    for layer in range(model.config.num_hidden_layers):
        k_all, v_all = rec.full(layer)
        for b, (k, v) in enumerate(cache.mirror_kv(layer)):
            pad = cache.pad[b]
            assert k.shape[1] == k_all.shape[2] - pad
            torch.testing.assert_close(k, k_all[b, :, pad:])
            torch.testing.assert_close(v, v_all[b, :, pad:])


def test_recall_lag_is_checked():
    model = lsa_model()
    with pytest.raises(ValueError, match=r"recall_lag \(8\) must be < refresh_every \(8\)"):
        make_cache(model, budget=2, refresh_every=8, recall_lag=8)
    with pytest.raises(ValueError, match="recall_lag must be"):
        make_cache(model, budget=2, recall_lag=-1)
    with pytest.raises(ValueError, match="needs recall='copies'"):
        make_cache(model, budget=2, recall_lag=2, recall="zero_copy")


def test_reset_isolates_requests():
    model = lsa_model()
    a_ids, a_mask = prompt([80], seed=3)
    b_ids, b_mask = prompt([50], seed=4)
    fresh = make_cache(model, budget=0.3)
    b_seq, b_logits = generate(model, b_ids, b_mask, fresh, 30)

    cache = make_cache(model, budget=0.3)
    generate(model, a_ids, a_mask, cache, 30)
    with pytest.raises(ValueError, match=r"reset\(\)"):
        generate(model, b_ids, b_mask, cache, 30)
    cache.reset()
    assert cache.footprint().device_bytes == 0 and cache.footprint().host_bytes == 0
    seq, logits = generate(model, b_ids, b_mask, cache, 30)
    assert torch.equal(seq, b_seq)
    assert torch.equal(logits, b_logits)
    assert [r.resident for r in cache.refreshes] == [r.resident for r in fresh.refreshes]


@pytest.mark.parametrize("budget", [1.0, 0.3])
def test_left_padded_batch_matches_unbatched_rows(budget):
    model = lsa_model()
    lengths = [83, 47, 20]
    ids, mask = prompt(lengths)
    cache = make_cache(model, budget=budget)
    seq, logits = generate(model, ids, mask, cache, 40)
    assert cache.pad == [0, 36, 63]
    s = ids.shape[1]
    for b, n in enumerate(lengths):
        one = make_cache(model, budget=budget)
        row_seq, row_logits = generate(model, ids[b : b + 1, s - n :], None, one, 40)
        assert torch.equal(seq[b, s - n :], row_seq[0])
        torch.testing.assert_close(logits[b], row_logits[0], atol=1e-4, rtol=1e-4)
        # the row's own chunks, keep masks and refreshes
        assert [r.resident[b] for r in cache.refreshes] == [r.resident[0] for r in one.refreshes]


def test_long_generation_never_drops_a_token():
    model = lsa_model()
    ids, mask = prompt([40, 25])
    cache = make_cache(model, budget=2, chunk_size=8, refresh_every=4)
    rec = Recorder(cache)
    new = 150
    generate(model, ids, mask, cache, new)
    fp = cache.footprint()
    assert fp.total_chunks == (-(-(40 + new - 1) // 8), -(-(25 + new - 1) // 8))
    assert cache.n_slots < min(fp.total_chunks) // 2, "the reserve is far smaller than history"
    assert len(cache.refreshes) == -(-(new - 1) // 4)
    # room for the tail is made at refresh: decode steps never reallocate the reserve
    assert [g for g in cache.grows if g[2] == "decode"] == []
    for layer in range(model.config.num_hidden_layers):
        k_all, v_all = rec.full(layer)
        for b, (k, v) in enumerate(cache.mirror_kv(layer)):
            assert k.shape[1] == cache.kv_len_host[b]
            assert torch.equal(k, k_all[b, :, cache.pad[b] :])
            assert torch.equal(v, v_all[b, :, cache.pad[b] :])


def test_footprint_counts_real_storage():
    model = lsa_model()
    ids, mask = prompt([300])
    cache = make_cache(model, budget=0.1, chunk_size=16, refresh_every=16)
    generate(model, ids, mask, cache, 20)
    fp = cache.footprint()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_slot = 2 * cfg.num_key_value_heads * 16 * head_dim * 4  # K+V, fp32
    assert fp.reserve_bytes == cfg.num_hidden_layers * cache.n_slots * per_slot
    assert (
        fp.dense_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 319 * head_dim * 4
    )
    # completed chunks are in the mirror; the chunk being written reaches it when it completes
    assert fp.host_bytes >= fp.dense_bytes - per_slot * cfg.num_hidden_layers
    cache.flush()
    assert cache.footprint().host_bytes >= fp.dense_bytes  # now the mirror holds everything
    assert fp.block_table_bytes == cache.n_slots * 4
    assert fp.chunk_key_bytes > 0
    assert 0 < fp.tail_bytes <= fp.reserve_bytes
    assert fp.device_fraction < 0.5
    assert fp.resident_chunks[0] < fp.total_chunks[0]


@pytest.mark.slow
def test_smollm2_full_budget_is_token_identical_to_dynamic_cache():
    models = pytest.importorskip("lsa.models")
    try:
        model, _ = models.load_model("smollm2", attn_implementation="sdpa")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    ids = torch.randint(
        100, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0)
    )
    ref_seq, ref_logits = generate(model, ids, None, DynamicCache(), 24)
    model.set_attn_implementation("lsa")
    cache = LSACache(model, MeanKeyScorer(model, (10, 20), 64), budget=1.0, refresh_every=8)
    seq, logits = generate(model, ids, None, cache, 24)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert len(cache.refreshes) == 3


def test_lightning_indexer_drives_the_cache():
    """The real ChunkScorer (randomly initialised): the cache consumes it without adapters."""
    lightning = pytest.importorskip("lsa.scorers.lightning")
    model = lsa_model()
    config = lightning.IndexerConfig(
        hidden_size=64,
        kv_heads=2,
        kv_head_dim=16,
        target_layers=(0, 2),
        chunk_size=8,
        n_heads=2,
        index_dim=16,
        q_rank=16,
        rope_dim=8,
    )
    torch.manual_seed(0)
    indexer = lightning.LightningIndexer(config, model.model.rotary_emb.inv_freq).eval()
    cache = LSACache(model, indexer, budget=0.25, refresh_every=6)
    ids, mask = prompt([100, 64])
    generate(model, ids, mask, cache, 20)
    assert len(cache.refreshes) == 4
    for rec in cache.refreshes:
        for b in range(2):
            expected = lsa.select_chunks(rec.logits[b][None, None], budget=0.25)[0, 0]
            assert torch.equal(rec.keep[b], expected)
    assert cache.footprint().resident_chunks[0] < cache.footprint().total_chunks[0]


def test_refresh_copies_only_newly_resident_chunks():
    model = lsa_model()
    ids, mask = prompt([150, 97])
    cs = 8
    cache = make_cache(model, budget=0.3, chunk_size=cs, refresh_every=7)
    generate(model, ids, mask, cache, 50)
    first = cache.refreshes[0]
    assert first.recalled == [len(r) for r in first.resident]  # the reserve starts empty
    for prev, cur in zip(cache.refreshes, cache.refreshes[1:], strict=False):
        for b in range(2):
            # resident just before `cur`: prev's set plus every chunk begun since (the tail)
            begun = range(prev.kv_len[b] // cs, -(-cur.kv_len[b] // cs))
            before = set(prev.resident[b]) | set(begun)
            assert cur.recalled[b] == len(set(cur.resident[b]) - before)
    layers = model.config.num_hidden_layers
    recalled = sum(sum(r.recalled) for r in cache.refreshes)
    assert cache.recall_stats.chunks == layers * recalled
    chunk_bytes = 2 * 2 * cs * 16 * 4  # K+V, 2 KV heads, head dim 16, fp32
    assert cache.recall_stats.bytes == layers * recalled * chunk_bytes
    assert sum(r.recalled_bytes for r in cache.refreshes) == cache.recall_stats.bytes
    # later refreshes move far less than the resident set: hits are not copied again
    later = sum(sum(r.recalled) for r in cache.refreshes[1:])
    resident = sum(sum(len(x) for x in r.resident) for r in cache.refreshes[1:])
    assert later < resident / 2


def test_mirror_segments_are_chunk_major_layer_inside_and_grow_without_copying():
    from lsa.cache.mirror import HostMirror

    # 2 rows, 3 layers, 2 KV heads, chunks of 4, head dim 5
    m = HostMirror(
        2, 3, 2, 4, 5, torch.float32, device=torch.device("cpu"), pin=False, seg_chunks=3
    )
    m.ensure(5)  # the prompt: one segment of exactly 5 chunks
    first = m.segments[0]
    m.ensure(6)
    m.ensure(9)  # generation: segments of seg_chunks
    assert [s.shape[1] for s in m.segments] == [5, 3, 3] and m.segments[0] is first
    kv = torch.randn(3, 9, 2, 2, 4, 5)  # [layer, chunk, K/V, H, cs, D]
    for layer in range(3):
        m.write_chunks(1, 0, layer, kv[layer, :4])
        m.write_chunks(1, 4, layer, kv[layer, 4:])  # crosses two segment borders
    for c in range(9):
        # one chunk of all layers is one contiguous block
        assert m.chunk(1, c).is_contiguous() and torch.equal(m.chunk(1, c), kv[:, c])
        assert not m.chunk(0, c).any()  # other rows untouched
    runs = m.runs(1, 3, 5)
    assert [(o, v.shape[0]) for o, v in runs] == [(0, 2), (2, 3)]
    assert all(v.is_contiguous() for _, v in runs)  # a run of chunks, all layers: one copy
    for layer in range(3):
        k, v = m.tokens(1, layer, 30)
        ref = kv[layer].permute(1, 2, 0, 3, 4).reshape(2, 2, 36, 5)[:, :, :30]
        assert torch.equal(k, ref[0]) and torch.equal(v, ref[1])
    assert m.chunk_nbytes == 3 * 2 * 2 * 4 * 5 * 4
    rows, chunks = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 4, 5, 8, 6])
    assert m.chunk_addresses(rows, chunks).tolist() == [
        m.chunk(r, c).data_ptr() for r, c in zip(rows.tolist(), chunks.tolist(), strict=True)
    ]
    with pytest.raises(IndexError, match="capacity 11"):
        m.chunk_addresses(torch.tensor([0]), torch.tensor([11]))
    assert m.nbytes() == 2 * 11 * m.chunk_nbytes
    with pytest.raises(ValueError, match="layer 2 has"):
        m.check_layer(2, 2, 6, torch.float32)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_compact_full_budget_is_token_identical_to_dynamic_cache(factory):
    model = lsa_model(factory)
    ids, mask = prompt([70, 45])
    ref_seq, ref_logits = dense_generate(model, ids, mask, 40)
    cache = make_cache(model, budget=1.0, backend="compact")
    assert cache.decode_backend == "compact"
    seq, logits = generate(model, ids, mask, cache, 40)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_slots_stay_compacted_kept_chunks_then_tail():
    """At every decode step, row b's kept chunks fill slots 0..n_kept-1 and its tail the slots
    after them in order, so the visible tokens are a prefix of the flattened reserve."""
    model = lsa_model()
    ids, mask = prompt([150, 97])
    cs = 8
    # threshold: the kept count changes between refreshes, so compaction has to move chunks
    cache = make_cache(model, threshold=0.0, chunk_size=cs, refresh_every=5, backend="compact")
    inner = cache.decode_attention
    seen = []

    def checking(layer, query, k_res, v_res, scaling):
        for b in range(cache.batch):
            r, first, n = cache.n_kept[b], cache.tail_first[b], cache.kv_len_host[b]
            table = cache.bt_host[b].tolist()
            kept = sorted(table[:r])
            assert all(c < first for c in kept)
            tail = list(range(first, -(-n // cs)))
            assert table[r : r + len(tail)] == tail
            assert all(c == -1 for c in table[r + len(tail) :])
            assert cache.visible[b] == r * cs + n - first * cs
            seen.append(r)
        return inner(layer, query, k_res, v_res, scaling)

    cache.decode_attention = checking
    generate(model, ids, mask, cache, 40)
    assert len(set(seen)) > 2, "the kept count must vary for this test to mean something"
    assert cache.recall_stats.slot_moves > 0, "compaction must have moved chunks"
    moved = sum(sum(r.recalled) for r in cache.refreshes)
    # recall copies are per run of chunks, all layers at once: never more copies than chunks
    assert 0 < cache.recall_stats.copies <= moved
    assert cache.recall_stats.chunks == moved * model.config.num_hidden_layers


def test_compact_falls_back_explicitly_for_several_queries():
    """S_q > 1 needs a causal mask over the tail: the compact path hands the call to
    reserve_attention (exact) and records why."""
    model = lsa_model()
    ids, mask = prompt([90, 61])
    cache = make_cache(model, budget=0.3, chunk_size=8, backend="compact")
    generate(model, ids, mask, cache, 20)
    layer = cache.layers[0]
    b, h, n_slots, cs, d = layer.reserve_k.shape
    rk = layer.reserve_k.view(b, h, n_slots * cs, d)
    rv = layer.reserve_v.view(b, h, n_slots * cs, d)
    q = torch.randn(b, 4, 2, d)
    out = cache._decode_attention(q, rk, rv, None)
    ref = lsa.reserve_attention(
        q,
        rk,
        rv,
        cache.block_table,
        cache.kv_len,
        chunk_size=cs,
        enable_gqa=True,
        backend="reference",
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert list(cache.compact_fallbacks) == ["S_q=2 queries need a causal mask over the tail"]


def test_per_layer_resident_sets_are_refused():
    model = lsa_model()
    with pytest.raises(NotImplementedError, match="resident_sets='per_layer'"):
        make_cache(model, budget=0.3, resident_sets="per_layer")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_path_is_compact_and_exact(dtype):
    """On CUDA "auto" decodes through the compact path (fused SDPA over the reserve prefix,
    side-stream recall): each step equals the fp32 reference over the full history with the same
    resident chunks, and at budget 1.0 greedy tokens match DynamicCache."""
    model = lsa_model().to("cuda", dtype)
    ids, mask = prompt([150, 97])
    ids, mask = ids.cuda(), mask.cuda()
    cache = make_cache(model, budget=0.3, chunk_size=8, refresh_every=5)
    assert cache.decode_backend == "compact"
    rec = Recorder(cache)
    inner = cache.decode_attention
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def checking(layer, query, k_res, v_res, scaling):
        resident = cache.resident_chunks()
        out = inner(layer, query, k_res, v_res, scaling)
        k_all, v_all = rec.full(layer.layer_idx)
        for b in range(cache.batch):
            pad = cache.pad[b]
            k, v = k_all[b : b + 1, :, pad:].float(), v_all[b : b + 1, :, pad:].float()
            keep = torch.zeros(-(-k.shape[2] // 8), dtype=torch.bool, device="cuda")
            keep[resident[b]] = True
            ref = lsa.sparse_attention(
                query[b : b + 1].float(),
                k,
                v,
                keep=keep[None, None],
                chunk_size=8,
                scale=scaling,
                enable_gqa=True,
                backend="reference",
            )
            torch.testing.assert_close(
                out[b : b + 1].transpose(1, 2).float(), ref, atol=tol, rtol=tol
            )
        return out

    cache.decode_attention = checking
    generate(model, ids, mask, cache, 25)
    assert cache.compact_fallbacks == {} and cache.recall_stats.events

    if dtype == torch.float32:  # bf16 kernels round differently from dense SDPA's
        ref_seq, _ = dense_generate(model, ids, mask, 30)
        seq, _ = generate(model, ids, mask, make_cache(model, budget=1.0), 30)
        assert torch.equal(seq, ref_seq)


def test_load_prefill_continues_exactly_like_a_prefill_through_the_cache():
    """A dense prefill run elsewhere (lsa.eval.prefill) and handed over with load_prefill gives
    the same refreshes (logits, keep masks, resident sets) and the same tokens and logits as the
    cache's own prefill (ragged batch, evictions)."""
    from lsa.eval.prefill import prefill_batch

    model = lsa_model()
    ids, mask = prompt([90, 61, 77])
    own = make_cache(model, budget=0.3, refresh_every=5)
    seq, logits = generate(model, ids, mask, own, 12)

    pre = prefill_batch(model, ids, mask, pad_id=0)
    assert model.config._attn_implementation == "lsa"  # restored
    assert torch.equal(pre.first, seq[:, ids.shape[1]])
    handed = make_cache(model, budget=0.3, refresh_every=5)
    handed.load_prefill(pre.keys_values(), pre.mask, pre.hidden)
    ids2, mask2 = pre.continued_inputs()
    seq2, logits2 = generate(model, ids2, mask2, handed, 11)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(logits2, logits[:, 1:], atol=1e-5, rtol=1e-5)
    assert len(handed.refreshes) == len(own.refreshes) > 2
    for a, b in zip(own.refreshes, handed.refreshes, strict=True):
        assert (a.step, a.kv_len, a.resident) == (b.step, b.kv_len, b.resident)
        for la, lb in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert any(
        len(r) < n // 16
        for r, n in zip(own.refreshes[-1].resident, own.refreshes[-1].kv_len, strict=True)
    )


def test_load_prefill_refuses_what_does_not_fit():
    from lsa.eval.prefill import prefill_batch

    model = lsa_model()
    ids, mask = prompt([40, 33])
    pre = prefill_batch(model, ids, mask, pad_id=0)
    cache = make_cache(model, budget=0.3)
    with pytest.raises(ValueError, match="layers"):
        cache.load_prefill(pre.keys_values()[:1], pre.mask, pre.hidden)
    with pytest.raises(ValueError, match="target layers"):
        cache.load_prefill(pre.keys_values(), pre.mask, {})
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\]"):
        cache.load_prefill(pre.keys_values(), pre.mask[:, 1:], pre.hidden)
    cache.load_prefill(pre.keys_values(), pre.mask, pre.hidden)
    with pytest.raises(ValueError, match=r"reset\(\)"):  # one request at a time
        cache.load_prefill(pre.keys_values(), pre.mask, pre.hidden)


def test_capture_hooks_are_shared_and_never_accumulate():
    """One hidden-state hook per target attention module, however many caches exist: caches
    dropped without close() leave nothing, 200 live caches share it, the last close() removes it,
    and each capture reaches only the cache the forward runs with."""
    from lsa.cache.model import attention_modules

    model = lsa_model()
    attn = attention_modules(model, 3)

    def hooks() -> list[int]:
        return [len(attn[i]._forward_pre_hooks) for i in range(3)]

    for _ in range(200):
        make_cache(model, budget=0.3, target_layers=(0, 2))  # dropped, never closed
    assert hooks() == [1, 0, 1]
    alive = [make_cache(model, budget=0.3, target_layers=(0, 2)) for _ in range(200)]
    assert hooks() == [1, 0, 1]

    ids, mask = prompt([90, 61])
    untouched = lsa_model()  # same weights, no other cache ever made on it
    ref = make_cache(untouched, budget=0.3, target_layers=(0, 2))
    ref_seq, ref_logits = generate(untouched, ids, mask, ref, 20)
    seq, logits = generate(model, ids, mask, alive[123], 20)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert [r.resident for r in alive[123].refreshes] == [r.resident for r in ref.refreshes]
    assert all(not c.hidden for i, c in enumerate(alive) if i != 123)

    import gc

    gc.collect()  # the dropped caches are gone: they hold the hook no longer
    for cache in alive:
        cache.close()
    assert hooks() == [0, 0, 0]
    with pytest.raises(RuntimeError, match=r"was closed .*create a new LSACache"):
        generate(model, ids, mask, alive[0], 4)


def _threaded(jobs: dict, run) -> tuple[dict, list[BaseException]]:
    """Run ``run(name)`` for every job in its own thread, all started together."""
    import threading

    barrier = threading.Barrier(len(jobs))
    out, errors = {}, []

    def work(name):
        barrier.wait()
        try:
            out[name] = run(name)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors


def test_two_caches_in_two_threads_give_what_each_gives_alone():
    model = lsa_model()
    jobs = {"a": prompt([90, 61], seed=3), "b": prompt([70], seed=4)}
    settings = dict(budget=0.3, chunk_size=8, refresh_every=3)
    alone = {n: generate(model, *jobs[n], make_cache(model, **settings), 30) for n in jobs}
    for _ in range(3):
        caches = {n: make_cache(model, **settings) for n in jobs}
        out, errors = _threaded(
            jobs, lambda n, caches=caches: generate(model, *jobs[n], caches[n], 30)
        )
        assert errors == []
        for n in jobs:
            assert torch.equal(out[n][0], alone[n][0])
            assert torch.equal(out[n][1], alone[n][1])


def test_one_cache_in_two_threads_serves_one_and_refuses_the_other():
    model = lsa_model()
    jobs = {"a": prompt([90, 61], seed=3), "b": prompt([70], seed=4)}
    settings = dict(budget=0.3, chunk_size=8, refresh_every=3, target_layers=(0, 1))
    alone = {n: generate(model, *jobs[n], make_cache(model, **settings), 30) for n in jobs}
    cache = make_cache(model, **settings)
    for _ in range(3):
        cache.reset()
        out, errors = _threaded(jobs, lambda n: generate(model, *jobs[n], cache, 30))
        assert len(out) == len(errors) == 1
        assert isinstance(errors[0], ValueError | RuntimeError)
        assert re.search(r"another thread|already holds a request", str(errors[0]))
        ((name, (seq, logits)),) = out.items()
        assert torch.equal(seq, alone[name][0]) and torch.equal(logits, alone[name][1])
