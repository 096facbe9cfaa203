"""LSACache: a physically compressed KV cache for transformers ``generate()``.

Data layout (``B`` rows, ``L`` decoder layers, ``H`` KV heads, head dim ``D``, chunk size ``cs``)::

    host   mirror     all layers, chunk-major segments [B, n, L, 2, H, cs, D] (pinned on CUDA)
    device reserve    per layer, K and V [B, H, n_slots, cs, D]               (resident + tail)
           block_table  [B, 1, n_slots] int32, logical chunk per slot, -1 = empty (shared by layers)
           kv_len       [B] int32, logical length per row
           chunk keys   per scorer target layer [B, n_chunks_cap, key_dim]

Rows are left-padded batches: row ``b``'s *logical* positions start at its first real token, so its
chunk 0 starts there and padding never enters a chunk; ``kv_len[b]`` counts real tokens only.

Life of a request:

1. prefill (the cache is empty): dense SDPA over the prompt with the model's mask; every layer's
   prompt K/V go to the mirror (all tokens, the partial last chunk too); the scorer's
   ``encode_chunks`` turns each completed chunk into a chunk key (target layers only).
2. refresh, for the first decode step and every ``refresh_every`` decode steps after it, issued as
   soon as the forward before that step has run its last attention (so the recall overlaps the rest
   of that forward and the start of the next): the scorer scores the completed chunks of each row
   from the attention input captured at its target layers (forward pre-hooks, no model code
   changed); :func:`lsa.select_chunks` makes the row's keep mask (one resident set shared by all
   layers); only *newly* resident chunks are copied mirror -> reserve. On CUDA the recall runs on a
   side stream: one host -> device copy per run of consecutive chunks carrying *all* layers' K and
   V (the mirror is chunk-major, layer inside) into a device staging buffer, then a device-side
   scatter into each layer's slots, each layer signalling an event its next write waits on.
3. slots are kept *compacted*: row ``b``'s ``R_b`` kept (complete) chunks occupy slots
   ``0 .. R_b - 1`` and its tail (the chunks begun since the refresh, partial one last) the slots
   right after them, so the tokens a decode query sees are the contiguous prefix of
   ``visible[b]`` tokens of the flattened reserve. A refresh moves chunks on the device to keep it
   so (a kept chunk above ``R_b``, the partial chunk to slot ``R_b``).
4. decode step: the new token's K/V are written into the reserve slot of its chunk; a chunk that
   completes is copied to the mirror (one contiguous copy per layer) and encoded. Attention
   (``backend="compact"``, the default on CUDA) is plain SDPA over that prefix: no mask, fused
   kernels. The other backends run :func:`lsa.reserve_attention` with the block table. Nothing is
   ever dropped.

Budget and threshold apply to each row's *completed* chunks; the tail (the partial chunk and the
chunks begun since the last refresh) is resident on top of it and counted in :meth:`footprint`.
"""

from __future__ import annotations

import contextlib
import threading
from numbers import Integral

import torch
from transformers.cache_utils import Cache

from lsa._validation import check_budget, check_int
from lsa.cache import capture
from lsa.cache.attention import ATTN_IMPLEMENTATION, hand_over, register_lsa_attention
from lsa.cache.decode import DecodeAttention
from lsa.cache.layer import LSALayer
from lsa.cache.mirror import HostMirror
from lsa.cache.model import attention_modules, check_layer_types, text_config
from lsa.cache.records import Footprint, RecallStats, RefreshRecord
from lsa.cache.residency import Residency, Selection
from lsa.cache.resources import check_device, check_request, worst_case_slots
from lsa.cache.static import StaticDecode
from lsa.cache.token_ids import TokenHistory
from lsa.cache.zero_copy import zero_copy_unavailable, zero_copy_write
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS
from lsa.scorers.contract import ChunkScorer, reads_token_ids

RECALLS = ("copies", "zero_copy")
_claim = threading.Lock()  # makes "is a forward running? if not, this thread runs one" atomic
_BUSY = (
    "another thread is running a forward through this LSACache: one cache serves one request at "
    "a time; give each thread its own LSACache"
)


