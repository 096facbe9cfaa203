"""Long-generation fidelity: how far a sparse cache's next-token distribution drifts from dense
over hundreds of decode steps, when the resident set is refreshed every τ steps.

For one prompt (batch of one, no padding):

1. one dense prefill (:func:`lsa.eval.prefill.prefill_batch`), shared by every method, then the
   dense greedy continuation ``y_0 … y_{n-1}`` through a ``DynamicCache``, one token per step,
   keeping the dense log-probabilities ``log p_t`` of ``y_{t+1}``'s position (t = 0 … n-2);
2. per method (an :class:`lsa.LSACache` at a budget and τ), **teacher forcing on the decode
   path**: the cache takes the shared prefill (:meth:`lsa.LSACache.load_prefill`, which issues
   the first refresh) and then ``y_0 … y_{n-2}`` one token per forward, exactly as in
   ``generate()``: the cache writes each token, refreshes every τ decode steps and recalls chunks
   as it would for its own answer. A single prefill of the continuation would instead attend
   densely within it and never refresh, which is not what decoding does. Per step it records
   ``KL(p_t ‖ q_t)`` (nats) and whether ``argmax q_t = y_{t+1}``;
3. per method, optionally, **free-running** greedy decoding from the same prefill, for the
   answer overlap: unigram F1 between the method's and the dense answer's tokens.

Greedy agreement: the free-running answer equals the dense one until the first step whose
teacher-forced argmax differs (before it, both runs fed the cache the same tokens, so the cache
made the same choices), so ``agree_tokens`` (tokens equal to dense before the first divergence)
comes from teacher forcing; equal to ``n`` when there is none.

Token ``y_0`` comes from the shared dense prefill (identical for every method), so the per-token
KL covers the ``n - 1`` decode steps. Cost per step: refreshes and recalled bytes per decode step,
from the cache's :class:`~lsa.cache.records.RefreshRecord` list (the first refresh, after the
prompt, is reported apart: it fills the reserve once) and the device fraction from
:meth:`~lsa.cache.LSACache.footprint` at the end of the teacher-forced pass.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsa._validation import check_int
from lsa.cache.model import cache_kwarg
from lsa.eval.prefill import Prefill, prefill_batch
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS

#: the methods :func:`make_scorer` builds
METHODS = ("lsa", "oracle", "recency", "random")


@dataclass(frozen=True)
class Setting:
    """One method at one budget and τ; chunking and forced chunks are shared by all."""

    method: str
    budget: float
    refresh_every: int
    chunk_size: int = 64
    sink_chunks: int = SINK_CHUNKS
    recent_chunks: int = RECENT_CHUNKS

    @property
    def name(self) -> str:
        return f"{self.method}@{self.budget:g}/τ{self.refresh_every}"


@dataclass
class DenseRun:
    """The dense greedy continuation of one prompt."""

    prefill: Prefill
    tokens: list[int]  # y_0 … y_{n-1} (ends at the first end-of-sequence token, if any)
    logprobs: torch.Tensor  # [n - 1, V] float32, log p of the token after y_t (model's device)
    #: token ids greedy decoding never picks (the end-of-sequence ids under ignore_eos); the
    #: distributions (and so the KL) keep them
    banned: tuple[int, ...] = ()
    #: the oracle's attention mass of prompt + continuation (computed once, whatever τ)
    oracle_mass: torch.Tensor | None = None


def _step(model, token: int, cache, device) -> torch.Tensor:
    """One decode forward of ``token`` through ``cache``: the last logits [V] in float32."""
    ids = torch.tensor([[token]], dtype=torch.long, device=device)
    out = model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
    return out.logits[0, -1].float()


def _greedy(logits: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """The argmax of ``logits`` [V] among the ids not in ``banned`` (a 0-dim tensor)."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = -torch.inf
    return logits.argmax()


def dense_continuation(
    model,
    prompt_ids: list[int],
    n_tokens: int,
    *,
    eos_ids: set[int] = frozenset(),
    ignore_eos: bool = False,
    progress: Callable[[], None] | None = None,
) -> DenseRun:
    """Prefill ``prompt_ids`` densely and decode ``n_tokens`` greedily, one token per forward
    through a ``DynamicCache``: it stops after an end-of-sequence token, or with ``ignore_eos``
    never picks one (as ``generate(min_new_tokens=...)`` does) and always runs ``n_tokens``."""
    check_int("n_tokens", n_tokens, minimum=2)
    banned = tuple(sorted(eos_ids)) if ignore_eos else ()
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        prefill = prefill_batch(model, ids, mask, pad_id=0)
        first = prefill.first[0]
        if int(first) in banned:  # the prefill's pick, redone without end of sequence
            first = _greedy(_prefill_logits(model, ids), banned)
        tokens = [int(first)]
        cache = copy.deepcopy(prefill.cache)
        rows = []
        previous = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            while len(tokens) < n_tokens and tokens[-1] not in eos_ids:
                logits = _step(model, tokens[-1], cache, device)
                rows.append(torch.log_softmax(logits, -1))
                tokens.append(int(_greedy(logits, banned)))
                if progress is not None:
                    progress()
        finally:
            model.set_attn_implementation(previous)
    if not rows:
        raise ValueError(
            "the dense answer ended after its first token (end of sequence): nothing to compare; "
            "use a prompt that asks for a long answer"
        )
    return DenseRun(prefill, tokens, torch.stack(rows), banned=banned)


def _prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The last position's logits [V] (float32) of a dense forward over ``ids`` [1, S]."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return model(input_ids=ids, use_cache=False).logits[0, -1].float()
    finally:
        model.set_attn_implementation(previous)


