"""Shared by the property suites: which (device, backend) pairs to prove, and how many examples."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given, reject, settings

# Compiled backends on CPU compile afresh for every new shape (seconds each), so there they prove
# each property on a share of the examples; the reference, the eager "sdpa" backend and every
# backend on CUDA get all of them.
COMPILED_CPU_SHARE = 40
COMPILED = ("flex",)


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
    first), or ``examples // COMPILED_CPU_SHARE`` (at least 2) for a compiled backend on CPU."""
    if backend in COMPILED and device == "cpu":
        examples = max(2, examples // COMPILED_CPU_SHARE)
    test = given(**strategies)(prop)
    for kwargs in explicit:
        test = example(**kwargs)(test)
    settings(max_examples=examples)(test)()


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
