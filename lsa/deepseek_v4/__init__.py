"""Two-level LSA for transformers' DeepSeek-V4: a memory indexer confines the model's own
compressed sparse attention (CSA) to a resident set of compressed entries.

- :mod:`~lsa.deepseek_v4.memory_indexer`: the Level-1 scorer in the seed's form.
- :mod:`~lsa.deepseek_v4.cache`: ``DeepseekV4LSACache`` (host mirror, device reserve, refresh).
- :mod:`~lsa.deepseek_v4.labels`, :mod:`~lsa.deepseek_v4.dump`, :mod:`~lsa.deepseek_v4.train`:
  lookahead targets from the native attention, the one-pass dump, backbone-free training.
- :mod:`~lsa.deepseek_v4.tiny`: small random configurations for tests and ``--tiny`` benchmarks.
"""

from lsa.deepseek_v4.cache import DeepseekV4LSACache, LSACSALayer
from lsa.deepseek_v4.memory_indexer import MemoryIndexer, MemoryIndexerConfig

__all__ = ["DeepseekV4LSACache", "LSACSALayer", "MemoryIndexer", "MemoryIndexerConfig"]
