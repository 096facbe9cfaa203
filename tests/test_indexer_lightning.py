"""LightningIndexer: the ChunkScorer contract, the towers' maths, the fp8 codec, save/load."""

import json

import pytest
import torch

from lsa.indexer import decode_fp8, encode_fp8
from lsa.indexer.codec import fake_quantize_fp8
from lsa.scorers import ChunkScorer, IndexerConfig, LightningIndexer
from lsa.scorers.lightning import CONFIG_NAME, WEIGHTS_NAME, chunk_features, hadamard_matrix


def _config(**kw):
    base = dict(
        hidden_size=48,
        kv_heads=2,
        kv_head_dim=16,
        target_layers=(1, 3),
        chunk_size=8,
        n_heads=4,
        index_dim=32,
        q_rank=24,
        rope_dim=16,
    )
    base.update(kw)
    return IndexerConfig(**base)


def _inv_freq(d=16, theta=500.0):
    return 1.0 / theta ** (torch.arange(0, d, 2).float() / d)


def _indexer(seed=0, **kw):
    torch.manual_seed(seed)
    idx = LightningIndexer(_config(**kw), _inv_freq())
    for p in idx.parameters():  # non-trivial biases/norms so save/load is really checked
        torch.nn.init.normal_(p, std=0.3)
    return idx


def _rope(x, pos, inv_freq):
    """The backbone's RoPE (rotate-half), as Llama applies it: x [H, S, D], pos [S]."""
    ang = pos.float()[:, None] * inv_freq
    ang = torch.cat([ang, ang], -1)
    d = x.shape[-1]
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def test_is_a_chunk_scorer_with_the_protocol_shapes():
    idx = _indexer()
    assert isinstance(idx, ChunkScorer)
    assert idx.chunk_size == 8 and idx.target_layers == (1, 3)
    b, n = 3, 5
    keys = torch.randn(b, 2, n * 8, 16)
    start = (torch.arange(n) * 8).expand(b, n)
    ck = {layer: idx.encode_chunks(layer, keys, start) for layer in idx.target_layers}
    assert ck[1].shape == (b, n, 32)
    hidden = {layer: torch.randn(b, 48) for layer in idx.target_layers}
    logits = idx.score(hidden, torch.tensor([40, 41, 99]), ck)
    assert logits.shape == (b, n) and torch.isfinite(logits).all()


def _manual_q_w(idx, layer, x, pos):
    """The query tower by hand: low-rank -> RMSNorm -> per-head -> RoPE on the last rope_dim
    -> Hadamard; head weights scaled by d^-0.5 H^-0.5. Returns q [B, H, d], w [B, H]."""
    cfg, mod = idx.config, idx.layers[str(layer)]
    ql = mod.wq_a(x)
    ql = ql * torch.rsqrt(ql.pow(2).mean(-1, keepdim=True) + 1e-6) * mod.q_norm.weight
    q = mod.wq_b(ql).view(x.shape[0], cfg.n_heads, cfg.index_dim)
    half = cfg.rope_dim // 2
    inv = cfg.rope_theta ** (-torch.arange(half).float() / half)
    ang = pos.float()[:, None, None] * inv  # [B, 1, half]
    a, b_ = q[..., -cfg.rope_dim : -half], q[..., -half:]
    q = torch.cat(
        [q[..., : -cfg.rope_dim], a * ang.cos() - b_ * ang.sin(), a * ang.sin() + b_ * ang.cos()],
        -1,
    )
    w = mod.weights_proj(x) * cfg.index_dim**-0.5 * cfg.n_heads**-0.5
    return q @ hadamard_matrix(cfg.index_dim), w


def test_logit_is_weighted_relu_sum_over_heads():
    idx = _indexer()
    x, pos = torch.randn(2, 48), torch.tensor([17, 300])
    k = torch.randn(2, 6, 32)
    q, w = _manual_q_w(idx, 1, x, pos)
    want = (
        torch.stack(
            [
                sum(w[i, h] * torch.relu(q[i, h] @ k[i, j]) for h in range(4))
                for i in range(2)
                for j in range(6)
            ]
        ).view(2, 6)
        + idx.layers["1"].bias
    )
    torch.testing.assert_close(idx.layer_logits(1, x, pos, k), want, rtol=1e-5, atol=1e-5)


