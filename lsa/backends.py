"""Which implementation serves a sparse_attention / reserve_attention call.

"auto" changes only the speed, never the function: every backend is proven against the reference.
On CUDA it picks from measured H200 figures (see ``_fastest``); on CPU "reference": there is no fast
sparse kernel there, and compiled flex costs seconds of compilation per shape class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lsa._validation import AttentionShape
from lsa.compiled.flex import flex_reserve_attention, flex_sparse_attention, flex_supports
from lsa.compiled.sdpa import sdpa_reserve_attention, sdpa_supports
from lsa.compiled.triton_decode import (
    interpreting,
    triton_available,
    triton_reserve_attention,
    triton_supports,
)
from lsa.reference.reserve import reference_reserve_attention
from lsa.reference.sparse import reference_sparse_attention

#: up to this many queries per row a call is decode-shaped (the Triton kernel's measured range)
DECODE_QUERIES = 16

AttentionImpl = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]

_IMPLS: dict[str, dict[str, AttentionImpl]] = {
    "sparse": {"reference": reference_sparse_attention, "flex": flex_sparse_attention},
    "reserve": {
        "reference": reference_reserve_attention,
        "flex": flex_reserve_attention,
        "sdpa": sdpa_reserve_attention,
        "triton": triton_reserve_attention,
    },
}


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Backend names of ``sparse_attention`` on ``device`` (tests iterate over these)."""
    return ("reference", "flex")


def available_reserve_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Backend names of ``reserve_attention`` on ``device``: "triton" on CUDA when Triton imports,
    and on CPU when Triton also runs in its interpreter (TRITON_INTERPRET=1)."""
    names = ("reference", "flex", "sdpa")
    kind = torch.device(device).type
    if triton_available() is None and (kind == "cuda" or (kind == "cpu" and interpreting())):
        names += ("triton",)
    return names


#: backends whose kernels have no backward pass, by device type ("*": every device)
_NO_BACKWARD = {"flex": ("cpu",), "triton": ("*",)}


def _why_not(backend: str, qkv: tuple, chunk_size: int, return_lse: bool) -> str | None:
    q = qkv[0]
    devices = _NO_BACKWARD.get(backend, ())
    no_backward = q.device.type in devices or "*" in devices
    if no_backward and torch.is_grad_enabled() and any(t.requires_grad for t in qkv):
        return (
            f"it has no backward pass on {q.device.type}: run it under torch.no_grad() or on "
            "detached inputs, or use backend='reference' (differentiable)"
        )
    if backend == "flex":
        return flex_supports(q, chunk_size)
    if backend == "sdpa":
        return sdpa_supports(q, return_lse)
    if backend == "triton":
        return triton_supports(q, chunk_size)
    return None


def _fastest(kind: str, shape: AttentionShape, qkv, chunk_size: int, return_lse: bool) -> str:
    """Measured on an H200 (bench/README.md). Decode over a reserve: the Triton split-KV kernel
    (1.35x the HBM floor at B = 1, 512K; 0.98x at B = 8, where flex is 15x slower). Longer query
    blocks over a reserve: flex at B * H_kv = 8 and SDPA with a token mask at B * H_kv = 64 (flex's
    decode kernel walks its block lists too slowly there). Over a full cache only flex skips
    dropped chunks. The CPU has no fast sparse kernel."""
    if qkv[0].device.type != "cuda":
        return "reference"
    order = ("flex", "sdpa") if kind == "reserve" else ("flex",)
    if kind == "reserve" and shape.batch * shape.heads_kv >= 64:
        order = ("sdpa", "flex")
    if kind == "reserve" and shape.len_q <= DECODE_QUERIES:
        order = ("triton", *order)
    fits = [b for b in order if _why_not(b, qkv, chunk_size, return_lse) is None]
    return fits[0] if fits else "reference"


def _resolve(kind, backend, shape: AttentionShape, qkv, chunk_size: int, return_lse: bool):
    if backend not in _IMPLS[kind] and backend != "auto":
        raise ValueError(
            f"backend={backend!r} does not serve {kind} attention; "
            f"choose one of {('auto', *_IMPLS[kind])}"
        )
    if shape.len_q == 0 or shape.len_kv == 0:
        return _IMPLS[kind]["reference"]  # empty attention: nothing for a kernel to do
    if backend == "auto":
        backend = _fastest(kind, shape, qkv, chunk_size, return_lse)
    reason = _why_not(backend, qkv, chunk_size, return_lse)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot serve this call: {reason}")
    return _IMPLS[kind][backend]


def reserve_impl(device: torch.device) -> AttentionImpl:
    """The decode attention over a reserve for a static-shape step on ``device``: the Triton
    split-KV kernel on CUDA (per-row lengths, no host sync, capturable), else the reference."""
    device = torch.device(device)
    if device.type == "cuda" and triton_available() is None:
        return triton_reserve_attention
    return reference_reserve_attention


def resolve_backend(
    backend: str, shape: AttentionShape, qkv: tuple, chunk_size: int, return_lse: bool
) -> AttentionImpl:
    """The implementation for a ``sparse_attention`` call on ``qkv = (q, k, v)``."""
    return _resolve("sparse", backend, shape, qkv, chunk_size, return_lse)


def resolve_reserve_backend(
    backend: str, shape: AttentionShape, qkv: tuple, chunk_size: int, return_lse: bool
) -> AttentionImpl:
    """The implementation for a ``reserve_attention`` call on ``qkv = (q, k, v)``."""
    return _resolve("reserve", backend, shape, qkv, chunk_size, return_lse)
