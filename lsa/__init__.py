"""lsa: Lookahead Sparse Attention for long-context decoding.

Public API (tensors are [B, H, S, D], SDPA's layout)::

    lsa.dense_attention(q, k, v, *, causal=True, scale=None, enable_gqa=False)
    lsa.select_chunks(scores, *, budget=None, threshold=None, sink_chunks=1, recent_chunks=1)
    lsa.sparse_attention(q, k, v, *, keep=None, scores=None, budget=None, threshold=None,
                         chunk_size=64, sink_chunks=1, recent_chunks=1, causal=True,
                         scale=None, enable_gqa=False, backend="auto")
    lsa.reserve_attention(q, k_reserve, v_reserve, block_table, kv_len, *, chunk_size=64, ...)
    lsa.LSACache(model, scorer, *, budget=None, threshold=None, refresh_every=64, ...)
    lsa.generate(model, input_ids, *, cache, max_new_tokens, ...)   # graph-captured decode
    lsa.DeepseekV4LSACache(model, memory_indexer, *, budget=0.1, ...)  # two-level LSA, DSv4
"""

from lsa.attention import dense_attention, reserve_attention, sparse_attention
from lsa.cache import LSACache  # importing registers the "lsa" attention with transformers
from lsa.generation import generate
from lsa.reference.select import select_chunks

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: it loads transformers' deepseek_v4 modeling code.
    if name == "DeepseekV4LSACache":
        from lsa.deepseek_v4 import DeepseekV4LSACache

        return DeepseekV4LSACache
    raise AttributeError(f"module 'lsa' has no attribute {name!r}")


__all__ = [
    "DeepseekV4LSACache",
    "LSACache",
    "__version__",
    "dense_attention",
    "generate",
    "reserve_attention",
    "select_chunks",
    "sparse_attention",
]
