"""OracleScorer: the chunks the next τ decode steps truly attend to (an upper bound for a selector).

The dense answer is generated first; then prompt + dense answer go through one teacher-forced
forward (:func:`lsa.indexer.labels.teacher_forced_pass`) that records ``A[u, j]``, the attention
probability query ``u`` puts on chunk ``j`` (mean over all layers and query heads; for the
``oracle_max`` method of ``lsa eval``, ``head_reduce="max"``: the largest probability of any one
layer's head, the targets of ``lsa dump --label-reduce max``). At a refresh
the cache selects for the queries that follow it: the refresh at position ``t`` (the last token in
the cache) serves queries ``t + 1 … t + τ``, so the oracle's logit for chunk ``j`` is

    logit[j] = Σ_{u = t+1}^{min(t+τ, S−1)} A[u, j]      for the ``n_t = (t + 1) // cs`` chunks
                                                            completed at ``t``,

the lookahead target of :mod:`lsa.indexer.labels` one position later, before normalisation (which
does not change the ranking). Chunks that do not exist yet at ``t`` are never scored above any
existing chunk (they get ``-1``; the cache ignores them anyway). Past the end of the dense answer
(the oracle's own answer may run longer) the window is empty and every existing chunk scores 0,
so ties fall to the earlier chunk as in :func:`lsa.select_chunks`.

Rows are matched to the requests of the current batch by order: call :meth:`OracleScorer.set_rows`
with one mass per row before each ``generate()``.
"""

from __future__ import annotations

import torch

from lsa._validation import check_int
from lsa.indexer.labels import LabelConfig, teacher_forced_pass
from lsa.scorers.contract import check_scorer_settings


def attention_mass(
    model,
    input_ids: torch.Tensor,
    *,
    chunk_size: int,
    query_block: int | None = None,
    query_start: int = 0,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """``A`` [S, n_chunks] float32 on the CPU for one sequence ``[1, S]``: rows from
    ``query_start`` on sum to 1 (``head_reduce="mean"``; with ``"max"`` each row holds the
    strongest head's probability per chunk and is not normalised), earlier rows are zero (not
    computed).

    ``query_block``: queries per attention block (memory ``~ 4 · H_q · block · S`` bytes); the
    default is 256 on the CPU and 2048 on CUDA, where per-call overhead dominates.
    ``query_start``: the first query whose mass is needed (the oracle reads only the answer's
    queries, so it passes the prompt length: the mass over a 16K prompt is then ~100× cheaper).
    """
    if query_block is None:
        query_block = 2048 if input_ids.device.type == "cuda" else 256
    config = LabelConfig(
        chunk_size=chunk_size,
        query_block=query_block,
        query_start=query_start,
        head_reduce=head_reduce,
    )
    rec = teacher_forced_pass(model, input_ids, (0,), config)
    return (rec.mass / rec.n_terms).float().cpu()


class OracleScorer:
    """A :class:`lsa.scorers.ChunkScorer` that reads the future from recorded attention.

    Args:
        chunk_size: the cache's chunk size (the mass must be computed with the same one).
        lookahead: τ, the cache's ``refresh_every``.
    """

    def __init__(self, *, chunk_size: int = 64, lookahead: int = 64) -> None:
        self.chunk_size, self.target_layers = check_scorer_settings(chunk_size, (0,))
        self.lookahead = check_int("lookahead", lookahead, minimum=1)
        self._cum: list[torch.Tensor] = []

    def set_rows(self, masses: list[torch.Tensor]) -> None:
        """The attention mass ``A`` [S_b, n_chunks_b] of each row of the next batch, in order."""
        cums = []
        for b, a in enumerate(masses):
            if a.dim() != 2 or a.shape[1] != -(-a.shape[0] // self.chunk_size):
                raise ValueError(
                    f"masses[{b}] must be [S, ceil(S / {self.chunk_size})], got {tuple(a.shape)}"
                )
            # cum[u] = Σ_{v < u} A[v]: any window sum is one subtraction
            cums.append(torch.cat([a.new_zeros(1, a.shape[1]), a.float().cumsum(0)], 0))
        self._cum = cums

    def window(self, row: int, position: int) -> torch.Tensor:
        """Float [n_t]: the mass that queries ``position+1 … position+τ`` put on each chunk
        completed at ``position`` (see the module docstring)."""
        cum = self._cum[row]
        s = cum.shape[0] - 1
        n_t = (position + 1) // self.chunk_size
        lo, hi = min(position + 1, s), min(position + 1 + self.lookahead, s)
        mass = cum[hi] - cum[lo]
        out = torch.zeros(n_t, dtype=torch.float32)
        m = min(n_t, mass.shape[0])
        out[:m] = mass[:m]
        return out

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        return chunk_start.new_zeros((*chunk_start.shape, 1), dtype=torch.float32)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        keys = chunk_keys[self.target_layers[0]]
        b_size, n = keys.shape[:2]
        if b_size != len(self._cum):
            raise RuntimeError(
                f"OracleScorer holds masses for {len(self._cum)} rows but the cache scores "
                f"{b_size}: call set_rows() with the batch's masses before generate()"
            )
        out = torch.full((b_size, n), -1.0)
        for b, pos in enumerate(position.tolist()):
            w = self.window(b, int(pos))[:n]
            out[b, : w.shape[0]] = w
        return out.to(keys.device)

    def __repr__(self) -> str:
        return f"OracleScorer(chunk_size={self.chunk_size}, lookahead={self.lookahead})"


__all__ = ["OracleScorer", "attention_mass"]
