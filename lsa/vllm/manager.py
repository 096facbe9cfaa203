"""The engine-independent LSA serving core: request lifecycle, refresh and decode attention.

What an attention backend inside a serving engine (vLLM, see ``lsa/vllm/DESIGN.md``) delegates to:

- ``add`` a request; ``write`` its prefill K/V per layer (to its host mirror), ``end_prefill``
  (the first refresh places its resident set);
- per decode step and layer: ``write`` the new token's K/V, then ``attend`` over the resident
  blocks; ``end_step`` once every layer wrote, which says when a refresh is due (every
  ``refresh_every`` steps); ``refresh`` with the indexer's inputs captured from the layers;
- ``preempt`` (frees the request's device blocks, keeps its mirror), ``resume`` (recalls its
  resident set from the mirror), ``finish`` (frees everything).

A refresh scores the completed chunks with the shipped scorer contract
(:class:`lsa.scorers.ChunkScorer`), keeps the top ones with :func:`lsa.select_chunks` (sink and
recent chunks forced), keeps the partial chunk, evicts the blocks of chunks that left and recalls
the chunks that entered, all layers of a chunk in one copy from the mirror.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsa._validation import check_budget, check_int
from lsa.attention import reserve_attention
from lsa.cache.mirror import HostMirror
from lsa.reference.select import select_chunks
from lsa.scorers.contract import ChunkScorer
from lsa.vllm.block_pool import DeviceBlockPool, PoolExhausted
from lsa.vllm.request import RequestKV


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh of one request did (logical chunk indices)."""

    kv_len: int
    resident: tuple[int, ...]
    recalled: tuple[int, ...]
    evicted: tuple[int, ...]


