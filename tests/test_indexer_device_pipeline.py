"""The one-call dump + train pipeline (the GPU command) on a tiny random Llama, on CPU."""

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lsa.indexer import dump, pipeline, train
from lsa.indexer.data import ShardData
from lsa.testing import tiny_decoder


def test_presets_parse_with_dump_and_train():
    # A typo in a preset would otherwise only show on the GPU machine.
    for name, preset in pipeline.PRESETS.items():
        p = argparse.ArgumentParser()
        dump.add_arguments(p)
        a = p.parse_args(["--model", name, "--corpus", "c", "--out", "o", *preset["dump"]])
        assert a.target_layers and a.chunk_size == 64 and a.lookahead == 64
        p = argparse.ArgumentParser()
        train.add_arguments(p)
        p.parse_args(["--data", "d", "--out", "o", *preset["train"]])


def test_qwen_preset_layers_fit_qwen():
    args = pipeline.PRESETS["qwen2.5-coder-0.5b"]["dump"]
    i = args.index("--target-layers") + 1
    layers = [int(x) for x in args[i : i + 3]]
    assert all(0 <= x < 24 for x in layers)


def test_split_extra_arguments():
    head, d, t = pipeline._split_extra(
        ["--out", "o", "--train-args", "--epochs", "2", "--dump-args", "--stride", "8"]
    )
    assert head == ["--out", "o"] and d == ["--stride", "8"] and t == ["--epochs", "2"]


