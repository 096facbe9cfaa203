"""Training the lightning memory indexer: lookahead labels, dump, training, metrics, weights.

The indexer itself is a chunk scorer and lives with the others (:mod:`lsa.scorers.lightning`).
``python -m lsa dump`` and ``python -m lsa train`` live in :mod:`lsa.indexer.dump` and
:mod:`lsa.indexer.train`; ``lsa/indexer/README.md`` says how the shipped weights were made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lsa.indexer.codec import decode_fp8, encode_fp8

if TYPE_CHECKING:
    from lsa.scorers.lightning import LightningIndexer

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_indexers() -> list[str]:
    """Names of the indexers that ship inside the package (e.g. ``["smollm2"]``)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "indexer_config.json").is_file())


def load_indexer(name_or_dir: str | Path, **expect) -> LightningIndexer:
    """A shipped indexer by name (``"smollm2"``, ``"qwen2.5-coder-0.5b"`` or its alias
    ``"qwen"``: the backbone names of :mod:`lsa.models`) or one saved in a directory.

    ``expect`` are config fields the caller requires (see
    :meth:`LightningIndexer.from_pretrained`), e.g. ``hidden_size=model.config.hidden_size``.
    """
    from lsa.models import ALIASES
    from lsa.scorers.lightning import LightningIndexer

    name = ALIASES.get(str(name_or_dir), str(name_or_dir))
    path = WEIGHTS_DIR / name
    if not (path / "indexer_config.json").is_file():
        path = Path(name_or_dir)
    if not path.is_dir():
        raise ValueError(
            f"no indexer named {name_or_dir!r}; shipped: {shipped_indexers()}, or give a directory"
        )
    return LightningIndexer.from_pretrained(path, **expect)


__all__ = ["decode_fp8", "encode_fp8", "load_indexer", "shipped_indexers"]