def test_prev_chunk_adds_the_predecessors_match_per_head():
    idx = _indexer(prev_chunk=True)
    gamma = idx.layers["1"].gamma
    x, pos, k = torch.randn(2, 48), torch.tensor([17, 300]), torch.randn(2, 6, 32)
    q, w = _manual_q_w(idx, 1, x, pos)

    def term(i, h, j):  # chunk 0 has no predecessor
        own = torch.relu(q[i, h] @ k[i, j])
        return own + (gamma[h] * torch.relu(q[i, h] @ k[i, j - 1]) if j > 0 else 0.0)

    want = torch.stack(
        [sum(w[i, h] * term(i, h, j) for h in range(4)) for i in range(2) for j in range(6)]
    ).view(2, 6)
    got = idx.layer_logits(1, x, pos, k)
    torch.testing.assert_close(got, want + idx.layers["1"].bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        gamma.zero_()  # a zero gamma is the plain indexer
    plain = LightningIndexer(_config(), _inv_freq())
    plain.load_state_dict({n: v for n, v in idx.state_dict().items() if "gamma" not in n})
    torch.testing.assert_close(idx.layer_logits(1, x, pos, k), plain.layer_logits(1, x, pos, k))


def test_hadamard_is_orthonormal():
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), rtol=0, atol=1e-6)
    assert set(torch.unique(h.abs() * 8).tolist()) == {1.0}


def test_key_tower_undoes_backbone_rope_before_pooling():
    torch.manual_seed(1)
    inv = _inv_freq()
    n, cs = 3, 8
    raw = torch.randn(2, n * cs, 16)  # pre-RoPE keys [H_kv, S, D]
    start = torch.tensor([[64, 72, 80]])  # chunks at positions 64.. (not 0)
    pos = torch.arange(64, 64 + n * cs)
    feats = chunk_features(_rope(raw, pos, inv)[None], start, cs, inv)
    want = raw.view(2, n, cs, 16).permute(1, 2, 0, 3).reshape(n, cs, 32)
    want = torch.cat([want.mean(1), want.amin(1), want.amax(1)], -1)
    torch.testing.assert_close(feats[0], want, rtol=1e-4, atol=1e-4)
    # Without de-rotation the statistics differ (the check above is not vacuous).
    assert not torch.allclose(chunk_features(_rope(raw, pos, inv)[None], start, cs, None)[0], want)


def test_scores_depend_only_on_distance_between_query_and_chunk():
    idx = _indexer()
    feats = torch.randn(1, 4, idx.config.feature_dim)
    x = torch.randn(1, 48)

    def logits(shift):
        start = torch.arange(4)[None] * 8 + shift
        k = idx.encode_features(3, feats, start)
        return idx.layer_logits(3, x, torch.tensor([100 + shift]), k)

    torch.testing.assert_close(logits(0), logits(512), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        logits(0),
        idx.layer_logits(
            3, x, torch.tensor([5000]), idx.encode_features(3, feats, torch.arange(4)[None] * 8)
        ),
        atol=1e-4,
    )


@pytest.mark.parametrize("ensemble", ["max", "mean"])
def test_ensemble_over_target_layers(ensemble):
    idx = _indexer(ensemble=ensemble)
    keys = torch.randn(1, 2, 32, 16)
    start = (torch.arange(4) * 8)[None]
    ck = {layer: idx.encode_chunks(layer, keys, start) for layer in (1, 3)}
    hidden = {layer: torch.randn(1, 48) for layer in (1, 3)}
    pos = torch.tensor([40])
    per = torch.stack([idx.layer_logits(layer, hidden[layer], pos, ck[layer]) for layer in (1, 3)])
    want = per.amax(0) if ensemble == "max" else per.mean(0)
    torch.testing.assert_close(idx.score(hidden, pos, ck), want)


def test_score_needs_every_target_layer():
    idx = _indexer()
    with pytest.raises(ValueError, match="missing"):
        idx.score({1: torch.randn(1, 48)}, torch.tensor([9]), {1: torch.randn(1, 2, 32)})


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="index_dim"):
        _config(index_dim=48)
    with pytest.raises(ValueError, match="ensemble"):
        _config(ensemble="or")
    with pytest.raises(ValueError, match="target_layers"):
        _config(target_layers=())
    for bad in ((), ("mean", "mean"), ("median",)):
        with pytest.raises(ValueError, match="key_stats"):
            _config(key_stats=bad)


def test_key_stats_pick_the_pooled_statistics_the_key_tower_reads():
    assert _config(key_stats=("max", "mean")).key_stats == ("mean", "max")  # canonical order
    idx = _indexer(key_stats=("mean",))
    block = 2 * 16  # kv_heads * kv_head_dim
    assert idx.config.feature_dim == 3 * block  # the features keep all three (a dump's layout)
    assert idx.layers["1"].wk.in_features == block
    start = (torch.arange(3) * 8).expand(2, 3)
    feats = torch.randn(2, 3, 3 * block)
    other = feats.clone()
    other[..., block:] = torch.randn(2, 3, 2 * block)  # new min and max, same mean
    got = idx.encode_features(1, feats, start)
    torch.testing.assert_close(idx.encode_features(1, other, start), got, rtol=0, atol=0)
    changed = feats.clone()
    changed[..., :block] += 1.0
    assert not torch.equal(idx.encode_features(1, changed, start), got)


# --- fp8 codec ---------------------------------------------------------------------------------


