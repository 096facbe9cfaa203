"""Which chunks live on the device, and how they get there: the refresh and recall half of
:class:`lsa.cache.LSACache` (a mixin: it reads and writes the cache's own state).

A refresh scores each row's completed chunks, keeps the top ones (:func:`lsa.select_chunks`,
one resident set shared by all layers), moves chunks on the device so that kept chunks and the
tail stay a compact prefix of the reserve, recalls only the newly resident chunks from the host
mirror (``"copies"``: one host -> device copy per run of consecutive chunks, all layers at once,
then a device scatter; ``"zero_copy"``: one Triton kernel reading the pinned mirror), grows the
reserve when a row needs more slots, and pushes the block table.

With ``recall_lag`` L > 0, a refresh at a decode step selects at once but its new set takes
effect L steps later: the newly resident chunks are fetched from the mirror into a device staging
buffer on the side stream while those L steps run on the previous set (so the copies hide behind
decode), and the placement (device moves, a scatter from staging, the block table) happens before
step t + 1 + L. The chunks begun during the lag stay in the tail. The first refresh, after the
prefill, always takes effect at once: there is no previous set to decode with.

A refresh first copies each row's partial chunk to the mirror, so that if anything after that
fails (the scorer, an allocation, a recall), the mirror holds every token written so far although
the reserve is half rearranged; ``_refreshing`` names the stage for the error's note.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from lsa.cache.records import RefreshRecord
from lsa.cache.zero_copy import zero_copy_recall
from lsa.reference.select import select_chunks


@dataclass
class Selection:
    """What a refresh decided, before it is placed: per row the kept chunks and the scores."""

    step: int  # the decode step (1-based) from which the set is used
    kv_len: list[int]  # logical tokens per row when selecting
    n_done: list[int]  # completed chunks per row when selecting: the new tail begins there
    kept: list[list[int]]
    keep: list[torch.Tensor]
    logits: list[torch.Tensor | None]
    #: recall_lag > 0: the newly resident chunks already fetched, [n, L, 2, H, cs, D] on the
    #: device, their (row, chunk) -> index there, and the event the fetch recorded
    staged: torch.Tensor | None = None
    staged_index: dict[tuple[int, int], int] | None = None
    fetched: torch.cuda.Event | None = None


class Residency:
    """Refresh, placement and recall for :class:`lsa.cache.LSACache` (see the module docstring)."""

    def _refresh(self) -> None:
        self._refreshing = "copying the partial chunks to the mirror"
        self._mirror_partial()
        self._tail_in_mirror = True
        self._refreshing = "scoring"
        lag = self.recall_lag if self.decode_step > 0 else 0
        chosen = self._select(self.decode_step + 1 + lag)
        if lag:
            self._refreshing = "fetching the newly resident chunks"
            self._fetch_ahead(chosen)
            self._pending = chosen
        else:
            self._apply(chosen)
        self._tail_in_mirror = False
        self._refreshing = None

    def _apply_pending(self) -> None:
        """Place the set a lagged refresh chose (before the decode step it was chosen for)."""
        chosen, self._pending = self._pending, None
        self._refreshing = "placing the chunks a lagged refresh chose"
        self._apply(chosen)
        self._refreshing = None

    def _select(self, step: int) -> Selection:
        """Score every row's completed chunks and pick the ones to keep."""
        cs = self.chunk_size
        n_done = [n // cs for n in self.kv_len_host]
        n_max = max(n_done, default=0)
        logits_cpu = None
        if n_max > 0:
            missing = [i for i in self.target_layers if i not in self.hidden]
            if missing:
                raise RuntimeError(
                    f"no hidden state was captured at the scorer's target layers {missing}: the "
                    "model did not pass this cache to its attention modules as cache="
                )
            position = torch.tensor(
                [max(n - 1, 0) for n in self.kv_len_host], dtype=torch.long, device=self.device
            )
            keys = {i: self.chunk_keys[i][:, :n_max] for i in self.target_layers}
            hidden = {i: self.hidden[i] for i in self.target_layers}
            extra = {} if self._tokens is None else {"token_ids": self._tokens.view()}
            with torch.no_grad():
                logits = self.scorer.score(hidden, position, keys, **extra)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (self.batch, n_max):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
                raise ValueError(
                    f"scorer.score must return logits [B={self.batch}, n_chunks={n_max}], got {got}"
                )
            logits_cpu = logits.detach().float().cpu()
        chosen = Selection(step, list(self.kv_len_host), n_done, [], [], [])
        for b in range(self.batch):
            n = n_done[b]
            if n > 0:
                row = logits_cpu[b, :n]
                if not bool(torch.isfinite(row).all()):
                    raise ValueError(
                        f"scorer.score returned non-finite logits for row {b} at decode step "
                        f"{self.decode_step}"
                    )
                keep = select_chunks(
                    row[None, None],
                    budget=self.budget,
                    threshold=self.threshold,
                    sink_chunks=self.sink_chunks,
                    recent_chunks=self.recent_chunks,
                )[0, 0]
            else:
                row, keep = None, torch.zeros(0, dtype=torch.bool)
            chosen.kept.append(sorted(keep.nonzero().flatten().tolist()))
            chosen.keep.append(keep)
            chosen.logits.append(row)
        return chosen

    def _apply(self, chosen: Selection) -> None:
        """Make room, place (device moves, recalls) and push the block table."""
        cs = self.chunk_size
        # the tail: chunks from the first one not scored to the one being written (one chunk, or
        # none, unless chunks began during a recall lag)
        wants = [
            (kept, list(range(chosen.n_done[b], -(-self.kv_len_host[b] // cs))))
            for b, kept in enumerate(chosen.kept)
        ]
        # make room: kept chunks, the tail, and the chunks the next τ tokens begin (at most
        # ceil(τ / cs) beyond the tail), so decode steps never reallocate
        tail_room = math.ceil(self.refresh_every / cs)
        need = max(len(k) + len(t) for k, t in wants) + tail_room
        if need > self.n_slots:
            self._refreshing = "growing the device reserve"
            self._grow_to(need, "refresh")
        self._refreshing = "placing and recalling chunks"
        plan: list[list[tuple[int, int]]] = []
        moves: list[tuple[int, int, int]] = []  # (row, from slot, to slot), on the device
        for b, (kept, tail) in enumerate(wants):
            slots, row_moves, recalls = self._place(self.slot_of[b], kept, tail)
            self.slot_of[b] = slots
            self.bt_host[b] = -1
            for c, slot in slots.items():
                self.bt_host[b, slot] = c
            moves += [(b, src, dst) for src, dst in row_moves]
            plan.append(recalls)
            self.n_kept[b] = len(kept)
            self.tail_first[b] = chosen.n_done[b]
            self.visible[b] = (len(kept) - chosen.n_done[b]) * cs + self.kv_len_host[b]
        self._move(moves)
        if chosen.staged is not None:
            moved = self._scatter_staged(chosen, plan)
        else:
            moved = self._recall(plan)
        self._push_block_table()
        self.refreshes.append(
            RefreshRecord(
                step=chosen.step,
                kv_len=chosen.kv_len,
                logits=chosen.logits,
                keep=chosen.keep,
                resident=[sorted(s) for s in self.slot_of],
                recalled=[len(p) for p in plan],
                recalled_bytes=moved,
            )
        )

    @staticmethod
    def _place(
        old: dict[int, int], kept: list[int], tail: list[int]
    ) -> tuple[dict[int, int], list[tuple[int, int]], list[tuple[int, int]]]:
        """One row's new slots, compacted: kept chunks in slots 0..len(kept)-1 (a chunk already
        there stays), the tail's consecutive chunks right after them. Returns (chunk -> slot,
        device moves [(from, to)] of chunks already resident elsewhere, recalls [(chunk, slot)]
        from the mirror, sorted by chunk). Everything else is evicted."""
        r = len(kept)
        slots = {c: old[c] for c in kept if c in old and old[c] < r}
        taken = set(slots.values())
        holes = iter(s for s in range(r) if s not in taken)
        moves, recalls = [], []
        todo = [(c, next(holes)) for c in kept if c not in slots]
        todo += [(c, r + i) for i, c in enumerate(tail)]
        for c, slot in todo:
            slots[c] = slot
            if c not in old:
                recalls.append((c, slot))
            elif old[c] != slot:
                moves.append((old[c], slot))
        return slots, moves, sorted(recalls)

    def _move(self, moves: list[tuple[int, int, int]]) -> None:
        """Device-side slot moves (row, from, to) in every layer: all sources are read before
        any destination is written, so moves may overlap (a source may be another's target)."""
        if not moves:
            return
        for layer in self.layers:
            if layer.ready is not None:  # a recall still writing this layer's slots
                torch.cuda.current_stream(self.device).wait_event(layer.ready)
                layer.ready = None
        self.recall_stats.slot_moves += len(moves)
        idx = self._to_device(torch.tensor(moves, dtype=torch.long).T.contiguous())
        rows, src, dst = idx[0], idx[1], idx[2]
        for layer in self.layers:
            for buf in (layer.reserve_k, layer.reserve_v):
                buf[rows, :, dst] = buf[rows, :, src]  # the gather is a copy, then the scatter

    def _recall(self, plan: list[list[tuple[int, int]]]) -> int:
        """Copy newly resident chunks mirror -> reserve, every layer; returns bytes moved.

        ``recall="copies"``: per run of consecutive chunks of a row, one host -> device copy of
        all layers' K and V into a device staging buffer [n, L, 2, H, cs, D], then per layer one
        scatter of K and one of V into the reserve slots. ``recall="zero_copy"``: one kernel
        reads the pinned mirror and writes the slots. On CUDA all of it runs on the side stream
        after the work already queued on the current stream (which may still read the slots
        being refilled); each layer records an event its next reserve write waits on. The
        staging buffer and the
        slot index are allocated and used on the side stream only, so freeing them needs no
        cross-stream care; the reserve outlives the copies (``_grow`` and ``reset`` wait).
        """
        n_total = sum(len(p) for p in plan)
        if n_total == 0:
            return 0
        mirror = self.mirror
        stream = self._stream
        timing = None
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            stream.wait_event(ready)
            timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[0].record(stream)
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            if self.recall == "zero_copy":
                self._recall_zero_copy(plan)
            else:
                self._recall_copies(plan, n_total)
            if stream is not None:
                for layer in self.layers:
                    layer.ready = torch.cuda.Event()
                    layer.ready.record(stream)
        moved = n_total * mirror.chunk_nbytes
        if timing is not None:
            timing[1].record(stream)
            self.recall_stats.events.append((timing[0], timing[1], moved))
        self.recall_stats.chunks += n_total * self.num_layers
        self.recall_stats.bytes += moved
        return moved

    def _recall_copies(self, plan: list[list[tuple[int, int]]], n_total: int) -> None:
        """Per run of chunks one host -> device copy of all layers into a staging buffer (on
        the side stream: it is freed there), then per layer one scatter of K and one of V."""
        staging = self._fetch([[c for c, _ in pairs] for pairs in plan], n_total)
        index = [(b, slot) for b, pairs in enumerate(plan) for _, slot in pairs]
        idx = self._to_device(torch.tensor(index, dtype=torch.long).T.contiguous())
        rows, slots = idx[0], idx[1]
        for i, layer in enumerate(self.layers):
            layer.reserve_k[rows, :, slots] = staging[:, i, 0]
            layer.reserve_v[rows, :, slots] = staging[:, i, 1]

    def _fetch(self, chunks: list[list[int]], n_total: int) -> torch.Tensor:
        """Per row the given sorted chunks, all layers, mirror -> a new device buffer
        [n_total, L, 2, H, cs, D] (rows in order): one copy per run of consecutive chunks."""
        mirror = self.mirror
        staging = torch.empty(
            (n_total, *mirror.segments[0].shape[2:]), dtype=mirror.dtype, device=self.device
        )
        j = 0
        for b, row in enumerate(chunks):
            for first, count in _runs(row):
                for off, view in mirror.runs(b, first, count):
                    staging[j + off : j + off + view.shape[0]].copy_(view, non_blocking=self.pin)
                    self.recall_stats.copies += 1
                j += count
        return staging

    def _fetch_ahead(self, chosen: Selection) -> None:
        """recall_lag > 0: fetch the chunks ``chosen`` makes newly resident into staging now (on
        the side stream, behind the decode steps of the lag); :meth:`_apply` scatters them. The
        reserve is not touched: the steps of the lag still read the previous set."""
        chunks = [
            [c for c in kept if c not in self.slot_of[b]] for b, kept in enumerate(chosen.kept)
        ]
        chosen.staged_index = {
            (b, c): j
            for j, (b, c) in enumerate((b, c) for b, row in enumerate(chunks) for c in row)
        }
        n_total = len(chosen.staged_index)
        if n_total == 0:
            return
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the mirror writes
            timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[0].record(stream)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            chosen.staged = self._fetch(chunks, n_total)
        if stream is not None:
            timing[1].record(stream)
            chosen.fetched = timing[1]
            moved = n_total * self.mirror.chunk_nbytes
            self.recall_stats.events.append((timing[0], timing[1], moved))

    def _scatter_staged(self, chosen: Selection, plan: list[list[tuple[int, int]]]) -> int:
        """The placement's recalls, from the chunks :meth:`_fetch_ahead` staged (on the current
        stream, after the fetch); returns bytes moved host -> device for them."""
        n_total = sum(len(p) for p in plan)
        if n_total == 0:
            return 0
        where = [chosen.staged_index[(b, c)] for b, pairs in enumerate(plan) for c, _ in pairs]
        index = [(b, slot) for b, pairs in enumerate(plan) for _, slot in pairs]
        if chosen.fetched is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(chosen.fetched)
            chosen.staged.record_stream(current)  # allocated on the side stream, read here
        idx = self._to_device(torch.tensor([where, *zip(*index, strict=True)], dtype=torch.long))
        src, rows, slots = idx[0], idx[1], idx[2]
        staged = chosen.staged.index_select(0, src)
        for i, layer in enumerate(self.layers):
            layer.reserve_k[rows, :, slots] = staged[:, i, 0]
            layer.reserve_v[rows, :, slots] = staged[:, i, 1]
        chosen.staged = None
        moved = n_total * self.mirror.chunk_nbytes
        self.recall_stats.chunks += n_total * self.num_layers
        self.recall_stats.bytes += moved
        return moved

    def _recall_zero_copy(self, plan: list[list[tuple[int, int]]]) -> None:
        items = torch.tensor(
            [(b, c, slot) for b, pairs in enumerate(plan) for c, slot in pairs], dtype=torch.long
        ).T.contiguous()
        zero_copy_recall(
            self.mirror.chunk_addresses(items[0], items[1]),
            [(layer.reserve_k, layer.reserve_v) for layer in self.layers],
            items[0],
            items[2],
            self._to_device,
        )
        self.recall_stats.copies += 1  # one kernel launch

    def _grow_to(self, need: int, where: str) -> None:
        """Grow to at least ``need`` slots, by 25% at least (growing is a reallocation), but never
        past the worst case the pre-flight check counted when ``max_new_tokens`` is known."""
        n_slots = max(need, math.ceil(self.n_slots * 1.25))
        if self._slot_cap is not None:
            n_slots = max(need, min(n_slots, self._slot_cap))
        self._grow(n_slots, where)

    def _new_reserve_buffer(self, layer, n_slots: int) -> torch.Tensor:
        """One layer's zeroed K or V reserve of ``n_slots`` slots."""
        return torch.zeros(
            (self.batch, layer.heads_kv, n_slots, self.chunk_size, layer.head_dim),
            dtype=layer.dtype,
            device=self.device,
        )

    def _grow(self, n_slots: int, where: str) -> None:
        """Enlarge every layer's reserve to ``n_slots`` slots (rare: budgets grow with length)."""
        old = self.n_slots
        self._decode.table_changed()
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for layer in self.layers:
            for name in ("reserve_k", "reserve_v"):
                grown = self._new_reserve_buffer(layer, n_slots)
                current = getattr(layer, name)
                if current is not None:
                    grown[:, :, :old] = current
                setattr(layer, name, grown)
        table = torch.full((self.batch, n_slots), -1, dtype=torch.int32)
        if self.bt_host is not None:
            table[:, :old] = self.bt_host
        self.bt_host = table
        if self._tail_slot is None:
            self._tail_slot = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.n_slots = n_slots
        self.grows.append((self.decode_step, n_slots, where))

    def _push_block_table(self) -> None:
        table = self.bt_host.view(self.batch, 1, self.n_slots)
        if self.block_table is not None and self.block_table.shape == table.shape:
            # in place: a captured decode step (lsa.cache.static) reads this very tensor
            self.block_table.copy_(table, non_blocking=False)
        else:
            self.block_table = self._to_device(table.clone())
        self._decode.table_changed()  # a flex plan reads the table it was built from

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh host tensor to the device (pinned, async on CUDA; the source is not reused)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk ids -> (first, count) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for c in chunks:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs
