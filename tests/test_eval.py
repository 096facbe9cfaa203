"""``lsa eval``: oracle scorer, runner, determinism, results schema, report files, kvpress merge."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lsa.eval import cli, report
from lsa.eval.kvpress_runner import prompt_digest
from lsa.eval.runner import Sample, batches, left_pad, trim_answer
from lsa.indexer.labels import LabelConfig, dense_row, lookahead_targets, teacher_forced_pass
from lsa.scorers import IndexerConfig, LightningIndexer
from lsa.scorers.oracle import OracleScorer, attention_mass
from lsa.testing import tiny_decoder

VOCAB = 96
CS = 16
TAU = 4


def tiny_llama() -> LlamaForCausalLM:
    return tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def decode(ids: list[int]) -> str:
    """Tokenizer stand-in: token t is the digit t % 10 (so answers can match references)."""
    return "".join(str(t % 10) for t in ids)


def tiny_samples() -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for task, n in (("niah_single_1", 3), ("qa_1", 2)):
        for i in range(n):
            length = 6 * CS + 5 * i + 3  # ragged: batches need left padding
            ids = tuple(torch.randint(3, VOCAB, (length,), generator=g).tolist())
            out.append(Sample(task, i, ids, (str(i),), 6))
    return out


def tiny_indexer(model) -> LightningIndexer:
    torch.manual_seed(5)
    cfg = model.config
    return LightningIndexer(
        IndexerConfig(
            hidden_size=cfg.hidden_size,
            kv_heads=cfg.num_key_value_heads,
            kv_head_dim=cfg.hidden_size // cfg.num_attention_heads,
            target_layers=(1,),
            chunk_size=CS,
            n_heads=2,
            index_dim=16,
            q_rank=8,
            rope_dim=8,
            derotate_keys=False,
        )
    ).eval()


def evaluate(
    model, samples, *, batch_size=2, methods=("dense", "lsa", "recency", "random", "oracle")
):
    return cli.evaluate(
        model,
        decode,
        samples,
        methods=list(methods),
        budgets=[0.3, 0.6],
        seed=11,
        indexer=tiny_indexer(model),
        batch_size=batch_size,
        chunk_size=CS,
        refresh_every=TAU,
        sink_chunks=1,
        recent_chunks=1,
    )


TIMING = ("decode_seconds",)


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# ---------------------------------------------------------------------------------------------
# OracleScorer


def random_mass(s: int, seed: int = 0) -> torch.Tensor:
    """A causal attention-mass matrix [S, ceil(S/CS)] whose rows sum to 1."""
    g = torch.Generator().manual_seed(seed)
    n = -(-s // CS)
    a = torch.rand(s, n, generator=g)
    for u in range(s):
        a[u, u // CS + 1 :] = 0  # a query never sees chunks that start after it
    return a / a.sum(1, keepdim=True)


def test_oracle_ranks_as_the_lookahead_labels_one_position_later():
    s = 10 * CS
    a = random_mass(s)
    oracle = OracleScorer(chunk_size=CS, lookahead=TAU)
    oracle.set_rows([a])
    cfg = LabelConfig(chunk_size=CS, lookahead=TAU, sink_chunks=1, recent_chunks=1)
    checked = 0
    for t in range(CS, s - TAU - 1):
        if (t + 2) // CS != (t + 1) // CS:
            continue  # one position later a chunk completes: the label rows differ in length
        n_t = (t + 1) // CS
        tg = lookahead_targets(a * 3, 3, [t + 1], cfg)
        ref = dense_row(tg.index, tg.target, n_t)
        got = oracle.window(0, t)
        sel = list(cfg.selectable(t + 1))
        # same ranking over the selectable chunks (labels normalise; the oracle does not)
        assert torch.allclose(got[sel] / got[sel].sum(), ref[sel], atol=1e-6)
        checked += 1
    assert checked > 50


def test_oracle_never_scores_future_chunks_and_rows_are_independent():
    a0, a1 = random_mass(8 * CS, 1), random_mass(5 * CS + 3, 2)
    oracle = OracleScorer(chunk_size=CS, lookahead=TAU)
    oracle.set_rows([a0, a1])
    n = 8
    keys = {0: torch.zeros(2, n, 1)}
    position = torch.tensor([8 * CS - 1 - TAU, 3 * CS + 2])
    logits = oracle.score({}, position, keys)
    assert logits.shape == (2, n)
    for b, pos in enumerate(position.tolist()):
        n_t = (pos + 1) // CS
        assert (logits[b, n_t:] == -1).all()  # not yet completed: below every real chunk
        assert (logits[b, :n_t] >= 0).all()
        assert torch.equal(logits[b, :n_t], oracle.window(b, pos))
    # the window past the end of the recorded sequence is empty, not an error
    assert (oracle.window(1, 5 * CS + 10) == 0).all()


def test_oracle_checks_rows():
    oracle = OracleScorer(chunk_size=CS, lookahead=TAU)
    with pytest.raises(ValueError, match="masses\\[0\\]"):
        oracle.set_rows([torch.zeros(2 * CS, 5)])
    oracle.set_rows([random_mass(2 * CS)])
    with pytest.raises(RuntimeError, match="set_rows"):
        oracle.score({}, torch.tensor([CS, CS]), {0: torch.zeros(2, 2, 1)})
    with pytest.raises(ValueError, match="lookahead"):
        OracleScorer(chunk_size=CS, lookahead=0)


def test_attention_mass_rows_sum_to_one_and_are_causal():
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 3 * CS + 5), generator=torch.Generator().manual_seed(0))
    a = attention_mass(model, ids, chunk_size=CS)
    assert a.shape == (3 * CS + 5, 4)
    assert torch.allclose(a.sum(1), torch.ones(a.shape[0]), atol=1e-5)
    for u in range(a.shape[0]):
        assert (a[u, u // CS + 1 :] == 0).all()
    assert model.config._attn_implementation == "sdpa"  # restored
    small = attention_mass(model, ids, chunk_size=CS, query_block=7)  # the GPU's bigger blocks
    assert torch.allclose(small, a, atol=1e-6)
    # the oracle's answer-only mass: the same rows from query_start on, zeros before
    late = attention_mass(model, ids, chunk_size=CS, query_block=7, query_start=2 * CS + 3)
    assert (late[: 2 * CS + 3] == 0).all()
    assert torch.allclose(late[2 * CS + 3 :], a[2 * CS + 3 :], atol=1e-6)


def test_attention_mass_head_max_is_the_strongest_head():
    """oracle_max's mass: per chunk the largest probability of any layer's head (the targets of
    ``lsa dump --label-reduce max``), so at least the mean over heads and not a distribution."""
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 3 * CS + 5), generator=torch.Generator().manual_seed(1))
    start = 2 * CS + 3
    top = attention_mass(
        model, ids, chunk_size=CS, query_block=7, query_start=start, head_reduce="max"
    )
    mean = attention_mass(model, ids, chunk_size=CS, query_block=7, query_start=start)
    assert (top[:start] == 0).all()
    assert (top[start:] >= mean[start:] - 1e-6).all()
    assert (top[start:].sum(1) > 1 + 1e-3).all()
    for u in range(start, top.shape[0]):
        assert (top[u, u // CS + 1 :] == 0).all()  # causal
    cfg = LabelConfig(chunk_size=CS, query_block=7, query_start=start, head_reduce="max")
    rec = teacher_forced_pass(model, ids, (0,), cfg)
    torch.testing.assert_close(top, rec.mass.float())
    with pytest.raises(ValueError, match="head_reduce"):
        attention_mass(model, ids, chunk_size=CS, head_reduce="median")


# ---------------------------------------------------------------------------------------------
# runner pieces


def test_batches_group_by_task_and_size():
    samples = tiny_samples()
    groups = list(batches(samples, 2))
    assert [[(s.task, s.index) for s in g] for g in groups] == [
        [("niah_single_1", 0), ("niah_single_1", 1)],
        [("niah_single_1", 2)],
        [("qa_1", 0), ("qa_1", 1)],
    ]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(samples, 0))


def test_left_pad_and_trim():
    ids, mask = left_pad([(5, 6, 7), (8,)], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert trim_answer([4, 2, 9, 2], {2}) == [4, 2]
    assert trim_answer([4, 5], {2}) == [4, 5]


# ---------------------------------------------------------------------------------------------
# evaluate(): schema, determinism, batching


@pytest.fixture(scope="module")
def run_twice():
    model = tiny_llama()
    samples = tiny_samples()
    return samples, evaluate(model, samples), evaluate(model, samples)


def test_same_seed_same_numbers(run_twice):
    _, first, second = run_twice
    assert strip_timing(first) == strip_timing(second)


def test_records_schema(run_twice):
    samples, records, _ = run_twice
    methods = {"dense": [None], "lsa": [0.3, 0.6], "recency": [0.3, 0.6], "random": [0.3, 0.6]}
    methods["oracle"] = [0.3, 0.6]
    assert len(records) == len(samples) * 9
    seen = {(r["method"], r["budget"], r["task"], r["sample"]) for r in records}
    for m, budgets in methods.items():
        for b in budgets:
            for s in samples:
                assert (m, b, s.task, s.index) in seen
    for r in records:
        assert isinstance(r["prediction"], str)
        assert r["references"] and 0.0 <= r["score"] <= 1.0
        kv = r["kv"]
        assert kv["device_bytes"] > 0 and kv["dense_bytes"] > 0
        assert r["dense_kv_bytes"] > 0
        if r["method"] == "dense":
            assert kv["device_bytes"] == kv["dense_bytes"] and kv["host_bytes"] == 0
        else:
            assert kv["host_bytes"] > 0  # the mirror holds the whole history
            assert 0 < kv["resident_chunks"] <= kv["total_chunks"]
        json.dumps(r)  # everything is JSON
    traced = [r for r in records if "resident_trace" in r]
    assert {r["method"] for r in traced} == {"lsa", "recency", "random", "oracle"}
    for r in traced:
        assert r["budget"] == 0.3
        ev = r["resident_trace"]
        assert ev[0]["step"] == 1 and all(set(e["keep"]) <= set(e["resident"]) for e in ev)


def test_the_prefill_answer_token_is_shared(run_twice):
    # every cache method prefills densely, so the first answer token equals dense's
    _, records, _ = run_twice
    first = {(r["task"], r["sample"]): r["new_ids"][0] for r in records if r["method"] == "dense"}
    for r in records:
        assert r["new_ids"][0] == first[(r["task"], r["sample"])]


def test_oracle_at_full_budget_reproduces_dense():
    # keeping every chunk, any scorer is exact: the oracles' answers are dense's, batched or not
    model = tiny_llama()
    samples = tiny_samples()[:3]
    recs = cli.evaluate(
        model,
        decode,
        samples,
        methods=["dense", "oracle", "oracle_max"],
        budgets=[1.0],
        seed=0,
        batch_size=3,
        chunk_size=CS,
        refresh_every=TAU,
    )
    dense = {r["sample"]: r["new_ids"] for r in recs if r["method"] == "dense"}
    assert sorted({r["method"] for r in recs}) == ["dense", "oracle", "oracle_max"]
    for r in recs:
        assert r["new_ids"] == dense[r["sample"]]


# ---------------------------------------------------------------------------------------------
# outputs and kvpress merge


def fake_kvpress(samples, method="snapkv", budget=0.3, digest=None):
    return {
        "records": [
            {
                "task": s.task,
                "sample": s.index,
                "method": method,
                "budget": budget,
                "digest": digest or prompt_digest(s.input_ids),
                "prediction": f" answer {s.index}\x01",
                "new_ids": [1, 2],
                "prompt_tokens": len(s.input_ids),
                "dense_kv_bytes": 100,
                "kv": {"device_bytes": 12, "host_bytes": 0, "dense_bytes": 100},
                "decode_steps": 1,
                "decode_tokens": 1,
                "decode_seconds": 0.1,
            }
            for s in samples
        ]
    }


def test_kvpress_merge_scores_with_ruler(tmp_path):
    samples = tiny_samples()
    path = tmp_path / "kv.json"
    path.write_text(json.dumps(fake_kvpress(samples)))
    recs = cli.read_kvpress([path], samples, ["snapkv"], [0.3])
    assert len(recs) == len(samples)
    for r, s in zip(recs, samples, strict=True):
        assert r["prediction"] == f"answer {s.index}"  # RULER's post-processing applied
        assert r["score"] == 1.0 and r["references"] == list(s.refs)
    with pytest.raises(cli.UsageError, match="lack"):
        cli.read_kvpress([path], samples, ["snapkv", "streamingllm"], [0.3])
    path.write_text(json.dumps(fake_kvpress(samples, digest="0" * 16)))
    with pytest.raises(cli.UsageError, match="another prompt"):
        cli.read_kvpress([path], samples, ["snapkv"], [0.3])


def test_outputs_written(run_twice, tmp_path):
    samples, records, _ = run_twice
    (tmp_path / "kv.json").write_text(json.dumps(fake_kvpress(samples)))
    merged = records + cli.read_kvpress([tmp_path / "kv.json"], samples, ["snapkv"], [0.3])
    paths = cli.write_outputs(tmp_path, merged, {"title": "tiny"}, plots=True)
    names = {p.name for p in paths}
    assert names == {
        "results.json",
        "results.md",
        "accuracy_per_task.png",
        "accuracy_vs_budget.png",
        "resident_set.png",
    }
    for p in paths:
        assert p.stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "| task | dense | lsa | recency | random | oracle | snapkv |" in md
    assert "mean, all tasks" in md and "resident KV / dense" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["title"] == "tiny" and len(data["records"]) == len(merged)
    s = report.summary(merged)
    assert set(s["budgets"]) == {"0.3", "0.6"}
    assert s["budgets"]["0.3"]["snapkv"]["device_fraction"] == pytest.approx(0.12)


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.jsonl.gz"])
def test_prompts_round_trip(tmp_path, name):
    samples = tiny_samples()
    cli.write_prompts(samples, tmp_path / name)
    assert cli.read_prompts(tmp_path / name, ["niah_single_1", "qa_1"]) == samples
    assert cli.read_prompts(tmp_path / name, ["qa_1"]) == samples[3:]
    with pytest.raises(cli.UsageError, match="no samples"):
        cli.read_prompts(tmp_path / name, ["vt"])


def test_report_merges_files_and_refuses_duplicates(run_twice, tmp_path):
    _, records, _ = run_twice
    a = [r for r in records if r["task"] == "qa_1"]
    b = [r for r in records if r["task"] != "qa_1"]
    merged, title = report.merge([{"title": "x", "records": a}, {"title": "y", "records": b}])
    assert len(merged) == len(records) and title == "x (and 1 more merged runs)"
    with pytest.raises(ValueError, match="more than one"):
        report.merge([{"records": a}, {"records": a}])
    for i, part in enumerate((a, b)):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps({"records": part}))
    files = [str(tmp_path / f"r{i}" / "results.json") for i in range(2)]
    assert report._main([*files, "--out", str(tmp_path / "m"), "--no-plots"]) == 0
    assert len(json.loads((tmp_path / "m" / "results.json").read_text())["records"]) == len(records)
    assert report.markdown(a + b) == (tmp_path / "m" / "results.md").read_text()


def test_report_means_need_every_task():
    def rec(method, budget, task, score):
        kv = {"device_bytes": 1, "dense_bytes": 10}
        return dict(method=method, budget=budget, task=task, sample=0, score=score, kv=kv,
                    decode_seconds=1.0, decode_tokens=1)  # fmt: skip

    tasks = {"a": (1.0, 0.5), "b": (1.0, 0.0), "c": (0.0, 1.0)}  # dense solves a and b
    records = [rec("dense", None, t, d) for t, (d, _) in tasks.items()]
    records += [rec("lsa", 0.1, t, x) for t, (_, x) in tasks.items()]
    records += [rec("snapkv", 0.1, "a", 1.0), rec("snapkv", 0.1, "c", 1.0)]  # b never ran
    records += [rec("recency", 0.1, "a", 1.0), rec("recency", 0.1, "b", 0.0)]  # c never ran
    rows = report.summary(records)["budgets"]["0.1"]
    assert rows["lsa"]["mean_all"] == pytest.approx(50.0)
    assert rows["lsa"]["mean_solved"] == pytest.approx(25.0)
    assert math.isnan(rows["snapkv"]["mean_all"]) and math.isnan(rows["snapkv"]["mean_solved"])
    assert rows["snapkv"]["per_task"] == {"a": 100.0, "c": 100.0}
    assert math.isnan(rows["recency"]["mean_all"])
    assert rows["recency"]["mean_solved"] == pytest.approx(50.0)  # it has every solved task
    md = report.markdown(records)
    assert "| **mean, all tasks** | 66.7 | 50.0 | - | - |" in md


def args_for(**over):
    ns = dict(
        tasks=["niah_single_1"],
        samples=1,
        length=1024,
        batch_size=1,
        budget=[0.1],
        methods=["oracle"],
        kvpress_results=[],
        prepare_only=False,
        prompts=None,
        device="cpu",
    )
    ns.update(over)
    return argparse.Namespace(**ns)


def test_check_args():
    args = args_for()
    assert cli.check_args(args) == ["dense", "oracle"]  # the oracle needs dense first
    assert cli.check_args(args_for(methods=["oracle_max"])) == ["dense", "oracle_max"]
    args = args_for(tasks=["all"])
    cli.check_args(args)
    assert len(args.tasks) == 13
    with pytest.raises(cli.UsageError, match="--tasks"):
        cli.check_args(args_for(tasks=["niah"]))
    with pytest.raises(cli.UsageError, match="--budget"):
        cli.check_args(args_for(budget=[1.5]))
    with pytest.raises(cli.UsageError, match="--kvpress-results"):
        cli.check_args(args_for(methods=["dense", "snapkv"]))
    with pytest.raises(cli.UsageError, match="names none"):
        cli.check_args(args_for(methods=["dense"], kvpress_results=["x.json"]))


def test_kvpress_runner_reads_what_eval_writes(tmp_path):
    from lsa.eval import kvpress_runner

    samples = tiny_samples()
    cli.write_prompts(samples, tmp_path / "p.jsonl.gz")
    rows = kvpress_runner.read_prompts(tmp_path / "p.jsonl.gz")
    assert [tuple(r["input_ids"]) for r in rows] == [s.input_ids for s in samples]
    assert [r["max_new_tokens"] for r in rows] == [s.max_new_tokens for s in samples]


def test_cache_kwarg_follows_the_transformers_version():
    from lsa.cache.model import cache_kwarg

    class Before:  # transformers <= 5.17
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class After:  # transformers >= 5.2x
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert cache_kwarg(Before()) == "past_key_values"
    assert cache_kwarg(After()) == "cache"
    import inspect

    assert cache_kwarg(tiny_llama()) in inspect.signature(tiny_llama().forward).parameters


def test_shared_prefill_gives_the_records_of_separate_prefills():
    """One prefill per batch, continued by every method, is exact: the same answers, scores and
    resident sets as each method prefilling on its own (ragged batch, GQA, all local methods)."""
    model = tiny_llama()
    samples = tiny_samples()
    kwargs = dict(
        methods=["dense", "lsa", "lsa_successor", "recency", "random", "oracle", "oracle_max"],
        budgets=[0.3],
        seed=11,
        indexer=tiny_indexer(model),
        batch_size=3,
        chunk_size=CS,
        refresh_every=TAU,
        recent_chunks=1,
    )
    shared = cli.evaluate(model, decode, samples, **kwargs)
    alone = cli.evaluate(model, decode, samples, share_prefill=False, **kwargs)
    key = lambda r: (r["method"], r["task"], r["sample"])  # noqa: E731
    assert len(shared) == len(alone) == 7 * len(samples)
    assert sorted(strip_timing(shared), key=key) == sorted(strip_timing(alone), key=key)
