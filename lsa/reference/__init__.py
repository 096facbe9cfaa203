"""Plain-PyTorch reference: readable, fp32, the oracle."""

from lsa.reference.dense import causal_mask, masked_attention, reference_dense_attention
from lsa.reference.select import budget_count, forced_chunks, select_chunks
from lsa.reference.sparse import reference_sparse_attention, token_mask

__all__ = [
    "budget_count",
    "causal_mask",
    "forced_chunks",
    "masked_attention",
    "reference_dense_attention",
    "reference_sparse_attention",
    "select_chunks",
    "token_mask",
]
