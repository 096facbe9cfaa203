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

import lsa.cache
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
        (
            dict(budget=0.1, host_device="nope"),
            ValueError,
            r"host_device must name a torch device such as 'cpu' or 'cuda:0', got 'nope'",
        ),
        (
            dict(budget=0.1, device=3.5),
            TypeError,
            r"device must be a torch.device, a str .* or a CUDA device index, got float 3\.5",
        ),
        (dict(budget=0.1, host_device=True), TypeError, "host_device must be a torch.device"),
        (
            dict(budget=0.1, device="meta"),
            ValueError,
            r"device must be a CPU or CUDA device, got 'meta' \(meta\)",
        ),
        (dict(budget=0.1, max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0, got -1"),
        (dict(budget=0.1, max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("name", "value"), [("device", "cuda"), ("host_device", "cuda:0"), ("device", 0)]
)
def test_cuda_without_cuda_is_named(model, name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r} needs CUDA, but .*is False"):
        LSACache(model, scorer(model), budget=0.1, **{name: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_missing_cuda_device_is_named(model):
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"device='cuda:{n}' does not exist: .* {n} CUDA"):
        LSACache(model, scorer(model), budget=0.1, device=f"cuda:{n}")


class Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.n += 1

    def remove(self):
        self.handle.remove()


def test_preflight_refuses_a_request_the_host_cannot_hold(model, monkeypatch):
    """The whole request (prompt + max_new_tokens, mirror and worst-case reserve) is checked
    against the memory available before the prefill stores anything; the cache stays usable."""
    from lsa.cache import resources

    ids, mask = prompt([40])
    cache = make_cache(model, budget=0.5, max_new_tokens=20)
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1000)
    forwards = Forwards(model)
    # chunk: 3 layers x K,V x 2 heads x 16 tokens x 16 dims x 4 bytes = 12 KiB; mirror: 60 tokens
    # = 4 chunks; reserve: 3 completed chunks at budget 0.5 -> 2 kept, + partial + ceil(8/16)
    message = (
        "LSACache needs 96.0 KiB of host memory for the host mirror (48.0 KiB) and the device "
        "reserve (48.0 KiB, worst case 4 chunks a row) (batch 1, 40 prompt + 20 new tokens, 3 "
        "layers) but 1000 B are available; lower the batch, the prompt length or max_new_tokens"
    )
    try:
        with pytest.raises(lsa.cache.CacheMemoryError) as info:
            generate(model, ids, mask, cache, 20)
    finally:
        forwards.remove()
    assert str(info.value) == message
    assert isinstance(info.value, MemoryError)
    assert forwards.n == 1  # the prefill, stopped at layer 0
    assert cache.mirror is None and cache.layers[0].reserve_k is None
    monkeypatch.undo()
    seq, _ = generate(model, ids, mask, cache, 20)  # nothing was left behind
    fresh_seq, _ = generate(model, ids, mask, make_cache(model, budget=0.5), 20)
    assert torch.equal(seq, fresh_seq)


def test_preflight_refuses_a_huge_max_new_tokens(model):
    ids, mask = prompt([40, 25])
    cache = make_cache(model, budget=0.5, max_new_tokens=10**12)
    with pytest.raises(
        lsa.cache.CacheMemoryError,
        match=r"LSACache needs [\d.]+ GiB of host memory for the host mirror \([\d.]+ GiB\) and "
        r"the device reserve .* \(batch 2, 40 prompt \+ 1000000000000 new tokens, 3 layers\) but "
        r"[\d.]+ .iB are available",
    ):
        generate(model, ids, mask, cache, 4)


def test_max_new_tokens_sizes_the_mirror_and_bounds_the_reserve(model):
    """Known max_new_tokens: one mirror segment for the whole request (it never grows), the
    reserve never past its worst case, the same tokens as without, and no decoding past it."""
    from lsa.cache.resources import worst_case_slots

    ids, mask = prompt([83, 47])
    kw = dict(budget=0.3, chunk_size=8, refresh_every=4)
    ref = make_cache(model, **kw)
    ref_seq, ref_logits = generate(model, ids, mask, ref, 60)
    cache = make_cache(model, max_new_tokens=60, **kw)
    seq, logits = generate(model, ids, mask, cache, 60)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert [s.shape[1] for s in cache.mirror.segments] == [-(-(83 + 60) // 8)]
    cap = worst_case_slots(
        tokens=83 + 60, chunk_size=8, budget=0.3, sink_chunks=1, recent_chunks=1, refresh_every=4
    )
    assert cache.n_slots == cap < ref.n_slots  # grown by 25% steps, but never past the cap
    assert [s for _, s, _ in cache.grows][:-1] == [s for _, s, _ in ref.grows][:-1]

    short = make_cache(model, max_new_tokens=10, **kw)
    with pytest.raises(ValueError, match=r"outgrew LSACache\(max_new_tokens=10\): decode step 11"):
        generate(model, ids, mask, short, 30)
