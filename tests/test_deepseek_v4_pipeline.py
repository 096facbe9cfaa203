"""DeepSeek-V4 memory indexer, lookahead labels, dump and backbone-free training (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from transformers import DynamicCache

from lsa.cache.model import cache_kwarg
from lsa.deepseek_v4 import DeepseekV4LSACache, MemoryIndexer
from lsa.deepseek_v4.dump import DumpConfig, dump_corpus, dump_document, read_manifest
from lsa.deepseek_v4.labels import page_label_config, page_targets, record_document
from lsa.deepseek_v4.tiny import greedy, tiny_model
from lsa.deepseek_v4.train import captured_mass, load_samples, train_memory_indexer

CSA_LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def tokens(n, seed):
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def test_memory_indexer_from_model_reproduces_the_native_logits(model):
    """Seed form, initialised from the model: without fp8 it is the native lightning indexer."""
    scorer = model.model.layers[CSA_LAYER].self_attn.compressor.indexer.scorer
    seen = {}
    h = scorer.register_forward_hook(lambda m, a, out: seen.update(args=a, out=out))
    try:
        greedy(model, tokens(60, 1), DynamicCache(config=model.config), 3)
    finally:
        h.remove()
    _, keys, hidden = seen["args"]  # the last decode step: one query, all entries
    native = seen["out"][:, 0]  # [1, n]
    position = torch.tensor([61])  # 60 prompt tokens, then two decode forwards
    exact = MemoryIndexer.from_model(model, [CSA_LAYER], key_fp8=False)
    stored = exact.decode_keys(exact.encode_keys(keys))
    got = exact.layer_logits(CSA_LAYER, hidden[:, -1], position, stored)
    torch.testing.assert_close(got, native, rtol=1e-5, atol=1e-6)
    assert native.abs().max() > 0  # not a vacuous zero == zero
    fp8 = MemoryIndexer.from_model(model, [CSA_LAYER])
    codes = fp8.encode_keys(keys)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == model.config.index_head_dim + 4
    approx = fp8.layer_logits(CSA_LAYER, hidden[:, -1], position, fp8.decode_keys(codes))
    assert (approx - native).abs().max() <= 0.1 * native.abs().max()


def test_memory_indexer_save_and_load(model, tmp_path):
    a = MemoryIndexer.from_model(model, [CSA_LAYER], n_heads=4, q_rank=24)
    b = MemoryIndexer.from_model(model, [CSA_LAYER], n_heads=4, q_rank=24)
    a.save_pretrained(tmp_path)
    loaded = MemoryIndexer.from_pretrained(tmp_path)
    x, pos = torch.randn(2, 32), torch.tensor([40, 90])
    keys = torch.randn(2, 7, 16)
    torch.testing.assert_close(
        loaded.layer_logits(CSA_LAYER, x, pos, keys), a.layer_logits(CSA_LAYER, x, pos, keys)
    )
    # the copied block is the model's, the extra heads are random (so a and b differ there)
    assert torch.equal(a.retrievers["l1"].wq_a.weight[:16], b.retrievers["l1"].wq_a.weight[:16])
    assert not torch.equal(a.retrievers["l1"].wq_a.weight[16:], b.retrievers["l1"].wq_a.weight[16:])


def test_entry_mass_is_causal_and_a_probability(model):
    rec = record_document(model, tokens(96, 2), [CSA_LAYER])
    s, t = rec.entry_mass.shape
    assert (s, t) == (96, 24)
    u = torch.arange(s)[:, None]
    e = torch.arange(t)[None, :]
    future = e >= (u + 1) // rec.compress_rate  # entry e is written by token 4e + 3
    assert rec.entry_mass[future].abs().max() == 0
    assert rec.entry_mass[~future].max() > 0
    assert rec.entry_mass.sum(-1).max() <= 1 + 1e-5  # window and sink take the rest
    assert rec.index_k[CSA_LAYER].shape == (24, 16) and rec.hidden[CSA_LAYER].shape == (96, 32)


def test_page_targets_never_use_pages_formed_later(model):
    """Regression for the seed's labels, whose positives and negatives included chunks formed
    after step t: a target at t names only pages complete at t, and does not change when the
    tokens after its lookahead window change."""
    cfg = page_label_config(page_size=2, compress_rate=4, lookahead=8, sink_pages=1, recent_pages=1)
    doc = tokens(120, 3)
    positions = list(range(23, 120, 5))
    base = page_targets(record_document(model, doc, [CSA_LAYER]), positions, cfg)
    for i, t in enumerate(positions):
        row = base.index[base.ptr[i] : base.ptr[i + 1]]
        assert int(base.n_chunks[i]) == (t + 1) // 8
        assert int(row.max()) < int(base.n_chunks[i]) - 1  # the newest page is forced
    t = 47
    later = doc.clone()
    later[0, t + 8 :] = (later[0, t + 8 :] + 1) % 64  # change only what follows the window
    a = page_targets(record_document(model, doc, [CSA_LAYER]), [t], cfg)
    b = page_targets(record_document(model, later, [CSA_LAYER]), [t], cfg)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.target, b.target, rtol=1e-5, atol=1e-7)
    c = page_targets(record_document(model, later, [CSA_LAYER]), [t + 1], cfg)
    d = page_targets(record_document(model, doc, [CSA_LAYER]), [t + 1], cfg)
    assert not torch.allclose(c.target, d.target)  # the window's last token does matter


def test_dump_train_and_generate_end_to_end(model, tmp_path):
    """The whole pipeline on a tiny random model: dump (one backbone pass per document), train
    from the dump alone, load the trained indexer and generate with DeepseekV4LSACache."""
    cfg = DumpConfig(target_layers=(CSA_LAYER,), page_size=2, lookahead=8, recent_pages=1, stride=3)
    prompt = tokens(40, 4)
    generated = greedy(model, prompt, DynamicCache(config=model.config), 100)  # prompt + answer
    docs = [generated, tokens(130, 5)]
    dump_corpus(model, docs, tmp_path / "dump", cfg)
    manifest = read_manifest(tmp_path / "dump")
    assert [d["tokens"] for d in manifest["documents"]] == [140, 130]
    rec = torch.load(tmp_path / "dump" / "doc_00000.pt", weights_only=True)
    assert rec["keys"][CSA_LAYER].shape == (35, 20)  # every entry of prompt and generation
    assert rec["positions"][0] == 23

    indexer = MemoryIndexer.from_model(model, [CSA_LAYER])
    before = captured_mass(indexer, tmp_path / "dump", budget_pages=2)
    history = train_memory_indexer(indexer, tmp_path / "dump", epochs=30, batch_size=8, lr=1e-2)
    after = captured_mass(indexer, tmp_path / "dump", budget_pages=2)
    assert history[-1] < 0.9 * history[0], history
    assert after["indexer"] > before["indexer"], (before, after)
    indexer.save_pretrained(tmp_path / "indexer")

    loaded = MemoryIndexer.from_pretrained(tmp_path / "indexer")
    cache = DeepseekV4LSACache(
        model, loaded, budget=3, refresh_every=8, page_size=2, recent_pages=1
    )
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, **{cache_kwarg(model): cache})
    assert out.shape == (1, 56)
    assert cache.refreshes[-1]["resident"] < cache.refreshes[-1]["entries"]


def test_dump_and_training_refuse_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="input_ids"):
        record_document(model, torch.zeros(2, 10, dtype=torch.long), [CSA_LAYER])
    with pytest.raises(ValueError, match="CSA layers"):
        record_document(model, tokens(40, 0), [2])
    with pytest.raises(ValueError, match="page_size"):
        DumpConfig(target_layers=(CSA_LAYER,), page_size=0)
    with pytest.raises(ValueError, match="manifest"):
        load_samples(tmp_path)
    cfg = DumpConfig(target_layers=(CSA_LAYER,), page_size=2, lookahead=8, recent_pages=1)
    assert len(dump_document(model, tokens(40, 0), cfg)["positions"]) == 40 - 23
