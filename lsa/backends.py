"""Which implementation serves a sparse_attention / reserve_attention call."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lsa._validation import AttentionShape
from lsa.reference.reserve import reference_reserve_attention
from lsa.reference.sparse import reference_sparse_attention

AttentionImpl = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Backend names that run on ``device`` in this environment (tests iterate over these)."""
    return ("reference",)


def resolve_backend(backend: str, shape: AttentionShape, q: torch.Tensor) -> AttentionImpl:
    """Map a backend name to its implementation. "auto" never changes the function computed,
    only how fast: every backend is tested against the reference."""
    if backend in ("auto", "reference"):
        return reference_sparse_attention
    raise NotImplementedError(f"backend {backend!r} is not available in this build of lsa")


def resolve_reserve_backend(backend: str, shape: AttentionShape, q: torch.Tensor) -> AttentionImpl:
    if backend in ("auto", "reference"):
        return reference_reserve_attention
    raise NotImplementedError(f"backend {backend!r} is not available in this build of lsa")
