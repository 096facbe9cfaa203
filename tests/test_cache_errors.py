"""LSACache refuses what it cannot do, with messages that name the problem."""

from __future__ import annotations

import pytest
import torch
from test_cache import TINY, generate, lsa_model, make_cache, prompt, tiny_llama
from transformers import (
    DynamicCache,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lsa.cache import LSACache
from lsa.scorers.mean_key import MeanKeyScorer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return lsa_model()


def scorer(model, layers=(1,), chunk_size=16):
    return MeanKeyScorer(model, layers, chunk_size)


def test_sliding_window_model_is_refused():
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**TINY, sliding_window=32))
    with pytest.raises(ValueError, match="sliding_window=32"):
        LSACache(mistral, scorer(mistral), budget=0.1)


def test_mixed_layer_types_are_named():
    torch.manual_seed(0)
    cfg = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=32, max_window_layers=1)
    qwen = Qwen2ForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"layer 1: 'sliding_attention'"):
        LSACache(qwen, scorer(qwen), budget=0.1)


def test_a_config_alone_is_not_enough(model):
    with pytest.raises(TypeError, match="needs the model"):
        LSACache(model.config, scorer(model), budget=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(), ValueError, "needs budget"),
        (dict(budget=0.0), ValueError, r"budget .* \(0, 1\]"),
        (dict(budget=1.5), ValueError, r"budget .* \(0, 1\]"),
        (dict(budget=0), ValueError, "budget as an int count must be >= 1"),
        (dict(budget="10%"), TypeError, "budget"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(budget=0.1, refresh_every=0), ValueError, "refresh_every must be >= 1"),
        (dict(budget=0.1, refresh_every=2.5), TypeError, "refresh_every"),
        (dict(budget=0.1, sink_chunks=-1), ValueError, "sink_chunks"),
        (dict(budget=0.1, chunk_size=32), ValueError, r"chunk_size \(32\) must equal"),
        (dict(budget=0.1, backend="cuda"), ValueError, "backend"),
        (dict(budget=0.1, recall="dma"), ValueError, "recall must be one of"),
        (dict(budget=0.1, resident_sets="per_layer"), NotImplementedError, "resident_sets"),
    ],
)
def test_bad_settings(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        LSACache(model, scorer(model), **kwargs)


def test_scorer_must_be_a_chunk_scorer(model):
    with pytest.raises(TypeError, match="ChunkScorer"):
        LSACache(model, object(), budget=0.1)


def test_scorer_layers_must_exist(model):
    with pytest.raises(ValueError, match=r"target_layers \(1, 7\) do not exist .* 3 decoder"):
        LSACache(model, scorer(model, layers=(1, 7)), budget=0.1)


def test_scorer_dims_must_match(model):
    s = scorer(model)
    s.hidden_size = 96
    with pytest.raises(ValueError, match=r"scorer.hidden_size \(96\) does not match .* \(64\)"):
        LSACache(model, s, budget=0.1)


def test_scorer_output_shapes_are_checked(model):
    s = scorer(model)
    s.encode_chunks = lambda layer, keys, start: keys.mean(1)  # [B, T, D]: not per chunk
    cache = LSACache(model, s, budget=0.5)
    ids, mask = prompt([40])
    with pytest.raises(ValueError, match=r"encode_chunks\(layer=1\) must return \[1, 2, key_dim\]"):
        generate(model, ids, mask, cache, 4)

    s = scorer(model)
    s.score = lambda hidden, position, keys: torch.zeros(1, 1)
    cache = LSACache(model, s, budget=0.5)
    with pytest.raises(ValueError, match=r"score must return logits \[B=1, n_chunks=2\]"):
        generate(model, ids, mask, cache, 4)

    s = scorer(model)
    s.score = lambda hidden, position, keys: torch.full((1, 2), float("nan"))
    cache = LSACache(model, s, budget=0.5)
    with pytest.raises(ValueError, match="non-finite logits"):
        generate(model, ids, mask, cache, 4)


def test_model_must_use_lsa_attention():
    m = tiny_llama()  # still sdpa
    cache = LSACache(m, scorer(m), budget=0.5)
    ids, mask = prompt([40])
    with pytest.raises(ValueError, match=r"set_attn_implementation\('lsa'\)"):
        generate(m, ids, mask, cache, 4)


def test_lsa_attention_refuses_other_caches(model):
    ids, mask = prompt([40])
    with pytest.raises(TypeError, match=r"decodes only with an lsa\.LSACache"):
        generate(model, ids, mask, DynamicCache(), 4)
    # without any past K/V it is exact dense attention
    model.set_attn_implementation("sdpa")
    ref = model(ids).logits
    model.set_attn_implementation("lsa")
    torch.testing.assert_close(model(ids, use_cache=False).logits, ref)


def test_reuse_without_reset_is_refused(model):
    cache = make_cache(model, budget=0.5)
    ids, mask = prompt([40])
    generate(model, ids, mask, cache, 4)
    with pytest.raises(ValueError, match=r"already holds a request .*reset\(\)"):
        generate(model, ids, mask, cache, 4)
    # a manual multi-token forward on a used cache is refused too
    with pytest.raises(ValueError, match=r"reset\(\)"):
        model(ids[:, :5], cache=cache)


def test_right_padding_is_refused(model):
    ids, mask = prompt([40, 30])
    mask = mask.flip(1)  # ones then zeros
    ids = ids.flip(1)
    cache = make_cache(model, budget=0.5)
    with pytest.raises(ValueError, match="left padding only: row 1"):
        generate(model, ids, mask, cache, 4)


def test_beam_search_is_refused(model):
    cache = make_cache(model, budget=0.5)
    ids, mask = prompt([40])
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, num_beams=2)


def test_lightning_indexer_for_another_model_is_refused(model):
    lightning = pytest.importorskip("lsa.scorers.lightning")
    config = lightning.IndexerConfig(
        hidden_size=64,
        kv_heads=3,
        kv_head_dim=16,
        target_layers=(1,),
        chunk_size=8,
        index_dim=16,
        rope_dim=8,
    )
    indexer = lightning.LightningIndexer(config, torch.zeros(8))
    with pytest.raises(ValueError, match=r"scorer\.config\.kv_heads \(3\) does not match"):
        LSACache(model, indexer, budget=0.1)


def test_zero_copy_recall_needs_cuda_or_the_interpreter(model):
    from lsa.cache.zero_copy import zero_copy_unavailable

    if zero_copy_unavailable(torch.device("cpu")) is None:
        pytest.skip("Triton's interpreter serves the zero-copy recall on CPU in this process")
    with pytest.raises(ValueError, match=r"recall='zero_copy' cannot run: .*CUDA"):
        LSACache(model, scorer(model), budget=0.1, device="cpu", recall="zero_copy")