@pytest.fixture(scope="module")
def run_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("devpipe")
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
    for i in range(12):
        bucket = (256, 512)[i % 2]
        ids = torch.randint(0, 101, (bucket,), generator=gen).tolist()
        split = ("train", "train", "val", "test")[(i // 2) % 4] if i < 8 else "train"
        lines.append(
            {
                "id": f"d{i}",
                "input_ids": ids,
                "answer_position": bucket - 10,
                "split": split,
                "bucket": bucket,
            }
        )
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = root / "out" / "tiny"
    argv = [
        "--model", str(root / "model"), "--corpus", str(corpus), "--work", str(root / "work"),
        "--out", str(out), "--dump-seconds", "600", "--train-seconds", "600",
        "--dump-args", "--target-layers", "0", "1", "--chunk-size", "16", "--lookahead", "16",
        "--stride", "8", "--min-position", "64", "--docs-per-shard", "3", "--device", "cpu",
        "--train-args", "--epochs", "2", "--batch-size", "16", "--n-heads", "2",
        "--index-dim", "16", "--q-rank", "8", "--rope-dim", "8", "--device", "cpu",
    ]  # fmt: skip
    assert pipeline.main(argv) == 0
    return root, out, lines


def test_pipeline_writes_weights_and_metrics_only(run_pipeline):
    _, out, _ = run_pipeline
    assert sorted(p.name for p in out.iterdir()) == [
        "dump_manifest.json",
        "indexer.safetensors",
        "indexer_config.json",
        "metrics.json",
        "train.log",
    ]
    manifest = json.loads((out / "dump_manifest.json").read_text())
    assert "backbone_inv_freq" not in manifest["settings"]
    assert manifest["settings"]["backbone_dtype"] == "float32"
    assert {d["bucket"] for s in manifest["shards"] for d in s["docs"]} == {256, 512}


def test_pipeline_reports_test_metrics_by_length(run_pipeline):
    _, out, _ = run_pipeline
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["test_by_length"]) == {"256", "512"}
    for per in report["test_by_length"].values():
        assert set(per["all"]) == {"indexer", "recency", "random", "snapkv"}
        assert set(per["all"]["indexer"]) == {"0.1", "0.2"}
        assert "answer" in per
    assert "test, 512-token documents" in (out / "train.log").read_text()


def test_pipeline_test_documents_are_held_out(run_pipeline):
    root, _, lines = run_pipeline
    splits = {
        s: set(ShardData(root / "work" / "dump", s).doc_ids) for s in ("train", "val", "test")
    }
    assert splits["test"] == {d["id"] for d in lines if d["split"] == "test"}
    assert not splits["test"] & splits["train"] and not splits["val"] & splits["train"]


def test_dump_stops_at_max_seconds_and_resumes(tmp_path, run_pipeline):
    root, _, _ = run_pipeline
    from lsa.__main__ import main

    args = ["dump", "--model", str(root / "model"), "--corpus", str(root / "corpus.jsonl"),
            "--out", str(tmp_path / "d"), "--target-layers", "0", "--chunk-size", "16",
            "--lookahead", "16", "--stride", "8", "--min-position", "64",
            "--docs-per-shard", "2"]  # fmt: skip
    assert main([*args, "--max-seconds", "0"]) == 0
    first = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [len(s["docs"]) for s in first["shards"]] == [2]  # stopped after one shard
    assert main(args) == 0
    docs = [
        d["id"]
        for s in json.loads((tmp_path / "d" / "manifest.json").read_text())["shards"]
        for d in s["docs"]
    ]
    assert len(docs) == 12 == len(set(docs))


def test_dump_only_stops_before_training_and_a_rerun_trains(tmp_path, run_pipeline):
    root, _, _ = run_pipeline
    out = tmp_path / "out"
    argv = [
        "--model", str(root / "model"), "--corpus", str(root / "corpus.jsonl"),
        "--work", str(tmp_path / "work"), "--out", str(out),
        "--dump-args", "--target-layers", "0", "--chunk-size", "16", "--lookahead", "16",
        "--stride", "32", "--min-position", "64", "--docs-per-shard", "6", "--device", "cpu",
        "--train-args", "--epochs", "1", "--batch-size", "16", "--n-heads", "2",
        "--index-dim", "16", "--q-rank", "8", "--rope-dim", "8", "--device", "cpu",
    ]  # fmt: skip
    assert pipeline.main([*argv[:8], "--dump-only", *argv[8:]]) == 0
    manifest = (tmp_path / "work" / "dump" / "manifest.json").read_text()
    assert not (out / "metrics.json").exists()
    assert pipeline.main(argv) == 0  # the finished dump is resumed (nothing new) and trained on
    assert (tmp_path / "work" / "dump" / "manifest.json").read_text() == manifest
    assert (out / "metrics.json").is_file() and (out / "indexer.safetensors").is_file()


def test_shipped_qwen_indexer_resolves_by_name_and_alias(run_pipeline, tmp_path, monkeypatch):
    import shutil

    import lsa.indexer

    _, out, _ = run_pipeline
    shutil.copytree(out, tmp_path / "qwen2.5-coder-0.5b")  # where the lead copies $OUT
    monkeypatch.setattr(lsa.indexer, "WEIGHTS_DIR", tmp_path)
    assert lsa.indexer.shipped_indexers() == ["qwen2.5-coder-0.5b"]
    a = lsa.indexer.load_indexer("qwen2.5-coder-0.5b", hidden_size=64)
    b = lsa.indexer.load_indexer("qwen", hidden_size=64)
    assert a.config == b.config and a.target_layers == (0, 1)


def test_batch_matches_the_csr_rows(run_pipeline):
    root, _, _ = run_pipeline
    data = ShardData(root / "work" / "dump", None)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:40]
    b = data.batch(idx)
    for r, i in enumerate(idx.tolist()):
        a, z = int(data.label_ptr[i]), int(data.label_ptr[i + 1])
        want_t, want_r = torch.zeros(b.target.shape[1]), torch.zeros(b.target.shape[1])
        want_t[data.label_index[a:z]] = data.label_target[a:z]
        want_r[data.label_index[a:z]] = data.label_reactive[a:z]
        assert torch.equal(b.target[r], want_t) and torch.equal(b.reactive[r], want_r)
        n = int(data.n_chunks[i])
        assert b.exists[r].sum() == n and not b.features[0][r, n:].any()
