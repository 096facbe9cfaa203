"""Shared by the property suites: which (device, backend) pairs to prove, and how many examples."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given, reject, settings

# Compiled backends compile afresh for every new shape (seconds each on CPU, ~1-3 s of Triton
# codegen on CUDA), so they prove each property on a share of the examples; the reference and the
# eager "sdpa" backend get all of them. The CUDA share keeps the suite within one device run.
# "triton" compiles once per tile-size class on CUDA and runs in Triton's (slow) interpreter on CPU
# (only under TRITON_INTERPRET=1, see lsa/compiled/triton_decode.py).
COMPILED_SHARE = {"flex": {"cpu": 40, "cuda": 8}, "triton": {"cpu": 4, "cuda": 4}}
COMPILED = tuple(COMPILED_SHARE)


def backend_params(available: Callable[[str], tuple[str, ...]]) -> list:
    """pytest params (device, backend) for every backend ``available(device)`` lists; CUDA ones
    carry the ``gpu`` mark."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        pytest.param(
            device,
            backend,
            id=f"{device}-{backend}",
            marks=(pytest.mark.gpu,) if device == "cuda" else (),
        )
        for device in devices
        for backend in available(device)
    ]


def prove(prop, device: str, backend: str, *, examples: int, strategies: dict, explicit=()):
    """Run ``prop(**drawn)`` under Hypothesis with ``examples`` examples (the explicit ones run
    first), or ``examples // COMPILED_SHARE[backend][device]`` (at least 2) for a compiled
    backend. Returns how many drawn examples passed; fails if fewer than ``examples`` did (half
    of them for a compiled backend, which refuses some drawn shapes, e.g. chunks of 3 tokens), so
    that a strategy rejecting most of what it draws cannot pass while proving little."""
    if backend in COMPILED:
        examples = max(2, examples // COMPILED_SHARE[backend][device])
    passed = 0

    def counted(**kwargs):
        nonlocal passed
        prop(**kwargs)
        passed += 1

    test = given(**strategies)(counted)
    for kwargs in explicit:
        test = example(**kwargs)(test)
    settings(max_examples=examples)(test)()
    drawn = passed - len(explicit)
    wanted = -(-examples // 2) if backend in COMPILED else examples
    assert drawn >= wanted, f"only {drawn} of {examples} drawn examples ran to the end"
    return drawn


def call(fn, *args, backend: str, **kwargs):
    """``fn(*args, backend=backend, **kwargs)``. A backend other than the reference may refuse
    inputs it cannot serve, with a ValueError naming it ("backend='flex' cannot serve this call:
    ..."); Hypothesis then draws another example. The reference must serve every input."""
    try:
        return fn(*args, backend=backend, **kwargs)
    except ValueError as err:
        if backend != "reference" and f"backend={backend!r}" in str(err):
            reject()
        raise
