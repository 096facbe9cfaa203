"""LSACache under faults: an error or interrupt in the middle of generate() leaves a clear error,
a mirror that holds every token stored so far, a cache that refuses to continue, and reset()
makes it as good as new."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from test_cache import Recorder, generate, lsa_model, make_cache, prompt
from transformers import LogitsProcessor, LogitsProcessorList

from lsa.cache.model import cache_kwarg

LAYERS = 3  # tiny_llama
NEW = 30
SETTINGS = dict(budget=0.3, chunk_size=8, refresh_every=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Fault:
    """Wraps ``inner``; its ``at``-th call raises ``error()`` instead (once)."""

    def __init__(self, inner, at: int, error):
        self.inner, self.at, self.error, self.calls = inner, at, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error()
        return self.inner(*args, **kwargs)


class InterruptAt(LogitsProcessor):
    """A logits processor that raises KeyboardInterrupt at its ``at``-th call (after forward
    ``at`` finished: between two forwards, the cache is idle)."""

    def __init__(self, at: int):
        self.fault = Fault(lambda ids, scores: scores, at, KeyboardInterrupt)

    def __call__(self, input_ids, scores):
        return self.fault(input_ids, scores)


def oom():
    return torch.OutOfMemoryError("CUDA out of memory (injected)")


@dataclass
class Case:
    name: str
    arm: object  # cache -> logits processors for generate()
    error: type[BaseException]
    note: str | None  # what the LSACache note must say (None: no note, the cache was idle)
    broken: bool = True  # a single-token forward must be refused too


def _recall(at):
    def arm(cache):
        cache._recall = Fault(cache._recall, at, lambda: RuntimeError("injected: recall failed"))
        return []

    return arm


def _score(cache):
    cache.scorer.score = Fault(cache.scorer.score, 3, KeyboardInterrupt)
    return []


def _grow(cache):
    # one buffer per layer for K and one for V: the 2nd grow fails at layer 1's K, half done
    cache._new_reserve_buffer = Fault(cache._new_reserve_buffer, 2 * LAYERS + 3, oom)
    return []


def _attention(cache):
    # decode step 6, layer 1: layers 0 and 1 stored the step's token, layer 2 did not
    cache._decode_attention = Fault(
        cache._decode_attention, 5 * LAYERS + 2, lambda: RuntimeError("injected: attention")
    )
    return []


CASES = [
    Case(
        "recall_at_prefill",
        _recall(1),
        RuntimeError,
        r"LSACache: raised while refreshing the resident chunks \(placing and recalling chunks\) "
        r"in the prefill; .*cache\.reset\(\)",
    ),
    Case(
        "recall_mid_decode",
        _recall(3),
        RuntimeError,
        r"refreshing the resident chunks \(placing and recalling chunks\) in decode step 8;",
    ),
    Case(
        "interrupt_in_score",
        _score,
        KeyboardInterrupt,
        r"refreshing the resident chunks \(scoring\) in decode step 8;",
    ),
    Case(
        "oom_in_second_grow",
        _grow,
        torch.OutOfMemoryError,
        r"refreshing the resident chunks \(growing the device reserve\) in decode step \d+;",
    ),
    Case(
        "error_mid_step",
        _attention,
        RuntimeError,
        r"raised while the decode attention of layer 1 in decode step 6;",
    ),
    Case(
        "interrupt_between_steps",
        lambda cache: [InterruptAt(7)],
        KeyboardInterrupt,
        None,
        broken=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_fault_leaves_a_clear_error_the_whole_mirror_and_a_resettable_cache(case):
    model = lsa_model()
    ids, mask = prompt([90, 61])
    fresh = make_cache(model, **SETTINGS)
    fresh_seq, fresh_logits = generate(model, ids, mask, fresh, NEW)

    cache = make_cache(model, **SETTINGS)
    rec = Recorder(cache)
    processors = case.arm(cache)
    with pytest.raises(case.error) as info:
        model.generate(
            ids,
            attention_mask=mask,
            **{cache_kwarg(model): cache},
            max_new_tokens=NEW,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
        )
    notes = "\n".join(getattr(info.value, "__notes__", []))
    if case.note is None:
        assert "LSACache" not in notes
    else:
        assert re.search(case.note, notes), notes

    # the request cannot go on: generate() is refused, and so is a hand-made decode step
    with pytest.raises(ValueError, match=r"reset\(\)"):
        generate(model, ids, mask, cache, 4)
    if case.broken:
        with pytest.raises(RuntimeError, match=r"request cannot continue: .*reset\(\)"):
            model(ids[:, -1:], **{cache_kwarg(model): cache})

    # the mirror holds every token stored in every layer (the last layer got them last)
    stored = rec.full(LAYERS - 1)[0].shape[2]
    assert stored > ids.shape[1] or case.name == "recall_at_prefill"
    for layer in range(LAYERS):
        k_all, v_all = rec.full(layer)
        rows = cache.mirror_kv(layer)
        for b, (k, v) in enumerate(rows):
            pad = cache.pad[b]
            assert cache.kv_len_host[b] == k.shape[1] == stored - pad
            assert torch.equal(k, k_all[b, :, pad:stored])
            assert torch.equal(v, v_all[b, :, pad:stored])
    if case.broken:  # reading the mirror closed the dead forward; still no going on
        with pytest.raises(RuntimeError, match=r"request cannot continue: .*reset\(\)"):
            model(ids[:, -1:], **{cache_kwarg(model): cache})

    # reset() makes it as good as new (the injected faults fired once and are spent)
    cache.reset()
    seq, logits = generate(model, ids, mask, cache, NEW)
    assert torch.equal(seq, fresh_seq)
    assert torch.equal(logits, fresh_logits)
    assert [r.resident for r in cache.refreshes] == [r.resident for r in fresh.refreshes]
