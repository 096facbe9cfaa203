"""lsa.generate: the static-shape decode step equals the eager LSACache path and, with every chunk
kept, dense generation; the CUDA-graph capture of that step is tested on CUDA."""

from __future__ import annotations

import pytest
import torch
from test_cache import dense_generate, generate, lsa_model, make_cache, prompt, tiny_qwen2
from torch._dynamo.utils import counters
from transformers import StaticCache

import lsa
from lsa.generation import GenerateStats


def _compare(model, lengths, new_tokens, **cache_kw):
    ids, mask = prompt(lengths)
    eager_cache = make_cache(model, **cache_kw)
    eager, _ = generate(model, ids, mask, eager_cache, new_tokens)
    static_cache = make_cache(model, **cache_kw)
    stats = GenerateStats()
    static = lsa.generate(
        model, ids, cache=static_cache, attention_mask=mask, max_new_tokens=new_tokens,
        graph=False, stats=stats,
    )  # fmt: skip
    return eager, static, eager_cache, static_cache, stats


@pytest.mark.parametrize(
    ("lengths", "budget", "refresh_every", "lag"),
    [
        ([70], 3, 8, 0),
        ([37, 90], 0.3, 8, 0),
        ([100, 16, 53], 4, 5, 0),
        ([48], 2, 16, 0),
        ([37, 90], 0.3, 8, 3),
        ([100, 16, 53], 4, 5, 4),
        ([70], 2, 16, 15),
    ],
)
def test_static_step_equals_the_eager_cache(lengths, budget, refresh_every, lag):
    """Same tokens, same resident sets at every refresh, the same mirror (chunk ends, partial
    chunks, rows of different lengths, refreshes inside the generation, a recall lag whose
    placement moves chunks completed since the last refresh). The decode attention differs
    (block table vs compacted prefix), so generated K/V agree to fp32 rounding."""
    model = lsa_model()
    eager, static, ec, sc, stats = _compare(
        model, lengths, 40, budget=budget, refresh_every=refresh_every, recall_lag=lag
    )
    assert torch.equal(eager, static)
    assert [r.step for r in ec.refreshes] == [r.step for r in sc.refreshes]
    assert stats.refreshes == len(sc.refreshes) - 1 + (sc._pending is not None) > 0
    assert [r.resident for r in ec.refreshes] == [r.resident for r in sc.refreshes]
    ec.flush()
    sc.flush()
    assert ec.kv_len_host == sc.kv_len_host
    for layer in range(model.config.num_hidden_layers):
        for mine, theirs in zip(sc.mirror_kv(layer), ec.mirror_kv(layer), strict=True):
            torch.testing.assert_close(mine, theirs)


def test_static_step_at_full_budget_equals_dense():
    model = lsa_model(tiny_qwen2)
    ids, mask = prompt([45, 81])
    dense, _ = dense_generate(model, ids, mask, 30)
    cache = make_cache(model, budget=1.0)
    out = lsa.generate(model, ids, cache=cache, attention_mask=mask, max_new_tokens=30, graph=False)
    assert torch.equal(out, dense)


def test_dense_static_cache_through_the_same_loop():
    """The dense baseline of bench/decode_e2e.py: a transformers StaticCache driven by the loop."""
    model = lsa_model()
    ids, mask = prompt([50])
    dense, _ = dense_generate(model, ids, mask, 20)
    model.set_attn_implementation("sdpa")
    try:
        cache = StaticCache(config=model.config, max_cache_len=80)
        out = lsa.generate(model, ids, cache=cache, max_new_tokens=20, graph=False)
    finally:
        model.set_attn_implementation("lsa")
    assert torch.equal(out, dense)


def test_stops_where_generate_stops():
    """Once every row has met an end token, the output ends where model.generate's does."""
    model = lsa_model()
    ids, mask = prompt([40, 33])
    probe = lsa.generate(
        model, ids, cache=make_cache(model, budget=3), attention_mask=mask, max_new_tokens=12,
        graph=False,
    )  # fmt: skip
    eos = int(probe[0, ids.shape[1] + 4])  # a token the first row emits
    model.generation_config.eos_token_id = eos
    try:
        eager, _ = generate(model, ids, mask, make_cache(model, budget=3), 12)
        static = lsa.generate(
            model, ids, cache=make_cache(model, budget=3), attention_mask=mask,
            max_new_tokens=12, graph=False,
        )  # fmt: skip
    finally:
        model.generation_config.eos_token_id = None
    assert torch.equal(eager, static)


def test_bad_arguments():
    model = lsa_model()
    ids, _ = prompt([20])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        lsa.generate(model, ids, cache=make_cache(model, budget=2), max_new_tokens=0)
    with pytest.raises(ValueError, match="graph=True needs CUDA"):
        lsa.generate(model, ids, cache=make_cache(model, budget=2), max_new_tokens=4, graph=True)
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, S\] tensor"):
        lsa.generate(model, ids[0], cache=make_cache(model, budget=2), max_new_tokens=4)


@pytest.mark.gpu
@pytest.mark.parametrize("lag", [0, 5])
def test_captured_step_equals_eager_static_step_cuda(lag):
    """On CUDA: the graph-captured generation gives the tokens of the same loop run eagerly, with
    one capture for a 1024-token generation (63 refreshes between replays, their recall on the
    side stream, behind the replays with a lag) and no recompile."""
    model = lsa_model().cuda()
    ids, mask = prompt([300, 170])
    ids, mask = ids.cuda(), mask.cuda()
    outs, stats = [], []
    graphs = counters["stats"]["unique_graphs"]
    for graph in (False, True):
        st = GenerateStats()
        cache = make_cache(model, budget=4, refresh_every=16, recall_lag=lag)
        outs.append(
            lsa.generate(
                model,
                ids,
                cache=cache,
                attention_mask=mask,
                max_new_tokens=1024,
                graph=graph,
                stats=st,
            )
        )
        stats.append(st)
    assert torch.equal(outs[0], outs[1])
    assert stats[1].captures == 1 and stats[1].refreshes == 1023 // 16
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled during generation


def test_the_mirror_is_allocated_for_the_whole_request_at_the_prefill():
    """lsa.generate tells the cache its max_new_tokens for the prefill: one mirror segment for
    prompt + new tokens (no host allocation mid-decode), the user's setting left as it was."""
    model = lsa_model()
    ids, mask = prompt([40, 70])
    cache = make_cache(model, budget=2)
    lsa.generate(model, ids, cache=cache, attention_mask=mask, max_new_tokens=60, graph=False)
    assert len(cache.mirror.segments) == 1
    assert cache.mirror.capacity * cache.chunk_size >= 70 + 60
    assert cache.max_new_tokens is None
    limited = make_cache(model, budget=2, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"max_new_tokens \(11\) exceeds the cache's"):
        lsa.generate(model, ids, cache=limited, max_new_tokens=11, graph=False)
