"""LSACache: host mirror + device reserve KV cache for transformers ``generate()``."""

from lsa.cache.attention import ATTN_IMPLEMENTATION, lsa_attention_forward, register_lsa_attention
from lsa.cache.cache import LSACache
from lsa.cache.records import Footprint, RecallStats, RefreshRecord
from lsa.cache.resources import CacheMemoryError

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CacheMemoryError",
    "Footprint",
    "LSACache",
    "RecallStats",
    "RefreshRecord",
    "lsa_attention_forward",
    "register_lsa_attention",
]
