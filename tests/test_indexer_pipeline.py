"""`lsa dump` then `lsa train` on a tiny random Llama; training never loads the backbone."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lsa.models
from lsa.__main__ import main
from lsa.indexer.data import ShardData
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS
from lsa.scorers import LightningIndexer
from lsa.testing import tiny_decoder

DUMP_ARGS = [
    "--target-layers", "0", "1",
    "--chunk-size", "16", "--lookahead", "16",
    "--stride", "8", "--min-position", "100",
    "--docs-per-shard", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    model = tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        vocab_size=101,
        num_hidden_layers=2,
        max_position_embeddings=1024,
    )
    model.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(8):
        n = int(torch.randint(300, 420, (1,), generator=gen))
        ids = torch.randint(0, 101, (n,), generator=gen).tolist()
        split = ("train", "train", "val", "test")[i % 4]
        lines.append({"id": f"d{i}", "input_ids": ids, "answer_position": n - 20, "split": split})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines[:5]))
    argv = ["dump", "--model", str(root / "model"), "--corpus", str(corpus), "--out"]
    assert main([*argv, str(root / "dump"), *DUMP_ARGS]) == 0
    return root, lines, argv


def test_dump_writes_shards_and_manifest(setup):
    root, _, _ = setup
    manifest = json.loads((root / "dump" / "manifest.json").read_text())
    s = manifest["settings"]
    assert s["target_layers"] == [0, 1] and s["labels"]["lookahead"] == 16
    assert s["labels"]["chunk_size"] == 16 and len(s["backbone_inv_freq"]) == 8
    # Held-out documents are dumped first (test, val, then train in corpus order).
    ids = [d["id"] for sh in manifest["shards"] for d in sh["docs"]]
    assert ids == ["d3", "d2", "d0", "d1", "d4"]
    t = load_file(str(root / "dump" / manifest["shards"][0]["file"]))
    n = t["position"].numel()
    assert t["hidden.0"].shape == (n, 64) and t["label_ptr"].shape == (n + 1,)
    assert t["features.1"].shape[1] == 3 * 2 * 16
    # CSR rows: existing, non-forced chunks only; targets normalised.
    for i in range(n):
        a, z = int(t["label_ptr"][i]), int(t["label_ptr"][i + 1])
        idx = t["label_index"][a:z]
        n_t = (int(t["position"][i]) + 1) // 16
        assert int(t["n_chunks"][i]) == n_t
        assert idx.tolist() == list(range(SINK_CHUNKS, n_t - RECENT_CHUNKS))
        assert abs(float(t["label_target"][a:z].sum()) - 1) < 1e-5
    assert int(t["is_answer"].sum()) == 2  # one answer position per document


def test_dump_resumes_without_redoing_documents(setup):
    root, lines, argv = setup
    before = json.loads((root / "dump" / "manifest.json").read_text())
    corpus = root / "corpus2.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = [*argv[:-2], str(corpus), "--out", str(root / "dump2")]
    # Copy the first dump, then extend it with the rest of the corpus.
    import shutil

    shutil.copytree(root / "dump", root / "dump2")
    # A manifest from before --label-reduce existed (no head_reduce) resumes as "mean".
    manifest = json.loads((root / "dump2" / "manifest.json").read_text())
    del manifest["settings"]["labels"]["head_reduce"]
    (root / "dump2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="other settings"):
        main([*argv, *DUMP_ARGS, "--label-reduce", "max"])
    assert main([*argv, *DUMP_ARGS]) == 0
    after = json.loads((root / "dump2" / "manifest.json").read_text())
    assert after["shards"][: len(before["shards"])] == before["shards"]
    assert after["settings"]["labels"]["head_reduce"] == "mean"
    ids = [d["id"] for sh in after["shards"] for d in sh["docs"]]
    assert ids == ["d3", "d2", "d0", "d1", "d4", "d7", "d6", "d5"]
    # Other settings on the same directory are refused rather than mixed.
    bad = [*DUMP_ARGS[:-2], "--docs-per-shard", "2"]
    bad[bad.index("--lookahead") + 1] = "32"
    with pytest.raises(ValueError, match="other settings"):
        main([*argv, *bad])


def test_train_reads_only_shards(setup, monkeypatch):
    root, _, _ = setup

    def refuse(*a, **k):
        raise AssertionError("the backbone must not be loaded during training")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(lsa.models, "load_model", refuse)
    out = root / "indexer"
    args = ["train", "--data", str(root / "dump"), "--out", str(out), "--epochs", "3",
            "--batch-size", "16", "--n-heads", "2", "--index-dim", "16", "--q-rank", "8",
            "--rope-dim", "8", "--quiet"]  # fmt: skip
    assert main([*args, "--loss", "both"]) == 0
    idx = LightningIndexer.from_pretrained(out, hidden_size=64, target_layers=(0, 1))
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["history"]) == 3 and 0 <= report["best_epoch"] < 3
    assert set(report["test"]) == {"indexer", "recency", "random", "snapkv"}
    assert report["label_stats"]["train"]["positions"] > 0
    # The saved indexer scores shard data exactly like the trained one did.
    data = ShardData(root / "dump", "test")
    b = data.batch(torch.arange(len(data)))
    keys = {la: idx.encode_features(la, b.features[la], b.chunk_start) for la in (0, 1)}
    logits = idx.score(b.hidden, b.position, keys)
    assert logits.shape == b.target.shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("extra", [[], ["--prev-chunk"]])
def test_training_reduces_the_loss(setup, extra):
    root, _, _ = setup
    out = root / f"indexer_kl{len(extra)}"
    args = ["train", "--data", str(root / "dump"), "--out", str(out), "--epochs", "6",
            "--batch-size", "8", "--n-heads", "2", "--index-dim", "16", "--q-rank", "8",
            "--rope-dim", "8", "--lr", "1e-2", "--quiet", "--loss", "kl", *extra]  # fmt: skip
    assert main(args) == 0
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    idx = LightningIndexer.from_pretrained(out)
    assert idx.config.prev_chunk == bool(extra)
    if extra:  # the predecessor weights were trained, not left at their zero start
        assert all(idx.layers[str(la)].gamma.abs().max() > 0 for la in idx.target_layers)


def test_answer_positions_repeat_in_each_epoch(setup):
    from lsa.indexer.train import epoch_order

    is_answer = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    order = epoch_order(is_answer, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=6)
    assert counts.tolist() == [1, 4, 1, 1, 4, 1]
    # repeat 1 is the plain permutation, so earlier recipes reproduce bit for bit
    plain = epoch_order(is_answer, 1, torch.Generator().manual_seed(7))
    assert torch.equal(plain, torch.randperm(6, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="answer-repeat"):
        epoch_order(is_answer, 0, torch.Generator())
    root, _, _ = setup
    args = ["train", "--data", str(root / "dump"), "--out", str(root / "indexer_rep"),
            "--epochs", "1", "--batch-size", "8", "--n-heads", "2", "--index-dim", "16",
            "--q-rank", "8", "--rope-dim", "8", "--quiet", "--answer-repeat", "5"]  # fmt: skip
    assert main(args) == 0


def test_shard_split_is_by_document(setup):
    root, _, _ = setup
    train, test = ShardData(root / "dump", "train"), ShardData(root / "dump", "test")
    assert set(train.doc_ids) == {"d0", "d1", "d4"} and test.doc_ids == ["d3"]
    assert len(train) + len(test) + len(ShardData(root / "dump", "val")) == len(
        ShardData(root / "dump")
    )