class LSACache(Residency, Cache):
    """A KV cache whose full history lives in a host mirror and whose device side holds only the
    chunks a scorer predicts for the next ``refresh_every`` steps (plus sink, recent and tail).

    Use::

        model.set_attn_implementation("lsa")   # LSACache registers "lsa" with transformers
        cache = LSACache(model, scorer, budget=0.1, max_new_tokens=256)
        out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=256)
        cache.reset()                           # before the next request

    Args:
        model: the decoder (``*ForCausalLM``); its config must have full attention in every layer.
            The model itself (not only its config) is needed to capture, with forward pre-hooks,
            the attention input at the scorer's target layers.
        scorer: a :class:`lsa.scorers.ChunkScorer` (required; there is no default).
        budget: chunks kept per row among its completed chunks: an int count or a fraction in
            (0, 1] (rounded up), sink and recent included, as in :func:`lsa.select_chunks`.
        threshold: keep chunks whose logit exceeds it (capped by ``budget`` when both are given).
        refresh_every: τ, decode steps between refreshes (the first is at the first decode step).
        chunk_size: tokens per chunk; must equal ``scorer.chunk_size`` (default: that value).
        sink_chunks / recent_chunks: the first / last completed chunks, always kept.
        device: where the reserve lives (default: the model's device).
        host_device: where the mirror lives (default "cpu"; pinned when ``device`` is CUDA).
        backend: decode attention. ``"compact"``: SDPA over the compacted reserve (no mask);
            ``"auto"`` picks it on CUDA and :func:`lsa.reserve_attention`'s own choice elsewhere;
            ``"flex"``, ``"sdpa"``, ``"reference"``: :func:`lsa.reserve_attention` with that
            backend over the block table.
        resident_sets: ``"shared"`` (one resident set for all layers, the only layout
            supported: the mirror holds one chunk of all layers in one block).
        recall: how newly resident chunks reach the reserve. ``"copies"``: one host -> device
            copy per run of consecutive chunks (all layers at once) into a staging buffer, then
            a device scatter. ``"zero_copy"``: one Triton kernel reading the pinned mirror
            directly (:mod:`lsa.cache.zero_copy`; CUDA, or Triton's interpreter on CPU).
        recall_lag: decode steps between a refresh's selection and the step its new set is
            used from (``0 <= recall_lag < refresh_every``). 0: at once, the recall on the
            critical path. L > 0: the newly resident chunks are fetched into a device staging
            buffer behind the next L decode steps, which still read the previous set, so the
            host -> device copies hide behind decode (copies only; the set the prefill's
            refresh chooses is used at once).
        max_new_tokens: the most tokens a request generates (``generate()`` does not tell its
            cache). When given, a request's prefill first checks that the host mirror for the
            prompt plus ``max_new_tokens`` tokens and the device reserve at its worst case for the
            budget fit in the memory available (:class:`lsa.cache.CacheMemoryError` if not),
            allocates the mirror for the whole request, and refuses to decode past it. ``None``:
            no check. May be changed between requests.

    A request that fails (an exception or KeyboardInterrupt in a forward) cannot continue: the
    cache refuses further forwards until :meth:`reset`; :meth:`flush` / :meth:`mirror_kv` still
    give every token that was stored in every layer. One cache serves one request at a time
    (a forward from another thread while one runs is refused); threads need a cache each.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scorer: ChunkScorer,
        *,
        budget: int | float | None = None,
        threshold: float | None = None,
        refresh_every: int = 64,
        chunk_size: int | None = None,
        sink_chunks: int = SINK_CHUNKS,
        recent_chunks: int = RECENT_CHUNKS,
        device: torch.device | str | None = None,
        host_device: torch.device | str = "cpu",
        backend: str = "auto",
        resident_sets: str = "shared",
        recall: str = "copies",
        recall_lag: int = 0,
        max_new_tokens: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "LSACache needs the model (an nn.Module), not only its config: it captures the "
                "scorer's hidden states with forward pre-hooks on the attention modules; got "
                f"{type(model).__name__}"
            )
        config = text_config(model)
        check_layer_types(config)
        n_layers = config.num_hidden_layers
        check_budget(budget, threshold)
        if budget is not None and isinstance(budget, Integral) and not isinstance(budget, bool):
            budget = int(budget)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.sink_chunks = check_int("sink_chunks", sink_chunks, minimum=0)
        self.recent_chunks = check_int("recent_chunks", recent_chunks, minimum=0)
        if resident_sets != "shared":
            raise NotImplementedError(
                f"resident_sets={resident_sets!r} is not supported: LSACache keeps one resident "
                "set shared by all layers (its mirror stores a chunk of every layer as one "
                "block, so that a recall is one copy per run of chunks); use 'shared'"
            )
        self.backend = backend
        self.budget = budget
        self.threshold = None if threshold is None else float(threshold)
        self._check_scorer(scorer, config, n_layers)
        if chunk_size is None:
            chunk_size = scorer.chunk_size
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        if self.chunk_size != scorer.chunk_size:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must equal the scorer's chunk_size "
                f"({scorer.chunk_size}): chunk keys are computed per chunk"
            )
        self.scorer = scorer
        self.target_layers = tuple(int(i) for i in scorer.target_layers)
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = check_device("device", device)
        self._decode = DecodeAttention(backend, self.device)
        self.host_device = check_device("host_device", host_device)
        self.max_new_tokens = max_new_tokens
        self.pin = self.device.type == "cuda" and self.host_device.type == "cpu"
        if recall not in RECALLS:
            raise ValueError(f"recall must be one of {RECALLS}, got {recall!r}")
        if recall == "zero_copy" and (why := zero_copy_unavailable(self.device)) is not None:
            raise ValueError(f"recall='zero_copy' cannot run: {why}")
        self.recall = recall
        self.recall_lag = check_int("recall_lag", recall_lag, minimum=0)
        if self.recall_lag >= self.refresh_every:
            raise ValueError(
                f"recall_lag ({self.recall_lag}) must be < refresh_every ({self.refresh_every}): "
                "a refresh's set must be in use before the next refresh chooses"
            )
        if self.recall_lag and recall != "copies":
            raise ValueError(
                f"recall_lag={self.recall_lag} needs recall='copies' (the chunks are fetched into "
                f"a staging buffer ahead of time); recall={recall!r} writes the reserve directly"
            )
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._model_config = model.config
        self.num_layers = n_layers

        register_lsa_attention()
        super().__init__(layers=[LSALayer(self, i) for i in range(n_layers)])
        modules = attention_modules(model, n_layers)
        self._capture_modules = {i: modules[i] for i in self.target_layers}
        capture.attach(self, self._capture_modules)
        # the token ids of this request, for scorers that read text (None for every other one)
        self._tokens = TokenHistory(self, model) if reads_token_ids(scorer) else None
        self._closed = False
        self.recall_stats = RecallStats()
        self._new_request()

    @property
    def decode_backend(self) -> str:
        """The decode attention used for one-query steps ("compact" or a reserve_attention one)."""
        return self._decode.name

    @property
    def compact_fallbacks(self) -> dict[str, int]:
        """Why a decode call left the compact path for reserve_attention (reason -> calls)."""
        return self._decode.fallbacks

    @property
    def max_new_tokens(self) -> int | None:
        return self._max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int | None) -> None:
        self._max_new_tokens = (
            None if value is None else check_int("max_new_tokens", value, minimum=0)
        )

    # ----------------------------------------------------------------------------------------
    # set-up and validation

    @staticmethod
    def _check_scorer(scorer: object, config, n_layers: int) -> None:
        if not isinstance(scorer, ChunkScorer):
            raise TypeError(
                "scorer must implement lsa.scorers.ChunkScorer (chunk_size, target_layers, "
                f"encode_chunks, score), got {type(scorer).__name__}"
            )
        layers = tuple(scorer.target_layers)
        if not layers:
            raise ValueError("scorer.target_layers is empty: the scorer must read >= 1 layer")
        bad = [i for i in layers if not isinstance(i, Integral) or not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"scorer.target_layers {layers} do not exist in the model: it has {n_layers} "
                f"decoder layers (0..{n_layers - 1}), got {bad}"
            )
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        model_dims = {
            "hidden_size": config.hidden_size,
            "head_dim": head_dim,
            "num_key_value_heads": getattr(
                config, "num_key_value_heads", config.num_attention_heads
            ),
        }
        # where a scorer may state them: as attributes, or on its .config (LightningIndexer)
        aliases = {
            "hidden_size": ("hidden_size",),
            "head_dim": ("head_dim", "kv_head_dim"),
            "num_key_value_heads": ("num_key_value_heads", "kv_heads"),
        }
        for name, want in model_dims.items():
            for owner, prefix in ((scorer, "scorer"), (getattr(scorer, "config", None), "config")):
                for alias in aliases[name]:
                    got = getattr(owner, alias, None) if owner is not None else None
                    if isinstance(got, Integral) and got != want:
                        where = "scorer." + ("config." if prefix == "config" else "") + alias
                        raise ValueError(
                            f"{where} ({got}) does not match the model's {name} ({want}): the "
                            "scorer was built for another model"
                        )

    def _new_request(self) -> None:
        """Forget every per-request state (tensors are freed; hooks and settings stay)."""
        self.phase = "empty"  # "empty" -> (prefill) -> "decoding"
        self.seq_len = 0  # physical tokens (padding included), as a DynamicCache counts them
        self.batch = 0
        self.pad: list[int] = []
        self.kv_len_host: list[int] = []
        self.kv_len: torch.Tensor | None = None  # device int32 [B]
        self.n_slots = 0
        self.bt_host: torch.Tensor | None = None  # cpu int32 [B, n_slots], the truth
        self.block_table: torch.Tensor | None = None  # device int32 [B, 1, n_slots]
        self.slot_of: list[dict[int, int]] = []
        self.n_kept: list[int] = []  # per row, kept (complete) chunks: they fill slots 0..n-1
        self.tail_first: list[int] = []  # per row, first chunk of the tail (slot n_kept[b])
        self.visible: list[int] = []  # per row, tokens a decode query sees (a reserve prefix)
        self.mirror: HostMirror | None = None
        self._decode.reset()
        self.decode_step = 0
        self.hidden: dict[int, torch.Tensor] = {}  # what the next refresh reads
        self._captures: dict[int, dict[int, torch.Tensor]] = {}  # thread -> layer -> [B, hidden]
        self.chunk_keys: dict[int, torch.Tensor] = {}
        self.refreshes: list[RefreshRecord] = []
        self._pending: Selection | None = None  # a lagged refresh's set, not yet placed
        #: reserve reallocations: (decode step, new n_slots, "refresh" or "decode")
        self.grows: list[tuple[int, int, str]] = []
        self._ingested: set[int] = set()
        self._next_layer = 0
        self._rows: torch.Tensor | None = None
        self._tail_slot: torch.Tensor | None = None  # device long [B], slot of the chunk written
        self._tail_slot_host: list[int] = []
        self._write_tok: torch.Tensor | None = None
        self._completing: list[tuple[int, int, int]] = []
        self._continues = False
        self.__dict__["_user_defined"] = False
        # Fault state. A forward through the cache is "open" from its layer 0 until its last
        # attention (and refresh) returns; one still open when the next starts, or when the
        # mirror is read, died half-way.
        self._open: str | None = None  # "prefill" or "decode" while a forward runs
        self._owner: int | None = None  # the thread running the open forward
        # (kv_len_host, seq_len, decode_step) before the open decode step, until its token is
        # stored in every layer: what a step that dies before that rolls back to
        self._good: tuple[list[int], int, int] | None = None
        self._refreshing: str | None = None  # the refresh's stage while one runs
        self._tail_in_mirror = False  # the mirror holds every written token (no tail to copy)
        self._broken: str | None = None  # why this request cannot continue
        self._slot_cap: int | None = None  # the reserve's worst case (max_new_tokens given)
        self._static: StaticDecode | None = None  # set by begin_static (lsa.generate)
        #: the prompt's zero-copy mirror writes (see _plan_prefill_writes); None = not planned
        self._prefill_writes: tuple | bool | None = None

    def begin_static(self, max_new_tokens: int) -> StaticDecode:
        """Switch this request, right after its prefill, to static-shape decode steps that a CUDA
        graph can capture (:mod:`lsa.cache.static`); :func:`lsa.generate` drives them. The
        reserve is allocated once for ``max_new_tokens`` more tokens."""
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if self._open is not None or self._broken is not None:
            raise RuntimeError(self._interrupted_message())
        if self._tokens is not None:  # a replayed step runs no Python to record ids
            raise NotImplementedError("static decode does not record token ids for the scorer")
        self._static = StaticDecode(self, max_new_tokens)
        return self._static

    def end_static(self) -> None:
        """Back to eager decode steps (the completed chunks reach the mirror first)."""
        if self._static is not None:
            self._static.finish()
            self._static.ready()
            self._static = None

    def reset(self) -> None:
        """Drop the request: the next forward must be a new prefill. Settings and hooks stay.
        This is also how a cache left mid-request by an error becomes usable again."""
        if self._busy_elsewhere():
            raise RuntimeError(f"{_BUSY}; reset() after it")
        if self._stream is not None:
            self._stream.synchronize()
        for layer in self.layers:
            layer.reset()
        self.recall_stats = RecallStats()
        self._new_request()

    def close(self) -> None:
        """Stop capturing hidden states for this cache (the shared hook leaves the model with its
        last cache); the cache is unusable afterwards. Dropping a cache without ``close()``
        leaves nothing behind either, once it is garbage-collected."""
        capture.detach(self, list(self._capture_modules.values()))
        if self._tokens is not None:
            self._tokens.close()
        self._closed = True

    # generate() marks a cache passed by the user with `_is_user_defined = True` at the start of
    # every call: the moment to refuse a cache that still holds another request.
    @property
    def _is_user_defined(self) -> bool:
        return self.__dict__.get("_user_defined", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        if value and (self.phase != "empty" or self._ingested) and not self._continues:
            raise ValueError(self._reuse_message())
        self._continues = False  # load_prefill() allows exactly one generate() to continue
        self.__dict__["_user_defined"] = value

    def _reuse_message(self) -> str:
        if self._busy_elsewhere():
            return _BUSY
        if self._open is not None or self._broken is not None:
            return self._interrupted_message()
        return (
            f"this LSACache already holds a request ({self.seq_len} tokens, batch {self.batch}); "
            "call cache.reset() before using it for another request (continuing a request with "
            "a multi-token input is not supported)"
        )

    def _interrupted_message(self) -> str:
        why = self._broken or self._why_open()
        return (
            f"this LSACache's request cannot continue: {why}. Call cache.reset() before the next "
            "request (cache.mirror_kv() still gives every token stored so far)"
        )

    def _why_open(self) -> str:
        where = "the prefill" if self._open == "prefill" else f"decode step {self.decode_step}"
        if self._refreshing is not None:
            where += f" (in its refresh, {self._refreshing})"
        return f"the forward of {where} did not finish"

    def _start_forward(self, kind: str) -> None:
        """Before layer 0 of a forward: refuse one the cache cannot run, then open it."""
        if self._closed:
            raise RuntimeError(
                "this LSACache was closed (close() stopped its hidden-state capture); create a "
                "new LSACache"
            )
        me = threading.get_ident()
        with _claim:
            if self._busy_elsewhere():
                raise RuntimeError(_BUSY)
            if self._open is not None or self._broken is not None:
                raise RuntimeError(self._interrupted_message())
            self._open, self._owner = kind, me
        self._good = (list(self.kv_len_host), self.seq_len, self.decode_step)
        self.hidden = self._captures.setdefault(me, {})

    def _capture_hidden(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """The shared forward pre-hook's catch (:mod:`lsa.cache.capture`): the attention input
        of the last token. Kept per thread: a forward that another thread starts on this cache
        runs the hook before its layer 0 refuses it, and must not overwrite the running one's."""
        captured = hidden[:, -1].detach().clone()
        self._captures.setdefault(threading.get_ident(), {})[layer_idx] = captured

    def _busy_elsewhere(self) -> bool:
        """Whether another thread runs a forward through this cache now (one that died in its
        thread does not count: the thread is gone)."""
        return (
            self._open is not None and self._owner != threading.get_ident() and _alive(self._owner)
        )

    def _end_forward(self) -> None:
        self._open = self._owner = self._good = None

    def _annotate(self, exc: BaseException, doing: str) -> None:
        """Say on an error escaping a forward what the cache was doing (the error itself, and
        its type, reach the user unchanged)."""
        if self._open is None or any(
            note.startswith("LSACache:") for note in getattr(exc, "__notes__", ())
        ):
            return
        step = "the prefill" if self._open == "prefill" else f"decode step {self.decode_step}"
        if self._refreshing is not None:
            doing = f"refreshing the resident chunks ({self._refreshing})"
        exc.add_note(
            f"LSACache: raised while {doing} in {step}; this request cannot continue: call "
            "cache.reset() (cache.mirror_kv() still gives every token stored so far)"
        )

    def _abandon(self) -> None:
        """Close a forward that died half-way: forget its token unless every layer stored it,
        and make the mirror hold every token stored in every layer (from the reserve's tail,
        unless a refresh had begun: it copied the tail to the mirror first)."""
        self._broken = self._why_open()
        if self._open == "decode" and self._good is not None:
            kv_len, self.seq_len, self.decode_step = self._good
            self.kv_len_host = list(kv_len)
        if self.phase == "decoding" and not self._tail_in_mirror:
            self._mirror_partial()
        self._tail_in_mirror = True
        self._refreshing = None
        self._end_forward()

    # ----------------------------------------------------------------------------------------
    # transformers Cache interface

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new K/V [B, H_kv, S, D]; return what the "lsa" attention reads."""
        if self._static is not None:  # a static-shape step (lsa.generate): device work only
            return self._static.update(key_states, value_states, self.layers[layer_idx])
        if layer_idx == 0:
            self._begin_forward(key_states)
        try:
            return self._update(key_states, value_states, layer_idx)
        except BaseException as exc:
            self._annotate(exc, f"storing the K/V of layer {layer_idx}")
            raise

    def _begin_forward(self, key_states: torch.Tensor) -> None:
        """Layer 0 of a forward: refuse what cannot run, then open the forward (and, for a new
        request, run the pre-flight memory check)."""
        if self.phase == "empty":
            impl = getattr(self._model_config, "_attn_implementation", None)
            if impl != ATTN_IMPLEMENTATION:
                raise ValueError(
                    f"the model runs attn_implementation={impl!r}; LSACache needs "
                    f"{ATTN_IMPLEMENTATION!r}: call model.set_attn_implementation('lsa')"
                )
            self._start_forward("prefill")
            try:
                self._preflight(key_states)
            except BaseException:
                self._end_forward()  # nothing was stored: the cache stays usable
                raise
            return
        if key_states.shape[2] != 1:
            raise ValueError(self._reuse_message())
        if key_states.shape[0] != self.batch:
            raise ValueError(
                f"batch size changed from {self.batch} to {key_states.shape[0]} mid-request; "
                "call cache.reset() for a new request"
            )
        self._start_forward("decode")
        if self.max_new_tokens is not None and self.decode_step >= self.max_new_tokens:
            self._end_forward()  # refused before anything changed
            raise ValueError(
                f"this request outgrew LSACache(max_new_tokens={self.max_new_tokens}): decode "
                f"step {self.decode_step + 1} would pass the prompt + max_new_tokens tokens per "
                "row that the pre-flight check reserved; pass a larger max_new_tokens (or None)"
            )

    def _update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if self.phase == "empty":
            if layer_idx in self._ingested:
                raise RuntimeError(
                    f"layer {layer_idx} is prefilled a second time: a previous prefill did not "
                    "finish; call cache.reset()"
                )
            hand_over(layer, key_states, "prefill")
            return key_states, value_states
        if layer_idx != self._next_layer:
            raise RuntimeError(
                f"LSACache expected layer {self._next_layer} next, got layer {layer_idx}"
            )
        self._next_layer = (layer_idx + 1) % self.num_layers
        if layer_idx == 0:
            self._begin_decode_step()
        if layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None
        b, h, _, d = key_states.shape
        rk = layer.reserve_k.view(b, h, self.n_slots * self.chunk_size, d)
        rv = layer.reserve_v.view(b, h, self.n_slots * self.chunk_size, d)
        rk[self._rows, :, self._write_tok] = key_states[:, :, 0]
        rv[self._rows, :, self._write_tok] = value_states[:, :, 0]
        if self._completing:
            self._complete_chunks(layer)
        if layer_idx == self.num_layers - 1:
            self._good = None  # the step's token is stored in every layer: nothing to undo
        hand_over(layer, rk, "decode")
        return rk, rv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        # transformers < 5.2x passes cache_position (a tensor) here, later ones the query length;
        # a tensor sum would make the mask code read it back from the device (a host sync)
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seq_len + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    # ----------------------------------------------------------------------------------------
    # prefill

    def _preflight(self, key: torch.Tensor) -> None:
        """Before a request's first forward stores anything, when ``max_new_tokens`` is known:
        check that the host mirror for the whole request (prompt + ``max_new_tokens``, every
        row) and the device reserve at its worst case fit in the memory available now
        (:class:`CacheMemoryError` if not). The mirror is then allocated for the whole request at
        the prefill; the reserve grows up to that worst case, never past it. Without
        ``max_new_tokens`` nothing is checked: the prompt's mirror is allocated at once anyway,
        and the host's MemAvailable can understate what a VM grows into."""
        self._slot_cap = None
        new = self.max_new_tokens
        if new is None:
            return
        b_size, heads_kv, s, head_dim = key.shape
        tokens = s + new  # the padded length bounds every row's logical length
        chunk_bytes = (
            self.num_layers * 2 * heads_kv * self.chunk_size * head_dim * key.dtype.itemsize
        )
        slots = self._worst_case_slots(tokens)
        # a lagged refresh stages its new chunks before placing them: at worst a whole set
        staged = slots if self.recall_lag else 0
        check_request(
            needs=[
                (
                    self.host_device,
                    "the host mirror",
                    b_size * -(-tokens // self.chunk_size) * chunk_bytes,
                    "",
                ),
                (
                    self.device,
                    "the device reserve",
                    b_size * (slots + staged) * chunk_bytes,
                    f"worst case {slots} chunks a row"
                    + (f" and {staged} staged by a lagged refresh" if staged else ""),
                ),
            ],
            request=f"batch {b_size}, {s} prompt + {new} new tokens, {self.num_layers} layers",
        )
        self._slot_cap = slots

    def _worst_case_slots(self, tokens: int) -> int:
        """The most reserve slots a row of ``tokens`` logical tokens can need at these settings."""
        return worst_case_slots(
            tokens=tokens,
            chunk_size=self.chunk_size,
            budget=self.budget,
            sink_chunks=self.sink_chunks,
            recent_chunks=self.recent_chunks,
            refresh_every=self.refresh_every,
            recall_lag=self.recall_lag,
        )

    def ingest_prefill(
        self,
        layer: LSALayer,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """After the dense prefill attention of ``layer``: prompt K/V [B, H, S, D] -> mirror."""
        try:
            self._ingest_prefill(layer, key, value, attention_mask)
        except BaseException as exc:
            self._annotate(exc, f"storing the prompt of layer {layer.layer_idx} in the mirror")
            raise

    def _ingest_prefill(
        self,
        layer: LSALayer,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        if not self._ingested:
            self._start_request(key, attention_mask)
        cs = self.chunk_size
        b_size, h, s, d = key.shape
        if self.mirror is None:
            self.mirror = HostMirror(
                b_size,
                self.num_layers,
                h,
                cs,
                d,
                key.dtype,
                device=self.host_device,
                pin=self.pin,
            )
            # one segment: the prompt, or the whole request when max_new_tokens is known
            longest = max([*self.kv_len_host, 1]) + (self.max_new_tokens or 0)
            self.mirror.ensure(-(-longest // cs))
        self.mirror.check_layer(layer.layer_idx, h, d, key.dtype)
        if self._prefill_writes is None:
            self._prefill_writes = self._plan_prefill_writes(key.device)
        if self._prefill_writes:
            self._write_prompt_zero_copy(layer, key, value)
        for b in range(b_size):
            n = self.kv_len_host[b]
            n_chunks = -(-n // cs)
            if n == 0:
                continue
            pad = self.pad[b]
            if not self._prefill_writes:
                kv = key.new_zeros((2, h, n_chunks * cs, d))
                kv[0, :, :n] = key[b, :, pad:]
                kv[1, :, :n] = value[b, :, pad:]
                kv = kv.view(2, h, n_chunks, cs, d).permute(2, 0, 1, 3, 4).contiguous()
                self.mirror.write_chunks(b, 0, layer.layer_idx, kv)  # [n_chunks, 2, H, cs, D]
            full = n // cs
            if layer.layer_idx in self.target_layers and full > 0:
                start = torch.arange(full, device=key.device)[None] * cs
                keys = key[b : b + 1, :, pad : pad + full * cs]
                self._store_chunk_keys(layer.layer_idx, [b], [0], keys, start, full)
        self._ingested.add(layer.layer_idx)
        if len(self._ingested) == self.num_layers:
            self.phase = "decoding"
            self.seq_len = s
            self.decode_step = 0
            self._next_layer = 0
            self._refresh()  # for decode step 1, overlapping the rest of the prefill forward
            self._end_forward()

    def _plan_prefill_writes(self, device: torch.device) -> tuple | bool:
        """Where each prompt chunk goes, for :func:`lsa.cache.zero_copy.zero_copy_write`: device
        int64 (addresses, rows, first source token, tokens) shared by every layer. False where
        the prompt goes through plain copies: a mirror that is not pinned host memory, unless
        ``recall="zero_copy"`` asked for kernels over the mirror (Triton's interpreter on CPU)."""
        pinned = self.pin and zero_copy_unavailable(self.device) is None
        if not (pinned or self.recall == "zero_copy"):
            return False
        cs = self.chunk_size
        items = [
            (b, c, self.pad[b] + c * cs, min(cs, n - c * cs))
            for b, n in enumerate(self.kv_len_host)
            for c in range(-(-n // cs))
        ]
        if not items:
            return False
        t = torch.tensor(items, dtype=torch.int64).T.contiguous()
        addresses = self.mirror.chunk_addresses(t[0], t[1])
        return tuple(x.to(device) for x in (addresses, t[0], t[2], t[3]))

    def _write_prompt_zero_copy(self, layer: LSALayer, key: torch.Tensor, value: torch.Tensor):
        """One layer's prompt K/V -> the pinned mirror by one kernel each, on the side stream:
        the copy overlaps the next layers' compute (the eager copy went through a pageable host
        temporary and stalled the prefill, 2.8x dense at 128K)."""
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            zero_copy_write(
                (key, value), layer.layer_idx, *self._prefill_writes, chunk_size=self.chunk_size
            )
        if stream is not None:
            key.record_stream(stream)
            value.record_stream(stream)

    def load_prefill(
        self,
        keys_values: list[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor | None,
        hidden: dict[int, torch.Tensor],
        input_ids: torch.Tensor | None = None,
    ) -> None:
        """Take a prompt whose dense prefill ran elsewhere, as if it had run through this cache.

        The prefill is dense and exact in either case, so one prefill can serve several caches
        (the evaluation shares it between methods). Afterwards, one ``generate()`` call may
        continue the request: pass it the prompt plus the first answer token (taken from the
        prefill's logits) and the attention mask grown by one column.

        Args:
            keys_values: per decoder layer, the prompt's post-RoPE K and V [B, H_kv, S, D] (e.g.
                a ``DynamicCache``'s layers after ``model(prompt, past_key_values=...)``).
            attention_mask: [B, S] (1 = token, left padding only) or None.
            hidden: the attention input of the prompt's last token [B, hidden_size] for at least
                the scorer's target layers (forward pre-hooks on the attention modules).
            input_ids: [B, S], the prompt's token ids (left padded like ``attention_mask``);
                needed by a scorer that reads token ids, ignored otherwise.
        """
        if self.phase != "empty" or self._ingested:
            raise ValueError(self._reuse_message())
        if len(keys_values) != self.num_layers:
            raise ValueError(
                f"keys_values has {len(keys_values)} layers, the model has {self.num_layers}"
            )
        missing = [i for i in self.target_layers if i not in hidden]
        if missing:
            raise ValueError(f"hidden lacks the scorer's target layers {missing}")
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != keys_values[0][0].shape[::2]:
                raise ValueError(
                    f"attention_mask must be [B, S] = {tuple(keys_values[0][0].shape[::2])}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            mask = attention_mask.bool()[:, None, None, :]  # the last query row of a 4-D mask
        self._start_forward("prefill")
        try:
            self._preflight(keys_values[0][0])
        except BaseException:
            self._end_forward()
            raise
        self.hidden = {i: hidden[i] for i in self.target_layers}
        if self._tokens is not None:  # no forward ran, so no hook caught them
            self._tokens.pending = None if input_ids is None else input_ids.detach().cpu()
        for i, (key, value) in enumerate(keys_values):
            layer = self.layers[i]
            if not layer.is_initialized:
                layer.lazy_initialization(key, value)
            self.ingest_prefill(layer, key, value, mask)  # the last one issues the refresh
        self._continues = True

    def _start_request(self, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        b_size, _, s, _ = key.shape
        self.batch = b_size
        self.pad = self._left_padding(mask, b_size, s)
        self.kv_len_host = [s - p for p in self.pad]
        self.kv_len = torch.tensor(self.kv_len_host, dtype=torch.int32, device=self.device)
        self._rows = torch.arange(b_size, device=self.device)
        self.slot_of = [{} for _ in range(b_size)]
        self.n_kept = [0] * b_size
        self.tail_first = [0] * b_size
        self.visible = [0] * b_size
        self._tail_slot_host = [-1] * b_size
        if self._tokens is not None:
            self._tokens.start(self.pad)

    @staticmethod
    def _left_padding(mask: torch.Tensor | None, b_size: int, s: int) -> list[int]:
        """Padding per row from the prefill mask: the keys the last prompt token may see."""
        if mask is None:
            return [0] * b_size
        last = mask[:, 0, -1, -s:]
        visible = last if last.dtype == torch.bool else last == 0
        visible = visible.expand(b_size, s).cpu()
        pads = []
        for b in range(b_size):
            n = int(visible[b].sum())
            pad = s - n
            if not bool(visible[b, pad:].all()):
                raise ValueError(
                    f"LSACache supports left padding only: row {b}'s attention mask is not a run "
                    "of zeros followed by ones"
                )
            pads.append(pad)
        return pads

    # ----------------------------------------------------------------------------------------
    # decode

    def _begin_decode_step(self) -> None:
        """Before layer 0 of a decode step: find each row's write slot."""
        cs = self.chunk_size
        if self._pending is not None and self._pending.step == self.decode_step + 1:
            self._apply_pending()
        # a chunk that begins takes the tail's next slot; grow first, so that a failed
        # allocation leaves every count and slot as it was
        top = max(
            (
                self.n_kept[b] + n // cs - self.tail_first[b]
                for b, n in enumerate(self.kv_len_host)
                if n // cs not in self.slot_of[b]
            ),
            default=-1,
        )
        if top >= self.n_slots:
            self._grow_to(top + 1, "decode")
        self.decode_step += 1
        if self._tokens is not None:
            self._tokens.append()
        self._decode.new_step()
        new_rows, new_slots = [], []
        table_changed = False
        self._completing = []
        for b in range(self.batch):
            pos = self.kv_len_host[b]
            c, off = divmod(pos, cs)
            if c not in self.slot_of[b]:  # a new chunk begins: the tail's next slot
                slot = self.n_kept[b] + c - self.tail_first[b]
                self.slot_of[b][c] = slot
                self.bt_host[b, slot] = c
                table_changed = True
            slot = self.slot_of[b][c]
            if slot != self._tail_slot_host[b]:
                self._tail_slot_host[b] = slot
                new_rows.append(b)
                new_slots.append(slot)
            if off == cs - 1:
                self._completing.append((b, c, slot))
            self.kv_len_host[b] = pos + 1
            self.visible[b] = self.n_kept[b] * cs + pos + 1 - self.tail_first[b] * cs
        if table_changed:
            self._push_block_table()
        if new_rows:
            rows = self._to_device(torch.tensor(new_rows, dtype=torch.long))
            self._tail_slot[rows] = self._to_device(torch.tensor(new_slots, dtype=torch.long))
        # position (before this token) -> reserve token index, on the device
        self._write_tok = self._tail_slot * cs + (self.kv_len.long() % cs)
        self.kv_len += 1
        self.seq_len += 1

    def decode_attention(
        self,
        layer: LSALayer,
        query: torch.Tensor,
        k_reserve: torch.Tensor,
        v_reserve: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention of one decode step over the reserve; returns [B, S_q, H_q, D].

        After the last layer, issues the refresh for the next step when one is due, so that its
        recall overlaps the rest of this forward (same hidden states, same state as at the start
        of the next step).
        """
        if self._static is not None:  # the caller (lsa.generate) refreshes between steps
            return self._static.attention(query, k_reserve, v_reserve, scaling)
        try:
            out = self._decode_attention(query, k_reserve, v_reserve, scaling)
            if layer.layer_idx == self.num_layers - 1:
                if self.decode_step % self.refresh_every == 0:
                    self._refresh()
                self._end_forward()
        except BaseException as exc:
            self._annotate(exc, f"the decode attention of layer {layer.layer_idx}")
            raise
        return out

    def _decode_attention(
        self,
        query: torch.Tensor,
        k_reserve: torch.Tensor,
        v_reserve: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        return self._decode(self, query, k_reserve, v_reserve, scaling)

    def _complete_chunks(self, layer: LSALayer) -> None:
        """Chunks whose last token was just written: copy to the mirror, encode if a target."""
        rows, chunks, keys = [], [], []
        for b, c, slot in self._completing:
            kv = torch.stack([layer.reserve_k[b, :, slot], layer.reserve_v[b, :, slot]])
            self.mirror.write_chunks(b, c, layer.layer_idx, kv[None])
            rows.append(b)
            chunks.append(c)
            keys.append(layer.reserve_k[b, :, slot])
        if layer.layer_idx in self.target_layers:
            start = self._to_device(torch.tensor(chunks))[:, None] * self.chunk_size
            self._store_chunk_keys(layer.layer_idx, rows, chunks, torch.stack(keys), start, 1)

    def _store_chunk_keys(
        self,
        layer_idx: int,
        rows: list[int],
        first: list[int],
        keys: torch.Tensor,
        start: torch.Tensor,
        n: int,
    ) -> None:
        """Encode ``n`` chunks per given row (keys [len(rows), H, n*cs, D]) and store them."""
        extra = {} if self._tokens is None else {"token_ids": self._tokens.view(rows)}
        with torch.no_grad():
            ck = self.scorer.encode_chunks(layer_idx, keys, start, **extra)
        if not isinstance(ck, torch.Tensor) or ck.dim() != 3 or ck.shape[:2] != (len(rows), n):
            got = tuple(ck.shape) if isinstance(ck, torch.Tensor) else type(ck).__name__
            raise ValueError(
                f"scorer.encode_chunks(layer={layer_idx}) must return [{len(rows)}, {n}, "
                f"key_dim] for keys of shape {tuple(keys.shape)}, got {got}: do the scorer's "
                "dims match the model?"
            )
        ck = ck.detach().to(self.device)
        store = self.chunk_keys.get(layer_idx)
        need = max(first) + n
        if store is None or store.shape[1] < need or store.shape[2] != ck.shape[2]:
            if store is not None and store.shape[2] != ck.shape[2]:
                raise ValueError(
                    f"scorer.encode_chunks(layer={layer_idx}) changed key_dim from "
                    f"{store.shape[2]} to {ck.shape[2]}"
                )
            cap = max(need, 2 * (store.shape[1] if store is not None else 0), 16)
            grown = ck.new_zeros((self.batch, cap, ck.shape[2]))
            if store is not None:
                grown[:, : store.shape[1]] = store
            store = self.chunk_keys[layer_idx] = grown
        for i, (b, c) in enumerate(zip(rows, first, strict=True)):
            store[b, c : c + n] = ck[i]

    # ----------------------------------------------------------------------------------------
    # inspection

    def flush(self) -> None:
        """Copy each row's partially written last chunk to the mirror and wait for all copies;
        afterwards :meth:`mirror_kv` holds every token. (Completed chunks reach the mirror as
        soon as they complete; the chunk being written lives in the device tail until then.)

        After a forward that did not finish (an error, an interrupt) the request is closed here:
        the mirror then holds exactly the tokens that were stored in every layer."""
        if self._busy_elsewhere():
            raise RuntimeError(f"{_BUSY}; flush() after it")
        if self._open is not None:
            self._abandon()
        if self.phase != "decoding":
            return
        if not self._tail_in_mirror:
            self._mirror_partial()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mirror_partial(self) -> None:
        """Copy each row's partial last chunk (its tokens live in the reserve's tail only), all
        layers, to the mirror: one copy per row into the chunk's contiguous mirror block."""
        cs = self.chunk_size
        rows = [
            (b, n // cs, self.slot_of[b][n // cs])
            for b, n in enumerate(self.kv_len_host)
            # no partial chunk, or it is still the prompt's (mirrored, not yet resident)
            if n % cs and n // cs in self.slot_of[b]
        ]
        if not rows:
            return
        for layer in self.layers:
            if layer.ready is not None:  # a recall still writing this layer's slots
                torch.cuda.current_stream(self.device).wait_event(layer.ready)
                layer.ready = None
        for b, c, slot in rows:
            kv = torch.stack(
                [t[b, :, slot] for layer in self.layers for t in (layer.reserve_k, layer.reserve_v)]
            )
            self.mirror.ensure(c + 1)
            block = self.mirror.chunk(b, c)  # [L, 2, H, cs, D], contiguous
            block.copy_(kv.view(block.shape), non_blocking=self.pin)

    def mirror_kv(self, layer_idx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row, the layer's full logical K/V history from the mirror: ([H, n, D], [H, n, D]).

        Row ``b`` equals a DynamicCache's ``keys[b, :, pad_b:]`` for the same inputs."""
        self.flush()
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range (0..{self.num_layers - 1})")
        if self.mirror is None:
            return []
        if self.phase == "empty":
            raise RuntimeError(
                f"the prefill did not finish ({len(self._ingested)} of {self.num_layers} layers "
                "stored): the mirror holds no complete prompt; call cache.reset()"
            )
        return [self.mirror.tokens(b, layer_idx, n) for b, n in enumerate(self.kv_len_host)]

    def resident_chunks(self) -> list[list[int]]:
        """Per row, the logical chunks now in the reserve (resident set + tail), sorted."""
        return [sorted(s) for s in self.slot_of]

    def footprint(self) -> Footprint:
        """Device and host bytes from real storage sizes, against a dense DynamicCache."""

        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.untyped_storage().nbytes()

        reserve = sum(layer.device_nbytes() for layer in self.layers)
        tail_slots = sum(
            1
            for b in range(self.batch)
            for c in self.slot_of[b]
            if c >= self.tail_first[b] and self.phase == "decoding"
        )
        slot_bytes = sum(
            2 * layer.heads_kv * self.chunk_size * layer.head_dim * layer.dtype.itemsize
            for layer in self.layers
            if layer.dtype is not None
        )
        host = self.mirror.nbytes() if self.mirror is not None else 0
        dense = sum(
            2 * self.batch * layer.heads_kv * self.seq_len * layer.head_dim * layer.dtype.itemsize
            for layer in self.layers
            if layer.dtype is not None
        )
        cs = self.chunk_size
        return Footprint(
            reserve_bytes=reserve,
            tail_bytes=tail_slots * slot_bytes,
            block_table_bytes=nbytes(self.block_table),
            chunk_key_bytes=sum(nbytes(t) for t in self.chunk_keys.values()),
            other_device_bytes=nbytes(self.kv_len) + nbytes(self._tail_slot),
            host_bytes=host,
            dense_bytes=dense,
            resident_chunks=tuple(len(s) for s in self.slot_of),
            total_chunks=tuple(-(-n // cs) for n in self.kv_len_host),
        )

    def __repr__(self) -> str:
        return (
            f"LSACache(layers={self.num_layers}, budget={self.budget}, threshold="
            f"{self.threshold}, refresh_every={self.refresh_every}, chunk_size={self.chunk_size}, "
            f"phase={self.phase!r}, seq_len={self.seq_len})"
        )


def _alive(ident: int | None) -> bool:
    """Whether the thread of this ident still runs (one that died mid-forward no longer owns it)."""
    return ident is not None and any(t.ident == ident for t in threading.enumerate())
