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
"""

from lsa.attention import dense_attention, reserve_attention, sparse_attention
from lsa.cache import LSACache  # importing registers the "lsa" attention with transformers
from lsa.generation import generate
from lsa.reference.select import select_chunks

__version__ = "0.1.0"

__all__ = [
    "LSACache",
    "__version__",
    "dense_attention",
    "generate",
    "reserve_attention",
    "select_chunks",
    "sparse_attention",
]
