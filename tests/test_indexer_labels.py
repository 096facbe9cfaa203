"""Lookahead targets: attention mass equals the model's real attention; causality; CSR rows."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lsa.indexer.labels import (
    LabelConfig,
    chunk_attention_mass,
    lookahead_targets,
    oracle_positives,
    teacher_forced_pass,
)
from lsa.testing import tiny_decoder

CS, TAU = 8, 8


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        vocab_size=101,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )


def _eager_chunk_mass(model, ids):
    """Reference: the model's own eager attention probabilities, summed over layers and heads."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(prev)
    full = sum(a[0].sum(0) for a in att)  # [S, S]
    s = full.shape[0]
    return F.pad(full, (0, (-s) % CS)).view(s, -1, CS).sum(-1), sum(a.shape[1] for a in att)


def test_recorded_mass_is_the_models_attention(tiny):
    ids = torch.randint(0, 101, (1, 83))  # not a multiple of the chunk size
    rec = teacher_forced_pass(tiny, ids, [1], LabelConfig(chunk_size=CS, query_block=16))
    want, n_terms = _eager_chunk_mass(tiny, ids)
    assert rec.n_terms == n_terms == 8
    torch.testing.assert_close(rec.mass, want, rtol=1e-4, atol=1e-5)
    assert rec.hidden[1].shape == (83, 64) and rec.keys[1].shape == (2, 83, 16)
    assert tiny.config._attn_implementation == "sdpa"  # restored


def test_hidden_is_the_attention_input_of_the_target_layer(tiny):
    ids = torch.randint(0, 101, (1, 40))
    rec = teacher_forced_pass(tiny, ids, [1], LabelConfig(chunk_size=CS))
    with torch.no_grad():
        h = tiny.model(ids, output_hidden_states=True).hidden_states[1]  # input of layer 1
        want = tiny.model.layers[1].input_layernorm(h)[0]
    torch.testing.assert_close(rec.hidden[1], want)


def test_head_max_mass_is_the_strongest_head_of_any_label_layer(tiny):
    ids = torch.randint(0, 101, (1, 83))
    cfg = LabelConfig(chunk_size=CS, query_block=16, head_reduce="max")
    rec = teacher_forced_pass(tiny, ids, [1], cfg)
    prev = tiny.config._attn_implementation
    tiny.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tiny(ids, output_attentions=True).attentions  # per layer [1, H, S, S]
    finally:
        tiny.set_attn_implementation(prev)
    per_head = torch.cat([a[0] for a in att])  # [layers * H, S, S]
    per_head = F.pad(per_head, (0, (-83) % CS)).view(per_head.shape[0], 83, -1, CS).sum(-1)
    assert rec.n_terms == 1
    torch.testing.assert_close(rec.mass, per_head.amax(0), rtol=1e-4, atol=1e-5)
    assert (rec.mass.sum(1) > 1).any()  # not a distribution, unlike the mean
    with pytest.raises(ValueError, match="head_reduce"):
        LabelConfig(head_reduce="sum")


def test_chunk_mass_blocks_match_one_block_and_gqa():
    torch.manual_seed(3)
    q, k = torch.randn(6, 50, 8), torch.randn(2, 50, 8)
    a = chunk_attention_mass(q, k, 0.3, 8, query_block=7)
    b = chunk_attention_mass(q, k, 0.3, 8, query_block=64)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.sum(1), torch.full((50,), 6.0))
    # query 0 sees only key 0 (chunk 0): causal.
    torch.testing.assert_close(a[0], torch.tensor([6.0] + [0.0] * 6))


def test_targets_follow_the_definition(tiny):
    ids = torch.randint(0, 101, (1, 96))
    cfg = LabelConfig(chunk_size=CS, lookahead=TAU, sink_chunks=1, recent_chunks=2)
    rec = teacher_forced_pass(tiny, ids, [0], cfg)
    mass, n_terms = _eager_chunk_mass(tiny, ids)
    a = mass / n_terms
    positions = [30, 47, 63, 64, 90, 95]
    tg = lookahead_targets(rec.mass, rec.n_terms, positions, cfg)
    for i, t in enumerate(positions):
        idx = tg.index[tg.ptr[i] : tg.ptr[i + 1]].long()
        n_t = (t + 1) // CS
        assert int(tg.n_chunks[i]) == n_t
        assert idx.tolist() == list(range(1, n_t - 2))  # existing, not sink, not recent
        window = a[t : min(t + TAU, 96), idx].sum(0)
        torch.testing.assert_close(tg.target[tg.ptr[i] : tg.ptr[i + 1]], window / window.sum())
        past = a[max(0, t - 63) : t + 1, idx].sum(0)
        torch.testing.assert_close(tg.reactive[tg.ptr[i] : tg.ptr[i + 1]], past / past.sum())


def test_no_chunk_from_the_future_is_a_positive_or_a_negative(tiny):
    """Every labelled chunk has ended by t, and tokens after the lookahead window change nothing."""
    torch.manual_seed(5)
    ids = torch.randint(0, 101, (1, 120))
    cfg = LabelConfig(chunk_size=CS, lookahead=TAU, sink_chunks=1, recent_chunks=1)
    positions = list(range(8, 110, 3))
    rec = teacher_forced_pass(tiny, ids, [1], cfg)
    tg = lookahead_targets(rec.mass, rec.n_terms, positions, cfg)
    for i, t in enumerate(positions):
        idx = tg.index[tg.ptr[i] : tg.ptr[i + 1]].long()
        assert bool(((idx + 1) * CS - 1 <= t).all()), (t, idx.tolist())
    # Change every token after the window of t = 60: targets at t <= 60 are unchanged, and the
    # query-tower hidden state and existing chunks' keys do not see the change either.
    t0 = 60
    changed = ids.clone()
    changed[0, t0 + TAU :] = (changed[0, t0 + TAU :] + 1) % 101
    rec2 = teacher_forced_pass(tiny, changed, [1], cfg)
    early = [p for p in positions if p <= t0]
    a = lookahead_targets(rec.mass, rec.n_terms, early, cfg)
    b = lookahead_targets(rec2.mass, rec2.n_terms, early, cfg)
    torch.testing.assert_close(a.target, b.target)
    torch.testing.assert_close(rec.hidden[1][: t0 + 1], rec2.hidden[1][: t0 + 1])
    torch.testing.assert_close(rec.keys[1][:, : t0 + 1], rec2.keys[1][:, : t0 + 1])
    # ... while a later position's target does change (the check above is not vacuous).
    late = [100]
    assert not torch.allclose(
        lookahead_targets(rec.mass, rec.n_terms, late, cfg).target,
        lookahead_targets(rec2.mass, rec2.n_terms, late, cfg).target,
    )


def test_oracle_positives_are_the_top_k_selectable_chunks():
    target = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.1, 0.0])
    selectable = torch.tensor([False, True, True, True, True, False])
    pos = oracle_positives(target, selectable, 2)
    assert pos.tolist() == [False, True, False, True, False, False]
    # ties go to the earlier chunk
    assert oracle_positives(target, selectable, 3).tolist() == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]


def test_label_config_validation():
    with pytest.raises(ValueError, match="chunk_size"):
        LabelConfig(chunk_size=0)
    with pytest.raises(ValueError, match="recent_chunks"):
        LabelConfig(recent_chunks=-1)
    assert list(LabelConfig(chunk_size=8, sink_chunks=1, recent_chunks=2).selectable(31)) == [1]