def test_codec_is_132_bytes_for_128_dims_and_round_trips():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 128) * torch.logspace(-3, 3, 7)[None, :, None]
    packed = encode_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 132)
    back = decode_fp8(packed)
    scale = x.abs().amax(-1, keepdim=True) / 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 in the normal range, and values below
    # the smallest normal (2^-6 in scaled units) are off by at most half a subnormal step.
    err = (back - x).abs()
    assert bool((err <= x.abs() * 2**-4 + scale * 2**-10).all()), float(err.max())
    # The stored scale is the exact fp32 scale; re-encoding decoded keys changes nothing.
    torch.testing.assert_close(packed[..., 128:].contiguous().view(torch.float32), scale)
    assert torch.equal(encode_fp8(back), packed)


def test_codec_is_exact_on_representable_values_and_floors_the_scale():
    vals = torch.tensor([448.0, -448.0, 1.0, 0.5, -0.001953125, 0.0] + [0.0] * 122)
    x = vals * 0.25  # scale = 448 * 0.25 / 448 = 0.25
    assert torch.equal(decode_fp8(encode_fp8(x)), x)
    zero = torch.zeros(3, 128)
    packed = encode_fp8(zero)
    assert torch.equal(decode_fp8(packed), zero)
    assert torch.allclose(
        packed[..., 128:].contiguous().view(torch.float32), torch.tensor(1e-4 / 448)
    )


def test_codec_rejects_bad_input():
    with pytest.raises(TypeError):
        encode_fp8(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError):
        decode_fp8(torch.zeros(4, 132))
    with pytest.raises(ValueError):
        decode_fp8(torch.zeros(4, 3, dtype=torch.uint8))


def test_fp8_keys_are_representable_and_pass_gradients():
    idx = _indexer(key_fp8=True, index_dim=32)
    feats = torch.randn(1, 4, idx.config.feature_dim)
    k = idx.encode_features(1, feats, torch.arange(4)[None] * 8)
    torch.testing.assert_close(fake_quantize_fp8(k), k)
    k.sum().backward()
    assert idx.layers["1"].wk.weight.grad.abs().sum() > 0


# --- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"prev_chunk": True}, {"key_stats": ("min", "max")}],
    ids=["base", "prev", "minmax"],
)
def test_save_load_round_trip(tmp_path, extra):
    idx = _indexer(key_fp8=True, **extra)
    idx.save_pretrained(tmp_path)
    back = LightningIndexer.from_pretrained(tmp_path, hidden_size=48, target_layers=[1, 3])
    assert back.config == idx.config
    keys = torch.randn(2, 2, 24, 16)
    start = (torch.arange(3) * 8).expand(2, 3)
    hidden = {layer: torch.randn(2, 48) for layer in (1, 3)}
    pos = torch.tensor([30, 31])

    def run(m):
        return m.score(hidden, pos, {la: m.encode_chunks(la, keys, start) for la in (1, 3)})

    torch.testing.assert_close(run(back), run(idx), rtol=0, atol=0)
    torch.testing.assert_close(back.backbone_inv_freq, _inv_freq())


def test_load_refuses_config_mismatch_with_expectation(tmp_path):
    _indexer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=48, expected 576"):
        LightningIndexer.from_pretrained(tmp_path, hidden_size=576)
    with pytest.raises(ValueError, match="target_layers"):
        LightningIndexer.from_pretrained(tmp_path, target_layers=(1, 2))


def test_load_refuses_weights_that_do_not_match_the_config(tmp_path):
    _indexer().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["q_rank"] = 32
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layers\.1\.q_norm\.weight.*shape \(24,\).*\(32,\)"):
        LightningIndexer.from_pretrained(tmp_path)
    meta["config"]["q_rank"] = 24
    meta["config"]["target_layers"] = [1, 3, 5]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing.*layers\.5"):
        LightningIndexer.from_pretrained(tmp_path)


def test_load_refuses_broken_files(tmp_path):
    _indexer().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    bad = dict(meta, config=dict(meta["config"], colour="blue"))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown fields"):
        LightningIndexer.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="format_version"):
        LightningIndexer.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        LightningIndexer.from_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="must hold"):
        LightningIndexer.from_pretrained(tmp_path)


def test_shipped_indexers_load_and_score():
    from lsa.indexer import load_indexer, shipped_indexers

    names = shipped_indexers()
    if not names:
        pytest.skip("no indexer weights shipped in lsa/indexer/weights/")
    for name in names:
        idx = load_indexer(name)
        cfg = idx.config
        assert isinstance(idx, ChunkScorer) and idx.chunk_size == 64
        n = 5
        keys = torch.randn(1, cfg.kv_heads, n * 64, cfg.kv_head_dim)
        start = (torch.arange(n) * 64)[None]
        ck = {la: idx.encode_chunks(la, keys, start) for la in idx.target_layers}
        hidden = {la: torch.randn(1, cfg.hidden_size) for la in idx.target_layers}
        assert torch.isfinite(idx.score(hidden, torch.tensor([n * 64 + 3]), ck)).all()
    with pytest.raises(ValueError, match="no indexer named"):
        load_indexer("no-such-model")
