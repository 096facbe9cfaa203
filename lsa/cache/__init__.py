"""LSACache: host mirror + device reserve KV cache for transformers ``generate()``."""

from lsa.cache.attention import ATTN_IMPLEMENTATION, lsa_attention_forward, register_lsa_attention
from lsa.cache.cache import LSACache
from lsa.cache.records import Footprint, RecallStats, RefreshRecord

__all__ = [
    "ATTN_IMPLEMENTATION",
    "Footprint",
    "LSACache",
    "RecallStats",
    "RefreshRecord",
    "lsa_attention_forward",
    "register_lsa_attention",
]
