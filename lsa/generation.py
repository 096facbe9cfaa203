"""Greedy generation with a graph-captured decode step (gpt-fast style), for LSACache or a
static dense cache.

``model.generate`` runs every decode step as eager Python: at long context most of a step is
kernel launches and bookkeeping, not memory traffic. Here the prefill runs eagerly, then the
one-token forward (model, cache writes, attention, greedy pick, feeding the pick back) is captured
once in a CUDA graph and replayed; between replays only the host bookkeeping of
:class:`lsa.cache.static.StaticDecode` runs, and every τ steps the refresh (scoring, selection,
recall on its side stream), which writes into the tensors the graph reads. The same loop with
``graph=False`` runs the identical step eagerly (the CPU path; tests compare it with
``model.generate``).

Usage::

    cache = lsa.LSACache(model, indexer, budget=0.1)
    out = lsa.generate(model, input_ids, cache=cache, max_new_tokens=256)  # [B, S + new]

A transformers ``StaticCache`` (with ``max_cache_len`` >= prompt + new tokens) works too: the
dense baseline captured by the same loop.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from lsa._validation import check_int
from lsa.cache.cache import LSACache
from lsa.cache.model import cache_kwarg

#: decode steps between checks whether every row has stopped (each check is a host sync)
STOP_CHECK_EVERY = 64


@dataclass
class GenerateStats:
    """What one :func:`generate` call did: times in seconds (host clock after a device sync)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    captures: int = 0  # CUDA graphs captured (1 for a whole generation when nothing reallocates)
    refreshes: int = 0
    #: host time spent issuing refreshes between replays (no device sync: a lagged refresh's
    #: copies run on behind the replays; their cost shows in replay_s)
    refresh_s: float = 0.0
    replays: int = 0  # steps run by replaying the captured graph
    replay_s: float = 0.0  # from the first replay to the end (refreshes between them included)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.decode_s if self.decode_s > 0 else 0.0


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [
        int(e) for e in (eos_token_id if isinstance(eos_token_id, list | tuple) else [eos_token_id])
    ]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    cache,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    graph: bool | None = None,
    stats: GenerateStats | None = None,
) -> torch.Tensor:
    """Greedy decoding of ``max_new_tokens`` tokens; returns ``[B, S + n]`` like
    ``model.generate`` (rows that stopped are filled with ``pad_token_id``; generation ends
    early, at the next refresh or check, once every row has stopped).

    Args:
        input_ids: [B, S] prompt, left-padded where ``attention_mask`` has zeros.
        cache: an empty :class:`lsa.LSACache`, or a transformers ``StaticCache``.
        graph: capture the decode step in a CUDA graph (default: on CUDA); False runs the same
            static step eagerly.
        stats: filled with timings and counts when given.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got {type(input_ids).__name__}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    device = input_ids.device
    if graph is None:
        graph = device.type == "cuda"
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True needs CUDA tensors, got input_ids on {device}")
    stats = stats if stats is not None else GenerateStats()
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    b_size, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lsa_cache = isinstance(cache, LSACache)
    kwarg = cache_kwarg(model)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    own_limit = cache.max_new_tokens if lsa_cache else None
    if own_limit is not None and own_limit < max_new_tokens:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) exceeds the cache's max_new_tokens ({own_limit})"
        )

    timer = _Timer(device)
    # -- prefill (eager) --------------------------------------------------------------------
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    extra = {"cache_position": torch.arange(s, device=device)} if takes_cache_position else {}
    if lsa_cache:
        # the whole request's mirror is allocated (and checked) at the prefill: a mirror that
        # grows mid-decode pins new host memory, a stall of hundreds of ms at long context
        cache.max_new_tokens = max_new_tokens
    try:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{kwarg: cache},
            **extra,
        ).logits[:, -1]
    finally:
        if lsa_cache:
            cache.max_new_tokens = own_limit
    stats.prefill_s = timer.lap()

    # -- static buffers the decode step reads and writes in place -----------------------------
    out = torch.full((b_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    first = logits.argmax(-1)
    out[:, 0] = first
    eos_t = torch.tensor(eos or [-1], device=device)
    unfinished = ~_is_eos(first, eos_t)
    ids = first[:, None].clone()
    dense_mask = None
    pos = positions[:, -1:] + 1
    cache_position = torch.full((1,), s, dtype=torch.long, device=device)
    step_idx = torch.ones(1, dtype=torch.long, device=device)
    static = cache.begin_static(max_new_tokens - 1) if lsa_cache else None
    extra = {"cache_position": cache_position} if takes_cache_position else {}
    if not lsa_cache:
        # A dense static cache holds max_cache_len slots, most of them empty: a 4-D mask (passed
        # through as it is) hides them; transformers would otherwise drop the mask of a one-token
        # query, or check a 2-D one on the host, which a captured step cannot do.
        length = _max_cache_len(cache)
        extra["attention_mask"] = dense_mask = torch.zeros(
            (b_size, 1, 1, length), dtype=torch.bool, device=device
        )
        dense_mask[:, 0, 0, :s] = attention_mask.bool()

    def step() -> None:
        if dense_mask is not None:  # the new token's slot becomes visible
            dense_mask.index_fill_(-1, cache_position, True)
        logits = model(
            input_ids=ids,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{kwarg: cache},
            **extra,
        ).logits[:, -1]
        nxt = torch.where(unfinished, logits.argmax(-1), pad_token_id)
        out.scatter_(1, step_idx.expand(b_size, 1), nxt[:, None])
        unfinished.logical_and_(~_is_eos(nxt, eos_t))
        ids.copy_(nxt[:, None])
        pos.add_(1)
        cache_position.add_(1)
        step_idx.add_(1)

    captured = None
    first_replay = None
    n = 1
    try:
        while n < max_new_tokens:
            if static is not None and static.refresh_due():
                t0 = time.perf_counter()
                static.refresh()
                stats.refreshes += 1
                stats.refresh_s += time.perf_counter() - t0
            if n % STOP_CHECK_EVERY == 0 and not bool(unfinished.any()):
                break  # a host sync: only every STOP_CHECK_EVERY steps
            if static is not None:
                static.host_step()
            if not graph or n < 3:
                step()  # eager: the first steps warm up kernels (Triton compiles) before capture
            else:
                if captured is None:
                    captured = _capture(step, device)
                    stats.captures += 1
                    first_replay = timer.now()
                captured.replay()
                stats.replays += 1
            n += 1
        stats.steps = n - 1
    finally:
        if static is not None:
            cache.end_static()
    stats.decode_s = timer.lap()
    if first_replay is not None:
        stats.replay_s = timer.last - first_replay
    return torch.cat([input_ids, out[:, : _length(out[:, :n], eos_t)]], dim=1)


def _max_cache_len(cache) -> int:
    """Slots of a transformers static cache (the accessor moved between 5.17 and 5.2x)."""
    if hasattr(cache, "get_max_cache_shape"):
        length = cache.get_max_cache_shape()
    else:
        layers = getattr(cache, "layers", None) or [None]
        length = getattr(cache, "max_cache_len", None) or getattr(layers[0], "max_cache_len", 0)
    if not isinstance(length, int) or length <= 0:
        raise TypeError(
            f"cache must be an lsa.LSACache or a static transformers cache (max_cache_len), got "
            f"{type(cache).__name__}"
        )
    return int(length)


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return (tokens[..., None] == eos).any(-1)


def _length(tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """Tokens ``model.generate`` would return: it stops at the step where every row has met an
    end token (the pad tokens this loop wrote after that are dropped)."""
    hit = _is_eos(tokens, eos)
    if not bool(hit.any(-1).all()):
        return tokens.shape[1]
    return int(hit.int().argmax(-1).max()) + 1


def _capture(step, device: torch.device) -> torch.cuda.CUDAGraph:
    """Capture ``step`` (which mutates only device tensors) without running it, on a side stream
    as torch requires; the caller replays it for this step and every later one."""
    g = torch.cuda.CUDAGraph()
    torch.cuda.current_stream(device).synchronize()
    with torch.cuda.graph(g):
        step()
    return g


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        t = self.now()
        dt, self.last = t - self.last, t
        return dt