def make_scorer(setting: Setting, *, indexer=None, model=None, dense: DenseRun | None = None,
                seed: int = 0):  # fmt: skip
    """The scorer of ``setting.method``: the trained ``indexer`` for ``lsa``, the dense
    continuation's attention for ``oracle`` (needs ``model`` and ``dense``), or a baseline."""
    from lsa.scorers import OracleScorer, RandomScorer, RecencyScorer
    from lsa.scorers.oracle import attention_mass

    cs = setting.chunk_size
    if setting.method == "lsa":
        if indexer is None:
            raise ValueError("method 'lsa' needs indexer= (a trained LightningIndexer)")
        return indexer
    if setting.method == "recency":
        return RecencyScorer(chunk_size=cs)
    if setting.method == "random":
        return RandomScorer(seed, chunk_size=cs)
    if setting.method == "oracle":
        if model is None or dense is None:
            raise ValueError("method 'oracle' needs model= and dense= (the dense continuation)")
        prompt = dense.prefill.ids
        mass = dense.oracle_mass
        if mass is None or mass.shape[1] != -(-(prompt.shape[1] + len(dense.tokens)) // cs):
            seq = torch.cat([prompt, torch.tensor([dense.tokens], device=prompt.device)], 1)
            with torch.inference_mode():
                mass = attention_mass(model, seq, chunk_size=cs, query_start=prompt.shape[1])
            dense.oracle_mass = mass
        oracle = OracleScorer(chunk_size=cs, lookahead=setting.refresh_every)
        oracle.set_rows([mass])
        return oracle
    raise ValueError(f"method must be one of {METHODS}, got {setting.method!r}")


def _cache(model, scorer, setting: Setting):
    import lsa

    return lsa.LSACache(
        model,
        scorer,
        budget=setting.budget,
        chunk_size=setting.chunk_size,
        refresh_every=setting.refresh_every,
        sink_chunks=setting.sink_chunks,
        recent_chunks=setting.recent_chunks,
    )


def _start(cache, dense: DenseRun) -> None:
    p = dense.prefill
    cache.reset()
    cache.load_prefill(p.keys_values(), p.mask, p.hidden)


def unigram_f1(a: list[int], b: list[int]) -> float:
    """F1 of the token multisets of two answers (1.0 for two empty answers)."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def measure(
    model,
    dense: DenseRun,
    setting: Setting,
    scorer,
    *,
    free_run: bool = True,
    eos_ids: set[int] = frozenset(),
    progress: Callable[[], None] | None = None,
) -> dict:
    """Teacher-forced per-token KL(dense ‖ method), greedy agreement, cost per decode step and
    (``free_run``) the free-running answer's overlap with dense. Returns one JSON-ready record."""
    device = next(model.parameters()).device
    steps = len(dense.tokens) - 1
    forced = dense.tokens[:-1]  # y_0 … y_{n-2}: the inputs of the decode steps
    target = torch.tensor(dense.tokens[1:], device=device)
    kl = torch.empty(steps, device=device)
    agree = torch.empty(steps, dtype=torch.bool, device=device)
    cache = _cache(model, scorer, setting)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("lsa")
        with torch.inference_mode():
            _start(cache, dense)
            for t, token in enumerate(forced):
                logq = torch.log_softmax(_step(model, token, cache, device), -1)
                logp = dense.logprobs[t]
                kl[t] = (logp.exp() * (logp - logq)).sum()
                agree[t] = _greedy(logq, dense.banned) == target[t]
                if progress is not None:
                    progress()
            fp = cache.footprint()
            refreshes = [
                {"step": r.step, "recalled_bytes": r.recalled_bytes, "recalled": r.recalled[0]}
                for r in cache.refreshes
            ]
            answer = None
            if free_run:
                _start(cache, dense)
                answer = [dense.tokens[0]]
                while len(answer) < len(dense.tokens) and answer[-1] not in eos_ids:
                    logits = _step(model, answer[-1], cache, device)
                    answer.append(int(_greedy(logits, dense.banned)))
                    if progress is not None:
                        progress()
    finally:
        model.set_attn_implementation(previous)
        cache.close()
    kl_list = kl.clamp_min(0).cpu().tolist()  # rounding can make a zero KL slightly negative
    wrong = (~agree).nonzero().flatten().cpu().tolist()
    first = refreshes[0]["recalled_bytes"] if refreshes else 0
    later = refreshes[1:]
    record = {
        "method": setting.method,
        "budget": setting.budget,
        "refresh_every": setting.refresh_every,
        "decode_steps": steps,
        "kl": kl_list,
        "mean_kl": sum(kl_list) / steps,
        "max_kl": max(kl_list),
        "top1_agreement": 1 - len(wrong) / steps,
        # y_0 and the tokens before the first teacher-forced miss are the dense answer's
        "agree_tokens": 1 + (wrong[0] if wrong else steps),
        "refresh_steps": [r["step"] for r in refreshes],
        "refreshes_per_step": len(later) / steps,
        "initial_recall_bytes": first,
        "recalled_bytes_per_step": sum(r["recalled_bytes"] for r in later) / steps,
        "device_fraction": fp.device_fraction,
        "device_bytes": fp.device_bytes,
        "dense_bytes": fp.dense_bytes,
    }
    if answer is not None:
        record["answer_tokens"] = answer
        record["answer_f1"] = unigram_f1(answer, dense.tokens)
    return record


__all__ = [
    "METHODS",
    "DenseRun",
    "Setting",
    "dense_continuation",
    "make_scorer",
    "measure",
    "unigram_f1",
]
