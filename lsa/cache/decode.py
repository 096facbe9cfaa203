"""The decode attention of an :class:`~lsa.cache.LSACache`: which kernel reads the reserve.

The cache names a backend once; this module owns the choice and every kernel behind it, so the
cache imports none:

- ``"compact"``: SDPA over the compacted prefix of the reserve (kept chunks, then the tail: no
  mask when every row sees as many tokens, a key-padding mask otherwise). It serves one query per
  row; a call with more (several queries need a causal mask over the tail) goes to
  :func:`lsa.reserve_attention`'s own choice and is counted in ``fallbacks``.
- ``"flex"``: FlexAttention over the block table with one plan shared by all layers, rebuilt only
  when the block table changes (it reads ``kv_len``, grown in place, when it runs).
- ``"reference"`` / ``"sdpa"`` / ``"triton"`` / ``"auto"``: :func:`lsa.reserve_attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lsa._validation import BACKENDS
from lsa.attention import reserve_attention
from lsa.compiled.compact import prefix_attention, prefix_mask, visible_attention
from lsa.compiled.flex import FlexPlan, flex_attend, flex_supports, reserve_block_mask, use_fold

if TYPE_CHECKING:
    from lsa.cache.cache import LSACache

#: what ``LSACache(backend=...)`` accepts: the compact path plus reserve_attention's backends
DECODE_BACKENDS = ("compact", *BACKENDS)


class DecodeAttention:
    """One cache's decode attention: ``name`` is the backend serving one-query calls."""

    def __init__(self, backend: str, device: torch.device) -> None:
        if not isinstance(backend, str) or backend not in DECODE_BACKENDS:
            raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
        self.name = (
            "compact"
            if backend == "compact" or (backend == "auto" and device.type == "cuda")
            else backend
        )
        self.reset()

    def reset(self) -> None:
        """Forget the per-request state (a new request)."""
        #: why a call left the compact path for reserve_attention (reason -> calls)
        self.fallbacks: dict[str, int] = {}
        self._plan: FlexPlan | None = None
        self._visible_mask: torch.Tensor | None = None

    def new_step(self) -> None:
        """A decode step begins: the compact path's key-padding mask is rebuilt on first use."""
        self._visible_mask = None

    def table_changed(self) -> None:
        """The block table was rewritten: a flex plan built from the old one is stale."""
        self._plan = None

    def __call__(
        self,
        cache: LSACache,
        query: torch.Tensor,
        k_reserve: torch.Tensor,
        v_reserve: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """[B, H_q, S_q, D] queries over the reserve -> [B, S_q, H_q, D]."""
        backend = self.name
        if backend == "compact":
            if query.shape[2] == 1:
                return self._compact(cache, query, k_reserve, v_reserve, scaling)
            reason = f"S_q={query.shape[2]} queries need a causal mask over the tail"
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
            backend = "auto"
        if backend == "flex":
            out = self._flex(cache, query, k_reserve, v_reserve, scaling)
        else:
            out = reserve_attention(
                query,
                k_reserve,
                v_reserve,
                cache.block_table,
                cache.kv_len,
                chunk_size=cache.chunk_size,
                causal=True,
                scale=scaling,
                enable_gqa=query.shape[1] != k_reserve.shape[1],
                backend=backend,
            )
        return out.transpose(1, 2).contiguous()

    def _compact(self, cache, query, k_reserve, v_reserve, scaling) -> torch.Tensor:
        """One query per row over the prefix of ``cache.visible[b]`` reserve tokens."""
        vis = cache.visible
        if len(set(vis)) == 1:
            n = vis[0]
            out, _ = visible_attention(
                query, k_reserve[:, :, :n], v_reserve[:, :, :n], scale=scaling
            )
        else:
            n = max(vis)
            if self._visible_mask is None:  # once per step, shared by the layers
                lengths = cache._to_device(torch.tensor(vis, dtype=torch.long))
                self._visible_mask = prefix_mask(lengths, n)
            out = prefix_attention(
                query, k_reserve[:, :, :n], v_reserve[:, :, :n], self._visible_mask, scale=scaling
            )
        return out.transpose(1, 2).contiguous()

    def _flex(self, cache, query, k_reserve, v_reserve, scaling) -> torch.Tensor:
        reason = flex_supports(query, cache.chunk_size)
        if reason is not None:
            raise ValueError(f"backend='flex' cannot serve this cache: {reason}")
        heads_q, heads_kv = query.shape[1], k_reserve.shape[1]
        fold = use_fold(heads_q, heads_kv, False, query.device)
        rows = (heads_q // heads_kv) * query.shape[2] if fold else query.shape[2]
        if self._plan is None or self._plan.rows != rows:
            self._plan = reserve_block_mask(
                cache.block_table,
                cache.kv_len,
                chunk_size=cache.chunk_size,
                heads_q=heads_q,
                heads_kv=heads_kv,
                len_q=query.shape[2],
            )
        return flex_attend(query, k_reserve, v_reserve, self._plan, scale=scaling)
