"""Input checks at the public boundary, shared by every backend.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
with a message that names the argument, what was expected and what came. Checks run before any
compiled code so that errors never surface from inside Inductor or a Triton kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

BACKENDS = ("auto", "reference", "flex", "sdpa", "triton")


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention call, [B, H, S, D] layout."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_scale(scale: object) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None for 1/sqrt(D)), got {scale}")


def check_qkv(
    q: object,
    k: object,
    v: object,
    *,
    causal: object,
    scale: object,
    enable_gqa: object,
    names: tuple[str, str, str] = ("q", "k", "v"),
) -> AttentionShape:
    """Validate q, k, v ([B, H, S, D]) and the flags shared by dense and sparse attention;
    ``names`` are the caller's argument names, used in messages."""
    for name, t in zip(names, (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [B, H, S, D], got {t.dim()}-D tensor of shape {_shape(t)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    check_bool("causal", causal)
    check_bool("enable_gqa", enable_gqa)
    check_scale(scale)
    _, nk, nv = names
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device must equal q.device ({q.device}), got {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(
                f"{name} batch size (dim 0) must equal q's ({q.shape[0]}), got {t.shape[0]}; "
                f"q {_shape(q)}, {name} {_shape(t)}"
            )
        if t.shape[3] != q.shape[3]:
            raise ValueError(
                f"{name} head dim (dim 3) must equal q's ({q.shape[3]}), got {t.shape[3]}; "
                f"q {_shape(q)}, {name} {_shape(t)}"
            )
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"{nv} must have {nk}'s heads and length (dims 1-2), "
            f"got {nv} {_shape(v)} and {nk} {_shape(k)}"
        )
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if d < 1:
        raise ValueError(f"head dim (dim 3) must be >= 1, got q {_shape(q)}")
    if hkv < 1 or hq < 1:
        raise ValueError(f"q and k need at least one head, got q {_shape(q)} and k {_shape(k)}")
    if hq % hkv != 0:
        raise ValueError(
            f"q heads ({hq}) must be a multiple of {nk}/{nv} heads ({hkv}) for grouped-query "
            "attention"
        )
    if hq != hkv and not enable_gqa:
        raise ValueError(
            f"q has {hq} heads and {nk}/{nv} have {hkv}: pass enable_gqa=True for grouped-query "
            "attention"
        )
    if causal and sq > skv:
        raise ValueError(
            f"causal attention needs q length <= k length (bottom-right aligned), "
            f"got q length {sq} > k length {skv}"
        )
    return AttentionShape(b, hq, hkv, sq, skv, d)


def check_chunk_mask(
    name: str, mask: object, shape: AttentionShape, n_chunks: int, device: torch.device
) -> torch.Tensor:
    """Validate a keep mask (bool) or a score tensor (float) of shape [B, 1|H_kv, n_chunks]."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if name == "keep" and mask.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got dtype {mask.dtype}")
    if name == "scores" and not mask.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got dtype {mask.dtype}")
    expected = f"[B={shape.batch}, 1 or H_kv={shape.heads_kv}, n_chunks={n_chunks}]"
    if mask.dim() != 3:
        raise ValueError(f"{name} must be 3-D {expected}, got shape {_shape(mask)}")
    if mask.shape[0] != shape.batch:
        raise ValueError(
            f"{name} batch (dim 0) must be {shape.batch} {expected}, got {_shape(mask)}"
        )
    if mask.shape[1] not in (1, shape.heads_kv):
        raise ValueError(
            f"{name} heads (dim 1) must be 1 (shared) or H_kv={shape.heads_kv} (per KV head) "
            f"{expected}, got {_shape(mask)}"
        )
    if mask.shape[2] != n_chunks:
        raise ValueError(
            f"{name} chunks (dim 2) must be n_chunks = ceil(S_kv / chunk_size) = {n_chunks} "
            f"{expected}, got {_shape(mask)}"
        )
    if mask.device != device:
        raise ValueError(f"{name}.device must equal q.device ({device}), got {mask.device}")
    return mask


def check_scores_finite(scores: torch.Tensor) -> None:
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        n_nan = int(torch.isnan(scores).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"scores must be finite, got {n_nan} NaN and {n_inf} ±inf values "
            f"in a tensor of shape {_shape(scores)}"
        )


def check_budget(budget: object, threshold: object) -> None:
    if budget is None and threshold is None:
        raise ValueError(
            "selection needs budget (int count or fraction in (0, 1]) or threshold, got neither"
        )
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, Real):
            raise TypeError(
                f"budget must be an int count or a float fraction, got {type(budget).__name__} "
                f"{budget!r}"
            )
        if isinstance(budget, Integral):
            if budget < 1:
                raise ValueError(f"budget as an int count must be >= 1, got {budget}")
        elif not (0.0 < budget <= 1.0):
            raise ValueError(f"budget as a float fraction must be in (0, 1], got {budget}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, Real):
            raise TypeError(
                f"threshold must be a float, got {type(threshold).__name__} {threshold!r}"
            )
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")


def check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__} {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_reserve(
    block_table: object,
    kv_len: object,
    shape: AttentionShape,
    chunk_size: int,
    device: torch.device,
) -> int:
    """Validate a reserve's block table [B, 1|H_kv, n_slots] and kv_len [B]; return n_slots."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype.is_floating_point or block_table.dtype == torch.bool:
        raise TypeError(f"block_table must be an integer tensor, got dtype {block_table.dtype}")
    if block_table.dim() != 3 or block_table.shape[0] != shape.batch:
        raise ValueError(
            f"block_table must be [B={shape.batch}, 1 or H_kv={shape.heads_kv}, n_slots], "
            f"got shape {_shape(block_table)}"
        )
    if block_table.shape[1] not in (1, shape.heads_kv):
        raise ValueError(
            f"block_table heads (dim 1) must be 1 or H_kv={shape.heads_kv}, "
            f"got shape {_shape(block_table)}"
        )
    n_slots = block_table.shape[2]
    if shape.len_kv != n_slots * chunk_size:
        raise ValueError(
            f"reserve length (k_reserve dim 2) must be n_slots * chunk_size = "
            f"{n_slots} * {chunk_size} = {n_slots * chunk_size}, got {shape.len_kv}"
        )
    if not isinstance(kv_len, torch.Tensor):
        raise TypeError(f"kv_len must be a torch.Tensor, got {type(kv_len).__name__}")
    if kv_len.dtype.is_floating_point or kv_len.dtype == torch.bool:
        raise TypeError(f"kv_len must be an integer tensor, got dtype {kv_len.dtype}")
    if kv_len.shape != (shape.batch,):
        raise ValueError(
            f"kv_len must be an integer tensor of shape ({shape.batch},), got {_shape(kv_len)}"
        )
    for name, t in (("block_table", block_table), ("kv_len", kv_len)):
        if t.device != device:
            raise ValueError(f"{name}.device must equal q.device ({device}), got {t.device}")
    _check_reserve_values(block_table, kv_len)
    return n_slots


def _check_reserve_values(block_table: torch.Tensor, kv_len: torch.Tensor) -> None:
    """The rules a wrong table breaks silently: kv_len >= 0, entries >= -1, no logical chunk in
    two slots of one row (attention would count its tokens twice). One host sync for all, so
    they are skipped while a CUDA graph is being captured (no sync can happen there; the values
    of a captured call are those of its replays, which no check here could see anyway)."""
    if block_table.numel() == 0 and kv_len.numel() == 0:
        return
    if block_table.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    ordered = block_table.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    bad = torch.stack([(kv_len < 0).any(), (block_table < -1).any(), repeated.any()]).tolist()
    if bad[0]:
        raise ValueError(f"kv_len must be >= 0 in every row, got {kv_len.tolist()}")
    if bad[1]:
        low = int(block_table.min())
        raise ValueError(f"block_table entries must be chunk ids >= 0 or -1 (empty), got {low}")
    if bad[2]:
        rows = repeated.any(-1).nonzero().tolist()
        b, h = rows[0]
        chunks = ordered[b, h, 1:][repeated[b, h]].unique().tolist()
        raise ValueError(
            "block_table must hold each logical chunk at most once per row (and head): row "
            f"{b}, head {h} repeats chunks {chunks}"
        )
