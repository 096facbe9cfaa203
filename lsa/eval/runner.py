"""One method over many samples, in left-padded batches, through transformers ``generate()``.

Every method runs on the same model, prompts and batch layout; every method but ``dense`` goes
through :class:`lsa.LSACache` with the same budget, chunk, sink/recent and τ, so only the scorer
differs. Decoding is greedy. Per sample the runner records the prediction, RULER's score and the
KV bytes measured from real storage at the end of the request (``LSACache.footprint()`` for the
cache methods, the ``DynamicCache`` tensors for dense). Bytes are per batch (a batch shares one
cache); ``dense_kv_bytes`` is the sample's own dense KV (prompt + answer tokens, no padding).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import lsa
from lsa.cache.model import cache_kwarg
from lsa.eval import ruler
from lsa.eval.prefill import Prefill
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS


@dataclass(frozen=True)
class Sample:
    """One prompt: its task, index within the task, token ids, references and answer length."""

    task: str
    index: int
    input_ids: tuple[int, ...]
    refs: tuple[str, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class CacheSettings:
    """What every LSACache method shares (only the scorer differs)."""

    budget: float
    chunk_size: int = 64
    refresh_every: int = 64
    sink_chunks: int = SINK_CHUNKS
    recent_chunks: int = RECENT_CHUNKS


class StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def batches(samples: list[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Consecutive samples of one task (one answer length) in groups of at most ``batch_size``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    group: list[Sample] = []
    for s in samples:
        if group and (
            len(group) == batch_size
            or (s.task, s.max_new_tokens) != (group[0].task, group[0].max_new_tokens)
        ):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


def left_pad(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, max_len], padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def kv_bytes_per_token(model) -> int:
    """Dense K+V bytes one token occupies over all layers, in the model's dtype."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).dtype.itemsize
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers ``DynamicCache`` (storage sizes of every layer's K and V)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


def trim_answer(new_ids: list[int], eos_ids: set[int]) -> list[int]:
    """The generated ids up to and including the first end-of-sequence token."""
    for i, t in enumerate(new_ids):
        if t in eos_ids:
            return new_ids[: i + 1]
    return new_ids


def eos_token_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def run_method(
    model,
    samples: list[Sample],
    *,
    method: str,
    decode: Callable[[list[int]], str],
    scorer=None,
    settings: CacheSettings | None = None,
    batch_size: int = 1,
    pad_id: int = 0,
    before_batch: Callable[[list[Sample]], None] | None = None,
    trace_first: bool = False,
    progress=None,
    prefill: Prefill | None = None,
) -> list[dict]:
    """Run one method over ``samples``; returns one record per sample (see the module docstring).

    Args:
        method: its name in the records; ``"dense"`` runs SDPA with a ``DynamicCache`` and needs no
            scorer, every other method needs ``scorer`` and ``settings``.
        decode: token ids -> text (special tokens skipped).
        before_batch: called with each batch before its ``generate()`` (the oracle loads the
            batch's attention masses there).
        trace_first: record, for the first sample, the keep mask of every refresh.
        progress: a tqdm bar, advanced by one per sample.
        prefill: the batch's shared prefill (:mod:`lsa.eval.prefill`); ``samples`` must then be
            exactly that batch. Each method continues from it instead of prefilling again.
    """
    from transformers import DynamicCache, LogitsProcessorList

    dense = method == "dense"
    if not dense and (scorer is None or settings is None):
        raise ValueError(f"method {method!r} needs a scorer and cache settings")
    device = next(model.parameters()).device
    per_token = kv_bytes_per_token(model)
    eos = eos_token_ids(model)
    cache = None
    if not dense:
        cache = lsa.LSACache(
            model,
            scorer,
            budget=settings.budget,
            chunk_size=settings.chunk_size,
            refresh_every=settings.refresh_every,
            sink_chunks=settings.sink_chunks,
            recent_chunks=settings.recent_chunks,
        )
    if prefill is not None and len(samples) != prefill.ids.shape[0]:
        raise ValueError(
            f"a shared prefill serves its own batch of {prefill.ids.shape[0]} samples, got "
            f"{len(samples)}"
        )
    records: list[dict] = []
    try:
        model.set_attn_implementation("sdpa" if dense else "lsa")
        with torch.inference_mode():
            # a shared prefill holds exactly one batch: the samples
            groups = [samples] if prefill is not None else batches(samples, batch_size)
            for group in groups:
                if before_batch is not None:
                    before_batch(group)
                new_tokens = group[0].max_new_tokens
                if prefill is None:
                    ids, mask = left_pad([s.input_ids for s in group], pad_id, device)
                    gen_ids, gen_mask = ids, mask
                else:  # continue after the shared prefill's first token
                    ids = prefill.ids
                    gen_ids, gen_mask = prefill.continued_inputs()
                    new_tokens -= 1
                if dense:
                    kv = (
                        DynamicCache(config=model.config)
                        if prefill is None
                        else prefill.dense_cache()
                    )
                else:
                    cache.reset()
                    if prefill is not None:
                        cache.load_prefill(
                            prefill.keys_values(), prefill.mask, prefill.hidden, input_ids=ids
                        )
                    kv = cache
                clock = StepClock()
                start = time.perf_counter()
                out = gen_ids
                if new_tokens > 0:
                    out = model.generate(
                        gen_ids,
                        attention_mask=gen_mask,
                        **{cache_kwarg(model): kv},
                        max_new_tokens=new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=pad_id,
                        logits_processor=LogitsProcessorList([clock]),
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if prefill is None:  # the first logits come from the prefill
                    steps = len(clock.times) - 1
                    seconds = clock.times[-1] - clock.times[0] if steps > 0 else 0.0
                else:  # every step here is a decode step
                    steps = len(clock.times)
                    seconds = clock.times[-1] - start if steps > 0 else 0.0
                fp = None if dense else cache.footprint()
                if dense:
                    kv_info = {
                        "device_bytes": dynamic_cache_bytes(kv),
                        "host_bytes": 0,
                        "dense_bytes": dynamic_cache_bytes(kv),
                    }
                else:
                    kv_info = {
                        "device_bytes": fp.device_bytes,
                        "host_bytes": fp.host_bytes,
                        "dense_bytes": fp.dense_bytes,
                        "reserve_bytes": fp.reserve_bytes,
                        "tail_bytes": fp.tail_bytes,
                        "chunk_key_bytes": fp.chunk_key_bytes,
                    }
                kv_info["batch_rows"] = len(group)
                kv_info["device_fraction"] = kv_info["device_bytes"] / kv_info["dense_bytes"]
                for b, s in enumerate(group):
                    new = trim_answer(out[b, ids.shape[1] :].tolist(), eos)
                    pred = ruler.postprocess_pred(decode(new))
                    rec = {
                        "task": s.task,
                        "sample": s.index,
                        "method": method,
                        "budget": None if dense else settings.budget,
                        "prediction": pred,
                        "references": list(s.refs),
                        "score": ruler.metric_for(s.task)(pred, list(s.refs)),
                        "new_ids": new,
                        "prompt_tokens": len(s.input_ids),
                        "dense_kv_bytes": per_token * (len(s.input_ids) + len(new)),
                        "kv": dict(kv_info),
                        "decode_steps": steps,
                        "decode_tokens": steps * len(group),
                        "decode_seconds": seconds,
                    }
                    if fp is not None:
                        rec["kv"]["resident_chunks"] = fp.resident_chunks[b]
                        rec["kv"]["total_chunks"] = fp.total_chunks[b]
                    if trace_first and not records and b == 0 and not dense:
                        rec["resident_trace"] = [
                            {
                                "step": r.step,
                                "kv_len": r.kv_len[0],
                                "keep": r.keep[0].nonzero().flatten().tolist(),
                                "n_completed": int(r.keep[0].numel()),
                                "resident": list(r.resident[0]),
                            }
                            for r in cache.refreshes
                        ]
                    records.append(rec)
                    if progress is not None:
                        progress.update()
    finally:
        model.set_attn_implementation("sdpa")
        if cache is not None:
            cache.close()
            del cache
            gc.collect()  # free its pinned mirror before the next method allocates one
    return records


def release_host_memory(device: torch.device) -> tuple[float, float]:
    """Free dropped caches now and hand torch's cached pinned host blocks back to the OS.

    LSACache's host mirror is pinned on CUDA. torch's host allocator keeps freed pinned blocks for
    reuse but never splits them, so requests of new sizes (every batch has its own prompt lengths)
    can add blocks until pinning fails: one evaluation stopped with "CUDA error: out of memory"
    inside ``HostMirror.ensure`` after 3 of 13 batches. Returns the pinned GiB that torch held
    before and after (0, 0 off CUDA).
    """
    gc.collect()  # a finished cache can sit in a reference cycle until the next collection
    if device.type != "cuda":
        return 0.0, 0.0

    def held() -> float:
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30

    before = held()
    # the public name only in newer torch; the private call behind it exists on CUDA builds
    empty = getattr(torch.accelerator, "empty_host_cache", None) or torch._C._host_emptyCache
    empty()
    return before, held()


__all__ = [
    "CacheSettings",
    "Sample",
    "StepClock",
    "batches",
    "dynamic_cache_bytes",
    "kv_bytes_per_token",
    "left_pad",
    "release_host_memory",
    "run_method",
    "trim_answer",
]
