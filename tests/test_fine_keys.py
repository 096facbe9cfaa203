"""Fine-grained index keys (``IndexerConfig.key_group``): one index key per g tokens, a chunk
scored by its best key; config checks, file formats, the fp8-packed storage, the cache's bytes."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lsa.indexer.codec import fake_quantize_fp8
from lsa.scorers import ChunkScorer, IndexerConfig, LightningIndexer
from lsa.scorers.lightning import CONFIG_NAME, KEY_STATS, group_features

CS, HKV, D = 16, 2, 16


def _config(**kw):
    base = dict(
        hidden_size=48,
        kv_heads=HKV,
        kv_head_dim=D,
        target_layers=(0, 1),
        chunk_size=CS,
        n_heads=4,
        index_dim=32,
        q_rank=24,
        rope_dim=16,
    )
    base.update(kw)
    return IndexerConfig(**base)


def _inv_freq():
    return 1.0 / 500.0 ** (torch.arange(0, D, 2).float() / D)


def _indexer(seed=0, **kw):
    torch.manual_seed(seed)
    idx = LightningIndexer(_config(**kw), _inv_freq())
    for p in idx.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return idx


def _inputs(n=5, b=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, HKV, n * CS, D, generator=gen)
    start = (torch.arange(n) * CS)[None].expand(b, n)
    hidden = {la: torch.randn(b, 48, generator=gen) for la in (0, 1)}
    position = torch.tensor([n * CS + 3, n * CS + 40])[:b]
    return keys, start, hidden, position


# --- config -----------------------------------------------------------------------------------


def test_key_group_is_checked_like_the_other_fields():
    assert _config().key_group is None and _config().keys_per_chunk == 1
    assert _config(key_group=4).keys_per_chunk == CS // 4
    for bad in (True, 4.0, "4"):
        with pytest.raises(TypeError, match="key_group"):
            _config(key_group=bad)
    for bad in (0, 3, CS, 2 * CS):  # not a divisor below the chunk size
        with pytest.raises(ValueError, match="key_group"):
            _config(key_group=bad)
    with pytest.raises(ValueError, match="prev_chunk needs the pooled tower"):
        _config(key_group=4, prev_chunk=True)
    with pytest.raises(ValueError, match="key_stats does not apply to key_group=1"):
        _config(key_group=1, key_stats=("mean",))
    _config(key_group=4, key_stats=("max",))  # a subset is fine for groups of several tokens
    assert _config(key_group=4, key_pool="logsumexp").key_pool == "logsumexp"
    with pytest.raises(TypeError, match="key_pool must be a str"):
        _config(key_group=4, key_pool=1)
    with pytest.raises(ValueError, match="key_pool must be 'max' or 'logsumexp'"):
        _config(key_group=4, key_pool="mean")
    with pytest.raises(ValueError, match="key_pool applies to fine-grained keys only"):
        _config(key_pool="logsumexp")


def test_key_bytes_per_token_count_every_index_key():
    # fp8: index_dim + 4 bytes a key; 2 layers, 16 tokens a chunk, 32 dims
    assert _config(key_fp8=True).key_bytes_per_token() == 2 * 1 * 36 / CS
    assert _config(key_fp8=True, key_group=4).key_bytes_per_token() == 2 * 4 * 36 / CS
    assert _config(key_group=1).key_bytes_per_token() == 2 * CS * 4 * 32 / CS
    assert _config(key_group=1).key_bytes_per_token(fp8=True) == 2 * 36


# --- the maths --------------------------------------------------------------------------------


@pytest.mark.parametrize("g, pool", [(1, "max"), (4, "max"), (4, "logsumexp")])
def test_a_chunk_scores_as_the_pool_of_its_groups(g, pool):
    """A fine indexer equals the pooled tower run with chunk_size = g (same weights; for g = 1
    the pooled projection reads the token key through its mean block only), pooled per chunk
    (the bias, added once per chunk, is taken out of the groups before pooling)."""
    fine = _indexer(key_group=g, key_pool=pool)
    pooled = LightningIndexer(_config(chunk_size=g), _inv_freq())
    state = fine.state_dict()
    if g == 1:  # mean = min = max = the key: put the weights on the mean block, zeros elsewhere
        for la in (0, 1):
            w = state[f"layers.{la}.wk.weight"]
            state[f"layers.{la}.wk.weight"] = torch.cat([w, 0 * w, 0 * w], dim=1)
    pooled.load_state_dict(state)
    keys, start, hidden, position = _inputs()
    n, m = start.shape[1], CS // g
    fine_keys = {la: fine.encode_chunks(la, keys, start) for la in (0, 1)}
    assert fine_keys[0].shape == (2, n, m * 32)
    gstart = (torch.arange(n * m) * g)[None].expand(2, n * m)
    group_keys = {la: pooled.encode_chunks(la, keys, gstart) for la in (0, 1)}
    for la in (0, 1):
        want = pooled.layer_logits(la, hidden[la], position, group_keys[la])
        bias = pooled.layers[str(la)].bias
        want = want.view(2, n, m) - bias
        want = (want.amax(-1) if pool == "max" else want.logsumexp(-1)) + bias
        got = fine.layer_logits(la, hidden[la], position, fine_keys[la])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fine.score(hidden, position, fine_keys).shape == (2, n)


def test_a_look_alike_group_moves_only_its_chunk():
    """Overwriting one group's tokens changes that chunk's logit only (keys are per group)."""
    idx = _indexer(key_group=4)
    keys, start, hidden, position = _inputs()
    before = idx.score(hidden, position, {la: idx.encode_chunks(la, keys, start) for la in (0, 1)})
    keys2 = keys.clone()
    keys2[:, :, 2 * CS + 4 : 2 * CS + 8] = 5.0  # group 1 of chunk 2
    after = idx.score(hidden, position, {la: idx.encode_chunks(la, keys2, start) for la in (0, 1)})
    changed = (before - after).abs() > 1e-6
    assert changed[:, 2].any() and not changed[:, [0, 1, 3, 4]].any()


def test_group_features_pool_each_group_and_keep_single_tokens():
    keys, start, _, _ = _inputs(n=2, b=1)
    one = group_features(keys, start, CS, 1, None)  # no de-rotation: the keys as given
    assert one.shape == (1, 2, CS, HKV * D)
    torch.testing.assert_close(one[0, 1, 3], keys[0, :, CS + 3].reshape(-1))
    four = group_features(keys, start, CS, 4, None)
    assert four.shape == (1, 2, CS // 4, 3 * HKV * D)
    grp = keys[0, :, CS + 8 : CS + 12]  # chunk 1, group 2: [H_kv, 4, D]
    want = torch.cat([grp.mean(1).reshape(-1), grp.amin(1).reshape(-1), grp.amax(1).reshape(-1)])
    torch.testing.assert_close(four[0, 1, 2], want)
    with pytest.raises(ValueError, match="group must divide"):
        group_features(keys, start, CS, 3, None)


def test_fp8_keys_are_stored_packed_and_score_as_trained():
    idx = _indexer(key_group=4, key_fp8=True)
    assert isinstance(idx, ChunkScorer)
    keys, start, hidden, position = _inputs()
    packed = {la: idx.encode_chunks(la, keys, start) for la in (0, 1)}
    assert packed[0].dtype == torch.uint8 and packed[0].shape == (2, 5, 4 * (32 + 4))
    trained = {}  # the training path: float keys through the straight-through fake quantizer
    for la in (0, 1):
        k = idx.encode_features(la, idx.features(keys, start), start)
        torch.testing.assert_close(k, fake_quantize_fp8(k.view(2, 5, 4, 32)).view(2, 5, -1))
        trained[la] = k
    torch.testing.assert_close(
        idx.score(hidden, position, packed), idx.score(hidden, position, trained)
    )
    with pytest.raises(ValueError, match="chunk_keys must be uint8 fp8-packed"):
        idx.score(hidden, position, {la: packed[la][..., :-1] for la in (0, 1)})


# --- files ------------------------------------------------------------------------------------


def test_fine_indexers_save_as_format_3_and_pooled_ones_stay_format_2(tmp_path):
    fine = _indexer(key_group=4, key_pool="logsumexp")
    fine.save_pretrained(tmp_path / "fine")
    meta = json.loads((tmp_path / "fine" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 3 and meta["config"]["key_group"] == 4
    back = LightningIndexer.from_pretrained(tmp_path / "fine", key_group=4, key_pool="logsumexp")
    keys, start, hidden, position = _inputs()
    ck = {la: fine.encode_chunks(la, keys, start) for la in (0, 1)}
    torch.testing.assert_close(back.score(hidden, position, ck), fine.score(hidden, position, ck))
    _indexer().save_pretrained(tmp_path / "pooled")
    meta = json.loads((tmp_path / "pooled" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and not {"key_group", "key_pool"} & set(meta["config"])
    assert LightningIndexer.from_pretrained(tmp_path / "pooled").config.key_group is None


def test_shipped_pooled_indexers_load_unchanged():
    from lsa.indexer import load_indexer, shipped_indexers

    for name in shipped_indexers():
        idx = load_indexer(name)
        assert idx.config.key_group is None and idx.config.key_stats == KEY_STATS


# --- in the cache -----------------------------------------------------------------------------


def test_the_cache_holds_and_counts_fine_fp8_keys():
    from lsa.cache import LSACache
    from lsa.cache.model import cache_kwarg
    from lsa.testing import tiny_decoder

    model = tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        vocab_size=97,
        num_hidden_layers=2,
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=HKV,
        head_dim=D,
        max_position_embeddings=512,
    )
    model.set_attn_implementation("lsa")
    cfg = _config(key_group=4, key_fp8=True)
    torch.manual_seed(0)
    idx = LightningIndexer(cfg, model.model.rotary_emb.inv_freq).eval()
    cache = LSACache(model, idx, budget=0.5, refresh_every=4)
    ids = torch.randint(3, 97, (1, 10 * CS + 5), generator=torch.Generator().manual_seed(1))
    model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=9, do_sample=False)
    assert len(cache.refreshes) >= 2
    stored = [cache.chunk_keys[la] for la in cfg.target_layers]
    assert all(t.dtype == torch.uint8 and t.shape[2] == 4 * (32 + 4) for t in stored)
    fp = cache.footprint()
    assert fp.chunk_key_bytes == sum(t.numel() for t in stored)
    assert fp.chunk_key_bytes >= 10 * CS * cfg.key_bytes_per_token()  # 10 whole chunks at least


# --- dump with token keys, then backbone-free training ----------------------------------------


@pytest.fixture(scope="module")
def token_dump(tmp_path_factory):
    from lsa.__main__ import main
    from lsa.testing import tiny_decoder

    root = tmp_path_factory.mktemp("fine")
    model = tiny_decoder(LlamaForCausalLM, LlamaConfig, vocab_size=101, num_hidden_layers=2)
    model.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(5):
        n = int(torch.randint(300, 400, (1,), generator=gen))
        ids = torch.randint(0, 101, (n,), generator=gen).tolist()
        split = ("train", "train", "val", "test", "train")[i]
        lines.append({"id": f"d{i}", "input_ids": ids, "answer_position": n - 20, "split": split})
    (root / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["dump", "--model", str(root / "model"), "--corpus", str(root / "corpus.jsonl"),
            "--target-layers", "0", "1", "--chunk-size", "16", "--lookahead", "16",
            "--stride", "8", "--min-position", "100", "--docs-per-shard", "2"]  # fmt: skip
    assert main([*argv, "--out", str(root / "dump"), "--token-keys"]) == 0
    assert main([*argv, "--out", str(root / "plain")]) == 0
    return root, model, lines


def test_token_keys_are_the_layers_cached_keys(token_dump):
    from safetensors.torch import load_file

    root, model, lines = token_dump
    manifest = json.loads((root / "dump" / "manifest.json").read_text())
    assert manifest["settings"]["token_keys"] is True
    shard = manifest["shards"][0]
    t = load_file(str(root / "dump" / shard["file"]))
    doc = next(x for x in lines if x["id"] == shard["docs"][0]["id"])
    ids = torch.tensor([doc["input_ids"]])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    c = int(t["doc_chunk_ptr"][1])  # the first document's whole chunks
    for layer in (0, 1):
        k = cache.layers[layer].keys[0, :, : c * 16]  # [H_kv, c*16, D]
        want = k.permute(1, 0, 2).reshape(c, 16, -1)
        assert t[f"tokens.{layer}"].dtype == torch.float16
        torch.testing.assert_close(t[f"tokens.{layer}"][:c].float(), want, rtol=2e-3, atol=2e-3)
    plain = json.loads((root / "plain" / "manifest.json").read_text())
    p = load_file(str(root / "plain" / plain["shards"][0]["file"]))
    assert "tokens.0" not in p and plain["settings"]["token_keys"] is False
    torch.testing.assert_close(p["features.0"], t["features.0"])  # the pooled input unchanged


def test_fine_towers_train_from_token_keys_only(token_dump):
    from lsa.__main__ import main
    from lsa.indexer.data import ShardData
    from lsa.indexer.train import fine_features

    root, _, _ = token_dump
    out = root / "fine4"
    args = ["train", "--data", str(root / "dump"), "--out", str(out), "--epochs", "5",
            "--batch-size", "8", "--n-heads", "2", "--index-dim", "16", "--q-rank", "8",
            "--rope-dim", "8", "--lr", "1e-2", "--quiet", "--key-group", "4"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert set(report["test"]) == {"indexer", "recency", "random", "snapkv"}
    idx = LightningIndexer.from_pretrained(out, key_group=4)
    # The shard path (group features from token keys) scores like the cache path (encode_chunks
    # on the keys themselves).
    data = ShardData(root / "dump", "test", token_keys=True)
    data.set_features(fine_features(idx, data))
    b = data.batch(torch.arange(len(data)))
    assert b.features[0].shape == (data.features[0].shape[0], 16 // 4, 3 * 2 * 16)  # the table
    rows = b.chunk_row.clamp_min(0)
    from_shards = idx.score(
        b.hidden,
        b.position,
        {la: idx.encode_features(la, b.features[la][rows], b.chunk_start) for la in (0, 1)},
    )
    n = b.chunk_start.shape[1]
    assert data.tokens == {}  # set_features dropped the token keys
    raw = ShardData(root / "dump", "test", token_keys=True)
    keys = {
        la: raw.tokens[la][:n].float().view(1, n * 16, 2, 16).permute(0, 2, 1, 3) for la in (0, 1)
    }
    start = b.chunk_start[:1]
    from_cache = idx.score(
        {la: b.hidden[la][-1:] for la in (0, 1)},
        b.position[-1:],
        {la: idx.encode_chunks(la, keys[la], start) for la in (0, 1)},
    )
    last = int(b.n_chunks[-1])
    torch.testing.assert_close(from_cache[0, :last], from_shards[-1, :last], rtol=1e-4, atol=1e-4)
    # A dump without token keys is refused with a pointer to --token-keys.
    bad = [*args[:2], str(root / "plain"), *args[3:4], str(root / "fine_bad"), *args[5:]]
    with pytest.raises(ValueError, match="--token-keys"):
        ShardData(root / "plain", "train", token_keys=True)
    assert main(bad) == 2


def test_training_runs_the_key_tower_once_per_distinct_chunk_with_the_same_keys(token_dump):
    from lsa.indexer.data import ShardData
    from lsa.indexer.train import distinct_chunk_keys, fine_features

    root, _, _ = token_dump
    idx = LightningIndexer.from_pretrained(root / "fine4")
    data = ShardData(root / "dump", "train", token_keys=True)
    data.set_features(fine_features(idx, data))
    b = data.batch(torch.arange(len(data)))
    assert torch.unique(b.chunk_row[b.exists]).numel() < int(b.exists.sum())  # shared chunks
    for la in (0, 1):
        every_slot = idx.encode_features(la, b.features[la][b.chunk_row], b.chunk_start)
        once = distinct_chunk_keys(idx, la, b)
        torch.testing.assert_close(once[b.exists], every_slot[b.exists], rtol=1e-5, atol=1e-5)
        assert not once[~b.exists].any()  # absent slots: zero keys


def test_train_refuses_fine_options_that_do_not_fit(token_dump, capsys):
    from lsa.__main__ import main

    root, _, _ = token_dump
    base = ["train", "--data", str(root / "dump"), "--out", str(root / "refused"), "--quiet"]
    assert main([*base, "--key-pool", "logsumexp"]) == 2
    assert "give --key-group" in capsys.readouterr().err
    assert main([*base, "--key-group", "3"]) == 2  # not a divisor of the chunk size (16)
    assert "key_group must be None" in capsys.readouterr().err
