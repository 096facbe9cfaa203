"""``DeepseekV4LSACache``: two-level LSA for transformers' DeepSeek-V4 (``generate()`` cache).

Level 1, every ``refresh_every`` (τ) forwards: the :class:`MemoryIndexer` scores every compressed
entry of the CSA history from the target layers' hidden state of the last token and their
index-K codes; entries are grouped in pages of ``page_size`` and a page scores its best entry;
``lsa.select_chunks`` keeps ``budget`` pages (the first ``sink_pages`` and last ``recent_pages``
complete pages forced, inside the budget). Those pages are the *resident set* of every CSA layer.

Level 2, every step, unchanged transformers code: each CSA layer's native lightning indexer runs
its top-k over the resident entries only, and attention reads the sliding window plus the
selected entries. This works because the cache layer hands the compressor and the indexer a
compacted device *reserve* (resident entries in increasing entry order) in place of the full
compressed list; the native code indexes that list, so its top-k is the stock top-k with every
non-resident logit at −inf (proved in ``tests/test_deepseek_v4_cache.py``).

What is never lost: every compressed entry (attention KV and index-K), prompt and generated, is
appended to a host mirror as it is written (the seed dropped decode entries after 2048 generated
tokens). Entries written after a refresh join the reserve at once. The trailing incomplete page
is always resident. Sliding-window and HCA layers are the stock transformers layers.

State belongs to the cache object, i.e. to one request (batch); :meth:`reset` clears all of it
(the seed kept per-slot state that leaked between requests). Batches: rows must be unpadded and
of equal length; each row has its own resident set of the same size.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache

from lsa._validation import check_bool, check_int
from lsa.deepseek_v4.memory_indexer import CSA, MemoryIndexer
from lsa.deepseek_v4.mirror import HostMirror
from lsa.reference.select import select_chunks

SERIES = ("compressor", "indexer")  # attention KV entries and native index-K entries


class LSACSALayer(DeepseekV4CSACache):
    """A CSA cache layer whose compressed series live in a host mirror plus a device reserve."""

    # Not registered as transformers' default layer for CSA (a set _layer_type would replace
    # the stock class in every DynamicCache built after this import).
    _layer_type = None

    def __init__(self, config, keep_codes: bool, memory_indexer: MemoryIndexer | None):
        super().__init__(config)
        self._config = config
        self.keep_codes = keep_codes
        self._memory_indexer = memory_indexer
        self._reset_lsa()

    def _reset_lsa(self) -> None:
        self.mirror = {name: HostMirror() for name in SERIES}
        #: int64 [B, K] entry ids of the reserve rows, ascending; None = every entry resident.
        self.resident_ids: torch.Tensor | None = None
        #: the target layers' index-K as the memory indexer stores it (fp8 codes), on the device.
        self.codes: torch.Tensor | None = None
        self.recalled_bytes = 0

    def store_compression_weights(self, name, kv, gate):
        if kv.shape[1] > 1 and self.resident_ids is not None:
            # The native causal masks index the compressed list by entry id; a compacted
            # reserve would shift them. Decoding one token at a time has no such mask.
            raise ValueError(
                "DeepseekV4LSACache takes one token per forward once a resident set is chosen; "
                f"got {kv.shape[1]} tokens (prefill in one forward, then decode)"
            )
        return super().store_compression_weights(name, kv, gate)

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        n_new = compressed.shape[1]
        if n_new:
            self.mirror[name].append(compressed)
            if name == "indexer" and self.keep_codes:
                code = self._memory_indexer.encode_keys(compressed)
                self.codes = code if self.codes is None else torch.cat([self.codes, code], 1)
        if self.resident_ids is not None and name == "compressor" and n_new:
            first = self.entry_count[name]
            new_ids = torch.arange(first, first + n_new, device=self.resident_ids.device)
            self.resident_ids = torch.cat(
                [self.resident_ids, new_ids.expand(self.resident_ids.shape[0], -1)], 1
            )
        return super().update_compressor_states(name, compressed)

    @property
    def n_entries(self) -> int:
        return self.mirror["compressor"].length

    def set_resident(self, ids: torch.Tensor) -> int:
        """Make ``ids`` (int64 [B, K], ascending, on the reserve's device) the resident set.

        Entries already in the reserve are moved on the device; the others are recalled from
        the host mirror. Returns the bytes recalled from the host."""
        device = self.compressed_kv["compressor"].device
        b = ids.shape[0]
        old = self.resident_ids
        if old is None:
            old = torch.arange(self.n_entries, device=device).repeat(b, 1)
        pos = torch.searchsorted(old, ids).clamp_max(old.shape[1] - 1)
        hit = old.gather(1, pos) == ids  # [B, K]: already on the device
        miss_rows, miss_cols = (~hit).nonzero(as_tuple=True)
        recalled = 0
        for name in SERIES:
            reserve = self.compressed_kv[name]
            fresh = reserve.gather(1, pos[..., None].expand(-1, -1, reserve.shape[-1]))
            if miss_rows.numel():
                host = self.mirror[name].gather(miss_rows.cpu(), ids[miss_rows, miss_cols].cpu())
                fresh[miss_rows, miss_cols] = host.to(device, non_blocking=True)
                recalled += host.numel() * host.element_size()
            self.compressed_kv[name] = fresh
        self.resident_ids = ids
        self.recalled_bytes += recalled
        return recalled

    def reset(self) -> None:
        # A fresh layer: transformers 5.17's CSA layer has no reset of its own, and its
        # sliding-window reset keeps the old key length.
        self.__init__(self._config, self.keep_codes, self._memory_indexer)


class DeepseekV4LSACache(DynamicCache):
    """A transformers ``DynamicCache`` for DeepSeek-V4 with two-level LSA on its CSA layers.

    Args:
        model: a transformers ``DeepseekV4ForCausalLM`` (or ``DeepseekV4Model``).
        memory_indexer: the Level-1 scorer; its ``target_layers`` must be CSA layers.
        budget: resident pages, an int count or a fraction in (0, 1] of the complete pages,
            forced ones included (the seed: 96 pages of 64 entries at 256K).
        refresh_every: τ, forwards between refreshes; the first refresh follows the prefill.
        page_size: compressed entries per page (the seed: 64, i.e. 256 tokens).
        sink_pages, recent_pages: complete pages always kept (the seed: 0 and 32).
        gate: False keeps every entry resident and never refreshes (the cache is then stock
            transformers plus the host mirror).

    Use: ``model.generate(ids, cache=DeepseekV4LSACache(model, indexer, budget=96))``
    (``past_key_values=`` on transformers before 5.2x).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        memory_indexer: MemoryIndexer,
        *,
        budget: int | float = 0.1,
        refresh_every: int = 64,
        page_size: int = 64,
        sink_pages: int = 1,
        recent_pages: int = 32,
        gate: bool = True,
    ):
        if not isinstance(memory_indexer, MemoryIndexer):
            raise TypeError(
                f"memory_indexer must be a MemoryIndexer, got {type(memory_indexer).__name__}"
            )
        config = model.config
        if getattr(config, "model_type", None) != "deepseek_v4":
            raise ValueError(
                f"model must be a transformers DeepSeek-V4 model, got model_type "
                f"{getattr(config, 'model_type', None)!r}"
            )
        layer_types = list(config.layer_types)
        bad = [x for x in memory_indexer.target_layers if layer_types[x] != CSA]
        if bad:
            raise ValueError(f"memory_indexer.target_layers must be CSA layers, got {bad}")
        if memory_indexer.config.hidden_size != config.hidden_size:
            raise ValueError(
                f"memory_indexer.config.hidden_size must be {config.hidden_size}, "
                f"got {memory_indexer.config.hidden_size}"
            )
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be an int count or a float fraction, got {budget!r}")
        if (isinstance(budget, float) and not 0 < budget <= 1) or (
            isinstance(budget, int) and budget < 1
        ):
            raise ValueError(f"budget must be an int >= 1 or a fraction in (0, 1], got {budget}")
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.page_size = check_int("page_size", page_size, minimum=1)
        self.sink_pages = check_int("sink_pages", sink_pages, minimum=0)
        self.recent_pages = check_int("recent_pages", recent_pages, minimum=0)
        check_bool("gate", gate)
        self.budget, self.gate, self.memory_indexer = budget, gate, memory_indexer
        super().__init__(config=config)
        self._config = config
        self._build_layers()
        if not self.csa_layers:
            raise ValueError("model has no compressed_sparse_attention layers: nothing to confine")
        _install_hooks(model)
        self._reset_state()

    def _build_layers(self) -> None:
        """Fresh layers: transformers' own for sliding-window and HCA, LSACSALayer for CSA."""
        targets = set(self.memory_indexer.target_layers)
        self.layers = DynamicCache(config=self._config).layers
        self.csa_layers: dict[int, LSACSALayer] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, DeepseekV4CSACache):
                self.layers[i] = LSACSALayer(self._config, i in targets, self.memory_indexer)
                self.csa_layers[i] = self.layers[i]

    def _reset_state(self) -> None:
        self.forwards = 0
        self._hidden: dict[int, torch.Tensor] = {}
        self._position: torch.Tensor | None = None
        #: one record per refresh: forward index, entries, resident entries, recalled bytes
        self.refreshes: list[dict] = []

    def reset(self) -> None:
        """Forget the request: new layers (transformers 5.17's V4 layers keep stale lengths
        through their own reset), empty mirrors, no resident set, the refresh counter at 0."""
        self._build_layers()
        self._reset_state()

    # called by the hooks -------------------------------------------------------------------
    def _before_forward(self, attention_mask) -> None:
        padded = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        if padded and not bool(attention_mask.all()):
            raise ValueError(
                "DeepseekV4LSACache needs unpadded rows (attention_mask all ones), got padding"
            )
        due = self.forwards > 0 and (self.forwards - 1) % self.refresh_every == 0
        if self.gate and due:
            self.refresh()
        self.forwards += 1

    def _observe(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> None:
        if layer in self.memory_indexer.target_layers:
            self._hidden[layer] = hidden[:, -1].detach()
            # transformers builds position_ids as [1, S] for the whole batch
            self._position = position_ids[:, -1].detach().expand(hidden.shape[0])

    # Level 1 -------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> torch.Tensor | None:
        """Choose the resident set from the last token's state; returns it (int64 [B, K]) or
        None when every entry stays resident (too few complete pages to leave any out)."""
        if self._position is None:
            raise RuntimeError("refresh needs a forward first (the target layers' hidden state)")
        first = next(iter(self.csa_layers.values()))
        n = first.n_entries
        n_pages = n // self.page_size
        complete = n_pages * self.page_size
        b = self._position.shape[0]
        device = first.compressed_kv["compressor"].device
        record = {"forward": self.forwards, "entries": n, "resident": n, "recalled_bytes": 0}
        keep = torch.ones(b, n_pages, dtype=torch.bool, device=device)
        if n_pages:
            hidden = {x: self._hidden[x] for x in self.memory_indexer.target_layers}
            keys = {
                x: self.memory_indexer.decode_keys(self.csa_layers[x].codes[:, :complete])
                for x in self.memory_indexer.target_layers
            }
            logits = self.memory_indexer.score(hidden, self._position, keys)  # [B, complete]
            pages = logits.view(b, n_pages, self.page_size).amax(-1)
            keep = select_chunks(
                pages[:, None].float(),
                budget=self.budget,
                sink_chunks=self.sink_pages,
                recent_chunks=self.recent_pages,
            )[:, 0]
        counts = keep.sum(-1)
        if bool((counts != counts[0]).any()):  # cannot happen with a count budget; guard anyway
            raise RuntimeError(f"rows kept different page counts {counts.tolist()}")
        entry_keep = torch.cat(
            [
                keep.repeat_interleave(self.page_size, dim=1),
                torch.ones(b, n - complete, dtype=torch.bool, device=device),  # partial page
            ],
            1,
        )
        ids = entry_keep.nonzero()[:, 1].view(b, -1)
        recalled = 0
        if n:
            for layer in self.csa_layers.values():
                recalled += layer.set_resident(ids)
        record.update(resident=ids.shape[1], recalled_bytes=recalled)
        self.refreshes.append(record)
        return ids

    # accounting ------------------------------------------------------------------------------
    def footprint(self) -> dict[str, int]:
        """Bytes measured from the tensors held: ``device`` (all layers' KV, the CSA reserves
        and index-K codes), ``host`` (mirrors), ``dense_csa`` (what stock keeps on the device
        for the CSA compressed series), ``device_csa`` (what LSA keeps for them)."""
        device = host = dense_csa = device_csa = 0

        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        for i, layer in enumerate(self.layers):
            device += size(getattr(layer, "keys", None))
            for t in getattr(layer, "compressed_kv", {}).values():
                device += size(t)
                if i in self.csa_layers:
                    device_csa += size(t)
            if i in self.csa_layers:
                device += size(layer.codes)
                device_csa += size(layer.codes)
                host += sum(m.nbytes for m in layer.mirror.values())
                dense_csa += sum(m.nbytes for m in layer.mirror.values())
        return {"device": device, "host": host, "dense_csa": dense_csa, "device_csa": device_csa}


def _cache_of(kwargs: dict):
    for key in ("cache", "past_key_values"):
        value = kwargs.get(key)
        if isinstance(value, DeepseekV4LSACache):
            return value
    return None


def _install_hooks(model: torch.nn.Module) -> None:
    """Once per model: a pre-hook on the decoder body (refresh when due) and on every CSA
    attention (record the attention input). They act only when the forward's cache is a
    DeepseekV4LSACache, so other caches and other requests are untouched."""
    body = getattr(model, "model", model)
    if getattr(body, "_lsa_dsv4_hooked", False):
        return

    def body_hook(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is not None:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            cache._before_forward(mask)

    body.register_forward_pre_hook(body_hook, with_kwargs=True)
    for layer in body.layers:
        attn = layer.self_attn
        if attn.layer_type != CSA:
            continue

        def attn_hook(module, args, kwargs):
            cache = _cache_of(kwargs)
            if cache is not None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cache._observe(module.layer_idx, hidden, kwargs["position_ids"])

        attn.register_forward_pre_hook(attn_hook, with_kwargs=True)
    body._lsa_dsv4_hooked = True
