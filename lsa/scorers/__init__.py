"""Chunk scorers: everything that ranks the chunks of a KV history for :class:`lsa.LSACache`.

One contract (:class:`ChunkScorer`, ``contract.py``) and one file per scorer:

- ``lightning.py``: :class:`LightningIndexer`, the trained memory indexer (trained by
  :mod:`lsa.indexer`; shipped weights through :func:`lsa.indexer.load_indexer`);
- ``successor.py``: :class:`SuccessorScorer`, any scorer whose picks bring their next chunk;
- ``recency.py`` / ``random.py``: :class:`RecencyScorer` / :class:`RandomScorer`, baselines at
  equal budget;
- ``oracle.py``: :class:`OracleScorer`, the chunks the dense answer really attends to next (an
  upper bound for evaluation);
- ``mean_key.py``: :class:`MeanKeyScorer`, an untrained stand-in for tests and benchmarks;
- ``text.py``: :class:`TextScorer`, sentence embeddings of chunk texts vs the recent text (any
  backbone; reads token ids, see ``contract.py``); ``fusion.py``: :class:`FusionScorer`
  (``lsa+text``), the indexer's and the text scorer's rankings fused.
"""

from lsa.scorers.contract import ChunkScorer, TokenIds, check_scorer_settings, reads_token_ids
from lsa.scorers.fusion import FusionScorer
from lsa.scorers.lightning import IndexerConfig, LightningIndexer
from lsa.scorers.mean_key import MeanKeyScorer
from lsa.scorers.oracle import OracleScorer
from lsa.scorers.random import RandomScorer
from lsa.scorers.recency import RecencyScorer
from lsa.scorers.successor import SuccessorScorer
from lsa.scorers.text import TextScorer

__all__ = [
    "ChunkScorer",
    "FusionScorer",
    "IndexerConfig",
    "LightningIndexer",
    "MeanKeyScorer",
    "OracleScorer",
    "RandomScorer",
    "RecencyScorer",
    "SuccessorScorer",
    "TextScorer",
    "TokenIds",
    "check_scorer_settings",
    "reads_token_ids",
]
