"""The token-id history of an :class:`~lsa.cache.LSACache`, for scorers that read text.

The cache's attention path sees keys, values and hidden states, never token ids. A scorer that
declares ``reads_token_ids`` (:mod:`lsa.scorers.contract`) needs them, so the cache then keeps each
row's logical tokens (padding removed) on the host: a forward pre-hook on the model catches the
``input_ids`` of every forward that runs with this cache, the prefill stores the prompt's
(:meth:`TokenHistory.start`) and each decode step appends one (:meth:`TokenHistory.append`). The
hook holds the cache weakly and is removed by ``close()`` or when the cache is collected.
"""

from __future__ import annotations

import weakref

import torch

from lsa.scorers.contract import TokenIds


class TokenHistory:
    """Per row, the token ids the cache has stored so far (int64 on the CPU)."""

    def __init__(self, cache: object, model: torch.nn.Module) -> None:
        self.pending: torch.Tensor | None = None  # the running forward's input_ids [B, S]
        self.ids: list[list[int]] = []
        self.prompt_len: list[int] = []
        ref = weakref.ref(cache)

        def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            owner = ref()
            used = kwargs.get("cache", kwargs.get("past_key_values"))
            if owner is not None and used is owner:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.pending = ids.detach().cpu() if isinstance(ids, torch.Tensor) else None

        self._handle = model.register_forward_pre_hook(catch, with_kwargs=True)
        weakref.finalize(cache, self._handle.remove)

    def _take(self, what: str, batch: int) -> torch.Tensor:
        ids, self.pending = self.pending, None
        if ids is None or ids.dim() != 2 or ids.shape[0] != batch:
            got = None if ids is None else tuple(ids.shape)
            raise ValueError(
                f"the scorer reads token ids but {what} came without input_ids [B={batch}, S] "
                f"(got {got}): call the model with input_ids (not inputs_embeds), or pass "
                "load_prefill(..., input_ids=...)"
            )
        return ids

    def start(self, pad: list[int]) -> None:
        """The prompt: row ``b`` keeps ``input_ids[b, pad[b]:]``."""
        ids = self._take("the prefill", len(pad))
        self.ids = [ids[b, p:].tolist() for b, p in enumerate(pad)]
        self.prompt_len = [len(row) for row in self.ids]

    def append(self) -> None:
        """A decode step: each row's new token."""
        ids = self._take("a decode step", len(self.ids))
        for row, token in zip(self.ids, ids[:, -1].tolist(), strict=True):
            row.append(token)

    def view(self, rows: list[int] | None = None) -> TokenIds:
        """What the scorer gets: the given rows (all by default), history up to now."""
        rows = range(len(self.ids)) if rows is None else rows
        return TokenIds(
            ids=tuple(torch.tensor(self.ids[b], dtype=torch.long) for b in rows),
            prompt_len=tuple(self.prompt_len[b] for b in rows),
        )

    def close(self) -> None:
        self._handle.remove()