class LSARequestManager:
    """Per-request mirrors and resident sets over one shared :class:`DeviceBlockPool`.

    Args:
        pool: the device blocks; ``pool.block_size`` is the chunk size.
        scorer: ranks chunks at each refresh; its ``chunk_size`` must equal the block size.
        budget / threshold: as in :func:`lsa.select_chunks`, over the completed chunks.
        sink_chunks, recent_chunks: always kept.
        refresh_every: τ, decode steps between refreshes.
        backend: passed to :func:`lsa.reserve_attention` ("auto": the Triton decode kernel on
            CUDA).
    """

    def __init__(
        self,
        pool: DeviceBlockPool,
        scorer: ChunkScorer,
        *,
        budget: int | float | None = None,
        threshold: float | None = None,
        sink_chunks: int = 1,
        recent_chunks: int = 1,
        refresh_every: int = 64,
        backend: str = "auto",
    ) -> None:
        if not isinstance(pool, DeviceBlockPool):
            raise TypeError(f"pool must be a DeviceBlockPool, got {type(pool).__name__}")
        if not isinstance(scorer, ChunkScorer):
            raise TypeError(
                f"scorer must follow lsa.scorers.ChunkScorer, got {type(scorer).__name__}"
            )
        if scorer.chunk_size != pool.block_size:
            raise ValueError(
                f"scorer.chunk_size ({scorer.chunk_size}) must equal the pool's block_size "
                f"({pool.block_size}): one vLLM block is one LSA chunk"
            )
        check_budget(budget, threshold)
        self.pool = pool
        self.scorer = scorer
        self.budget, self.threshold = budget, threshold
        self.sink_chunks = check_int("sink_chunks", sink_chunks, minimum=0)
        self.recent_chunks = check_int("recent_chunks", recent_chunks, minimum=0)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.backend = backend
        self.requests: dict[str, RequestKV] = {}

    # lifecycle -----------------------------------------------------------------------------

    def add(self, req_id: str) -> None:
        if not isinstance(req_id, str):
            raise TypeError(f"req_id must be a str, got {type(req_id).__name__}")
        if req_id in self.requests:
            raise ValueError(f"request {req_id!r} is already active")
        p = self.pool
        mirror = HostMirror(
            1,
            p.layers,
            p.heads_kv,
            p.block_size,
            p.head_dim,
            p.blocks.dtype,
            device=torch.device("cpu"),
            pin=p.blocks.is_cuda,
        )
        self.requests[req_id] = RequestKV(req_id, mirror, [0] * p.layers)

    def _get(self, req_id: str, *, running: bool = True) -> RequestKV:
        if req_id not in self.requests:
            raise KeyError(f"no active request {req_id!r}")
        req = self.requests[req_id]
        if running and req.preempted:
            raise ValueError(f"request {req_id!r} is preempted; resume it first")
        return req

    def finish(self, req_id: str) -> None:
        """Free the request's blocks and drop its mirror."""
        req = self._get(req_id, running=False)
        req.evict(list(req.blocks), self.pool)
        del self.requests[req_id]

    def preempt(self, req_id: str) -> None:
        """Free the request's device blocks; its mirror and resident set stay for ``resume``."""
        req = self._get(req_id)
        req.evict(list(req.blocks), self.pool)
        req.preempted = True

    def resume(self, req_id: str) -> None:
        """Recall the resident set the request had when preempted (raises
        :class:`PoolExhausted`, leaving it preempted, when the pool is short)."""
        req = self._get(req_id, running=False)
        if not req.preempted:
            raise ValueError(f"request {req_id!r} is not preempted")
        req.recall(sorted(req.resident), self.pool)
        req.preempted = False

    # tokens --------------------------------------------------------------------------------

    def write(self, req_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k``/``v`` [H_kv, n, D] of ``layer``. Before ``end_prefill`` they go to the
        mirror only; after it, to the mirror and the resident blocks."""
        req = self._get(req_id)
        p = self.pool
        check_int("layer", layer, minimum=0)
        if layer >= p.layers:
            raise ValueError(f"layer must be < {p.layers}, got {layer}")
        want = (p.heads_kv, p.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or (t.shape[0], t.shape[2]) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be [H_kv={want[0]}, n, D={want[1]}], got {got}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {v.shape}")
        req.write(layer, k, v, self.pool if req.placed else None)

    def end_prefill(self, req_id: str, hidden: dict[int, torch.Tensor]) -> RefreshResult:
        """The prompt is in the mirror: place the first resident set."""
        req = self._get(req_id)
        if req.placed:
            raise ValueError(f"request {req_id!r} already ended its prefill")
        if req.kv_len() == 0:
            raise ValueError(f"request {req_id!r} has no prompt tokens")
        result = self.refresh(req_id, hidden)
        req.placed = True
        return result

    def end_step(self, req_id: str) -> bool:
        """One decode step done in every layer; True when a refresh is due now."""
        req = self._get(req_id)
        if not req.placed:
            raise ValueError(f"request {req_id!r} is still in prefill; call end_prefill first")
        req.kv_len()  # every layer must have written this step
        req.decode_steps += 1
        return req.decode_steps % self.refresh_every == 0

    # refresh -------------------------------------------------------------------------------

    def _chunk_keys(self, req: RequestKV, n_done: int) -> dict[int, torch.Tensor]:
        """Chunk keys of the completed chunks per target layer, encoding only the new ones."""
        cs = req.chunk_size
        for layer in self.scorer.target_layers:
            have = req.chunk_keys.get(layer)
            n_have = 0 if have is None else have.shape[1]
            if n_have < n_done:
                keys, _ = req.mirror.tokens(0, layer, n_done * cs)
                keys = keys[None, :, n_have * cs :].to(self.pool.blocks.device)
                start = (torch.arange(n_have, n_done) * cs)[None].to(keys.device)
                new = self.scorer.encode_chunks(layer, keys, start)
                req.chunk_keys[layer] = new if have is None else torch.cat((have, new), dim=1)
        return {layer: req.chunk_keys[layer] for layer in self.scorer.target_layers}

    def refresh(self, req_id: str, hidden: dict[int, torch.Tensor]) -> RefreshResult:
        """Re-select the resident set from the scorer's logits for the current token.

        Args:
            hidden: per target layer of the scorer, the current token's attention input (the
                hidden state after the layer's input norm), [hidden_size].
        """
        req = self._get(req_id)
        kv_len = req.kv_len()
        missing = set(self.scorer.target_layers) - set(hidden)
        if missing:
            raise ValueError(f"hidden needs the scorer's target layers {sorted(missing)}")
        cs = req.chunk_size
        n_done = kv_len // cs
        keep: set[int] = set()
        if n_done:
            keys = self._chunk_keys(req, n_done)
            device = self.pool.blocks.device
            logits = self.scorer.score(
                {layer: hidden[layer].reshape(1, -1).to(device) for layer in hidden},
                torch.tensor([kv_len - 1], device=device),
                keys,
            )
            mask = select_chunks(
                logits.reshape(1, 1, n_done).float(),
                budget=self.budget,
                threshold=self.threshold,
                sink_chunks=self.sink_chunks,
                recent_chunks=self.recent_chunks,
            )
            keep = {int(c) for c in mask[0, 0].nonzero().flatten().tolist()}
        if kv_len % cs:
            keep.add(n_done)  # the partial chunk: decode keeps writing into it
        evicted = sorted(set(req.blocks) - keep)
        recalled = sorted(keep - set(req.blocks))
        short = len(recalled) - len(evicted) - self.pool.num_free
        if short > 0:  # checked before anything moves, so a failed refresh changes nothing
            raise PoolExhausted(
                f"refreshing request {req_id!r} needs {short} more free blocks than the pool has"
            )
        req.evict(evicted, self.pool)
        req.recall(recalled, self.pool)
        req.resident = keep
        return RefreshResult(kv_len, tuple(sorted(keep)), tuple(recalled), tuple(evicted))

    # decode attention ----------------------------------------------------------------------

    def block_tables(self, req_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decode kernel reads: (pool blocks, logical chunks), int32 [B, n_max] each,
        resident chunks in chunk order, -1 past a request's resident count."""
        tables = [self._get(r).table() for r in req_ids]
        n_max = max((len(c) for c, _ in tables), default=0)
        logical = torch.full((len(req_ids), n_max), -1, dtype=torch.int32)
        physical = torch.full((len(req_ids), n_max), -1, dtype=torch.int32)
        for i, (chunks, blocks) in enumerate(tables):
            logical[i, : len(chunks)] = torch.tensor(chunks, dtype=torch.int32)
            physical[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return physical, logical

    def attend(
        self, req_ids: list[str], layer: int, q: torch.Tensor, *, scale: float | None = None
    ) -> torch.Tensor:
        """Decode attention of ``layer`` over each request's resident blocks.

        Args:
            q: [B, H_q, S_q, D], row ``i`` for ``req_ids[i]``; its last query sits at the last
                token written to ``layer``.

        Returns:
            [B, H_q, S_q, D], equal to sparse attention over the full history with keep = the
            resident chunks.
        """
        if not req_ids:
            raise ValueError("req_ids must name at least one request")
        if q.dim() != 4 or q.shape[0] != len(req_ids):
            raise ValueError(f"q must be [B={len(req_ids)}, H_q, S_q, D], got {tuple(q.shape)}")
        physical, logical = self.block_tables(req_ids)
        unplaced = [r for r in req_ids if not self.requests[r].placed]
        if unplaced:
            raise ValueError(f"requests {unplaced} are still in prefill (prefill attends densely)")
        kv_len = torch.tensor([self.requests[r].layer_len[layer] for r in req_ids])
        p = self.pool
        # Gather the resident blocks into a compact reserve [B, H_kv, n_max * cs, D]; empty slots
        # read block 0 and are masked by logical = -1.
        kv = p.blocks[physical.clamp(min=0).long(), layer]  # [B, n, 2, H, cs, D]
        kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, len(req_ids), p.heads_kv, -1, p.head_dim)
        device = q.device
        return reserve_attention(
            q,
            kv[0].to(device),
            kv[1].to(device),
            logical[:, None].to(device),
            kv_len.to(device),
            chunk_size=p.block_size,
            scale=scale,
            enable_gqa=q.shape[1] != p.heads_kv,
            backend=self.backend,
        )

    def nbytes(self, req_id: str) -> dict[str, int]:
        """Measured footprint of one request: host mirror bytes, device bytes of its blocks."""
        req = self._get(req_id, running=False)
        per_block = self.pool.nbytes() // self.pool.num_blocks
        return {"host": req.mirror.nbytes(), "device": len(req.blocks) * per_block}
