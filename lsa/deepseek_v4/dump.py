"""One backbone pass per document -> memory-indexer training files for DeepSeek-V4.

A dump directory holds ``manifest.json`` (settings, one entry per document) and one
``doc_XXXXX.pt`` per document with, at the sampled positions ``t``: the target layers' attention
inputs, and for the whole document each target layer's index-K codes (Hadamard-rotated fp8,
every entry of prompt and generation: the seed dumped prompt-only keys, ``seed_spec.md`` §8.3),
plus the CSR page targets of :func:`lsa.deepseek_v4.labels.page_targets`. Training reads only
these files (:mod:`lsa.deepseek_v4.train`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lsa._validation import check_int
from lsa.deepseek_v4.labels import page_label_config, page_targets, record_document
from lsa.deepseek_v4.memory_indexer import encode_index_keys

FORMAT = "lsa-deepseek-v4-dump"
VERSION = 1


@dataclass(frozen=True)
class DumpConfig:
    """How a dump is made (saved in the manifest)."""

    target_layers: tuple[int, ...]
    page_size: int = 64
    lookahead: int = 64
    sink_pages: int = 1
    recent_pages: int = 32
    #: every ``stride``-th position with at least one selectable page is a sample
    stride: int = 1
    key_fp8: bool = True

    def __post_init__(self):
        object.__setattr__(self, "target_layers", tuple(int(x) for x in self.target_layers))
        for name in ("page_size", "lookahead", "stride"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("sink_pages", "recent_pages"):
            check_int(name, getattr(self, name), minimum=0)


def sample_positions(length: int, first: int, stride: int) -> list[int]:
    return list(range(first, length, stride))


@torch.no_grad()
def dump_document(model, input_ids: torch.Tensor, config: DumpConfig) -> dict:
    """The training record of one document [1, S] (see the module docstring)."""
    rec = record_document(model, input_ids, config.target_layers)
    m = rec.compress_rate
    label_cfg = page_label_config(
        config.page_size, m, config.lookahead, config.sink_pages, config.recent_pages
    )
    # the first position with a selectable page: sink + recent + 1 complete pages
    first = (config.sink_pages + config.recent_pages + 1) * config.page_size * m - 1
    positions = sample_positions(input_ids.shape[1], first, config.stride)
    targets = page_targets(rec, positions, label_cfg)
    pos = targets.position
    return {
        "positions": pos,
        "hidden": {x: rec.hidden[x][pos].clone() for x in config.target_layers},
        "keys": {
            x: encode_index_keys(rec.index_k[x], config.key_fp8) for x in config.target_layers
        },
        "targets": {k: v for k, v in asdict(targets).items()},
        "compress_rate": m,
    }


def dump_corpus(model, documents, directory: str | Path, config: DumpConfig) -> Path:
    """Dump ``documents`` (a list of int [1, S] token tensors) into ``directory``."""
    if not isinstance(config, DumpConfig):
        raise TypeError(f"config must be a DumpConfig, got {type(config).__name__}")
    docs = list(documents)
    if not docs:
        raise ValueError("documents must hold at least one [1, S] token tensor, got none")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, ids in enumerate(tqdm(docs, desc="dump", unit="doc")):
        record = dump_document(model, ids, config)
        name = f"doc_{i:05d}.pt"
        torch.save(record, path / name)
        entries.append(
            {"file": name, "tokens": int(ids.shape[1]), "samples": len(record["positions"])}
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(config),
        "compress_rate": model.config.compress_rates["compressed_sparse_attention"],
        "hidden_size": model.config.hidden_size,
        "index_head_dim": model.config.index_head_dim,
        "documents": entries,
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"directory must hold a dump's manifest.json, got {str(directory)!r}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r})"
        )
    return manifest
