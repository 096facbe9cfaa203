"""LSA for serving engines: the engine-independent core that a vLLM attention backend drives.

Nothing here imports vLLM. ``lsa/vllm/DESIGN.md`` maps this core onto vLLM 0.26.0's plugin,
attention-backend and KV-connector interfaces.

- :class:`DeviceBlockPool`: fixed device blocks (one block = one chunk, all layers), free list;
- :class:`RequestKV`: one request's host mirror, resident chunks and their blocks;
- :class:`LSARequestManager`: lifecycle (add, prefill, decode steps, refresh, preempt, resume,
  finish) and decode attention over the resident blocks;
- :func:`paged_decode_attention`: decode over the resident blocks of a vLLM-layout paged cache;
- ``python -m lsa.vllm.dense_baseline``: vLLM dense throughput, the baseline (needs vLLM).
"""

from lsa.vllm.block_pool import DeviceBlockPool, PoolExhausted
from lsa.vllm.manager import LSARequestManager, RefreshResult
from lsa.vllm.paged import paged_decode_attention
from lsa.vllm.request import RequestKV

__all__ = [
    "DeviceBlockPool",
    "LSARequestManager",
    "PoolExhausted",
    "RefreshResult",
    "RequestKV",
    "paged_decode_attention",
]
