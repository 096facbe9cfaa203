"""Helpers for testing attention paths against the fp64 oracle, in the spirit of ``torch.testing``.

Inputs come from a seed through a CPU ``torch.Generator`` and are then moved to the device, so one
seed gives the same numbers on every device::

    q, k, v = make_qkv(1, 8, 2, 1, 1000, 64, seed=0, dtype=torch.bfloat16)  # [B, H, S, D]
    keep = make_keep(1, 2, 16, seed=1, density=0.25)                          # bool [B, h, n]

Tolerances come from the noise floor of the dtype, not from magic numbers (the rule of
flash-attention's tests). A path that computes in ``dtype`` is compared with an fp64 oracle
computed from the *same* inputs (already rounded to ``dtype``, so input rounding is not counted as
error). The allowed error is::

    max|path - oracle| <= 2 * max|probe - oracle| + floor

where ``probe`` is the same attention computed with every operation in ``dtype`` (no upcast: the
error a plain PyTorch implementation makes in that dtype) and ``floor = 2 * eps(dtype) * max(|v|,
|oracle|)``, a few rounding steps of ``dtype`` at the scale of the values being averaged, so that
a small problem whose probe happens to be nearly exact does not demand exactness. On random
problems of the proofs' sizes the reference and an online-softmax emulation of a fused kernel
(P rounded to bf16) stay below about 0.6 of this tolerance in fp32 and 0.3 in bf16, while a
single leaked or dropped key in fp32 exceeds it by orders of magnitude. ::

    allowed = visible_keys(keep, 64, q.shape[2], k.shape[2], causal=True, heads_q=q.shape[1])
    oracle = attention_oracle(q, k, v, allowed)
    oracle.assert_close(lsa.sparse_attention(q, k, v, keep=keep, enable_gqa=True), what="flex")

``assert_close`` is also exact on structure: a query that sees no key must return exactly zero
(and an LSE of -inf), and nothing may be NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "AttentionOracle",
    "attention_in_dtype",
    "attention_oracle",
    "make_keep",
    "make_qkv",
    "make_scores",
    "noise_tolerance",
    "rounding_floor",
    "visible_keys",
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def make_qkv(
    batch: int,
    heads_q: int,
    heads_kv: int,
    len_q: int,
    len_kv: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q [B, H_q, S_q, D] and k, v [B, H_kv, S_kv, D] from ``seed``."""
    gen = _generator(seed)
    q = torch.randn(batch, heads_q, len_q, head_dim, generator=gen, dtype=torch.float32)
    k = torch.randn(batch, heads_kv, len_kv, head_dim, generator=gen, dtype=torch.float32)
    v = torch.randn(batch, heads_kv, len_kv, head_dim, generator=gen, dtype=torch.float32)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def make_keep(
    batch: int,
    heads: int,
    n_chunks: int,
    *,
    seed: int = 0,
    density: float = 0.5,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool keep mask [B, heads, n_chunks]; each chunk kept with probability ``density``
    (0 gives all False, 1 all True)."""
    gen = _generator(seed)
    return (torch.rand(batch, heads, n_chunks, generator=gen) < density).to(device)


def make_scores(
    batch: int,
    heads: int,
    n_chunks: int,
    *,
    seed: int = 0,
    levels: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Chunk scores [B, heads, n_chunks]: standard normal, or with ``levels`` the integers
    ``0 .. levels - 1`` (exact in every float dtype; few levels make many ties)."""
    gen = _generator(seed)
    if levels is None:
        scores = torch.randn(batch, heads, n_chunks, generator=gen)
    else:
        scores = torch.randint(0, levels, (batch, heads, n_chunks), generator=gen).float()
    return scores.to(device, dtype)


def visible_keys(
    keep: torch.Tensor | None,
    chunk_size: int,
    len_q: int,
    len_kv: int,
    *,
    causal: bool,
    heads_q: int | None = None,
) -> torch.Tensor | None:
    """The contract's token mask, bool [B|1, 1|H_q, S_q, S_kv]: query i sees key j iff j's chunk
    ``j // chunk_size`` is kept and, if ``causal``, ``j <= S_kv - S_q + i`` (bottom-right).

    Built from positions, independently of the reference's own mask. ``keep`` is
    [B, 1|H_kv, n_chunks] (None = all kept); a per-KV-head mask is repeated over the query heads
    of its group, which needs ``heads_q``. Returns None when every key is visible.
    """
    device = keep.device if keep is not None else None
    key_pos = torch.arange(len_kv, device=device)
    mask = None
    if keep is not None:
        mask = keep[:, :, key_pos // chunk_size]  # [B, h, S_kv]
        if mask.shape[1] > 1:
            if heads_q is None:
                raise ValueError("a per-head keep mask needs heads_q")
            mask = mask.repeat_interleave(heads_q // mask.shape[1], dim=1)
        mask = mask[:, :, None, :]  # [B, 1|H_q, 1, S_kv]
    if causal:
        query_pos = torch.arange(len_q, device=device) + (len_kv - len_q)
        order = key_pos[None, :] <= query_pos[:, None]  # [S_q, S_kv]
        mask = order[None, None] if mask is None else mask & order
    return mask


def attention_in_dtype(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    dtype: torch.dtype,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with every operation in ``dtype`` (no upcast), in ``dtype``.

    ``dtype=torch.float64`` is the oracle; the inputs' own low dtype is the noise probe. q is
    [B, H_q, S_q, D], k and v [B, H_kv, S_kv, D] (grouped-query heads are repeated); ``allowed``
    is bool, broadcastable to [B, H_q, S_q, S_kv]. A query with no allowed key returns zeros.
    """
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    if group > 1:
        kd = kd.repeat_interleave(group, dim=1)
        vd = vd.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (qd @ kd.transpose(-1, -2)) * scale  # [B, H_q, S_q, S_kv]
    if allowed is not None:
        allowed = allowed.to(logits.device).expand_as(logits)
        logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # NaN rows -> 0
    return probs @ vd


def rounding_floor(x: torch.Tensor, dtype: torch.dtype) -> float:
    """``2 * eps(dtype) * max|x|``: two to four rounding steps of ``dtype`` at the magnitude of
    ``x`` (flash-attention's "dtype rounding" term, without its dependence on luck: their
    ``2 * max|((x + 0.3) - 0.3) - x|`` is near zero when few values happen to round well)."""
    if x.numel() == 0:
        return 0.0
    return 2.0 * torch.finfo(dtype).eps * float(x.detach().abs().max())


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def noise_tolerance(
    oracle: torch.Tensor,
    probe: torch.Tensor,
    dtype: torch.dtype,
    *,
    magnitude: torch.Tensor | None = None,
) -> float:
    """Allowed max abs error of a ``dtype`` path: ``2 * max|probe - oracle| + floor``.

    The floor is :func:`rounding_floor` at the largest magnitude among ``oracle`` and
    ``magnitude`` (for attention, the values ``v`` that the output averages: the rounding of the
    weighted sum happens at their scale, not at the average's).
    """
    floor = rounding_floor(oracle, dtype)
    if magnitude is not None:
        floor = max(floor, rounding_floor(magnitude, dtype))
    return 2.0 * _max_abs_diff(probe, oracle) + floor


@dataclass(frozen=True)
class AttentionOracle:
    """An fp64 attention result with the error a ``dtype`` path is allowed against it.

    out: [B, H_q, S_q, D] fp64. lse: [B, H_q, S_q] fp64, -inf where a query sees no key.
    empty: bool [B, H_q, S_q], the queries that see no key.
    """

    out: torch.Tensor
    lse: torch.Tensor
    empty: torch.Tensor
    dtype: torch.dtype
    atol: float
    lse_atol: float

    def assert_close(
        self, actual: torch.Tensor, *, lse: torch.Tensor | None = None, what: str = "output"
    ) -> None:
        """Assert ``actual`` (and ``lse`` if given) match the oracle: same shape and dtype, no
        NaN, exact zeros (LSE -inf) for queries that see no key, and max abs error <= atol."""
        if actual.shape != self.out.shape:
            raise AssertionError(
                f"{what}: shape {tuple(actual.shape)}, expected {tuple(self.out.shape)}"
            )
        if actual.dtype != self.dtype:
            raise AssertionError(f"{what}: dtype {actual.dtype}, expected {self.dtype}")
        got = actual.detach().to("cpu", torch.float64)
        if bool(got.isnan().any()):
            raise AssertionError(f"{what}: {int(got.isnan().sum())} NaN values")
        empty = self.empty.to(got.device)
        if bool(got[empty].ne(0).any()):
            raise AssertionError(f"{what}: a query that sees no key did not return exact zeros")
        err = (got - self.out).abs()
        if err.numel() and float(err.max()) > self.atol:
            worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
            raise AssertionError(
                f"{what}: max abs error {float(err.max()):.3g} at {worst} exceeds the tolerance "
                f"{self.atol:.3g} derived from the {self.dtype} noise floor "
                f"(mean abs error {float(err.mean()):.3g})"
            )
        if lse is None:
            return
        got_lse = lse.detach().to("cpu", torch.float64)
        if got_lse.shape != self.lse.shape:
            raise AssertionError(
                f"{what} LSE: shape {tuple(got_lse.shape)}, expected {tuple(self.lse.shape)}"
            )
        if bool(got_lse.isnan().any()) or not bool((got_lse[empty] == -math.inf).all()):
            raise AssertionError(f"{what} LSE: NaN, or not -inf for a query that sees no key")
        lse_err = (got_lse[~empty] - self.lse[~empty]).abs()
        if lse_err.numel() and float(lse_err.max()) > self.lse_atol:
            raise AssertionError(
                f"{what} LSE: max abs error {float(lse_err.max()):.3g} exceeds {self.lse_atol:.3g}"
            )


def _lse_in_dtype(q, k, allowed, dtype, scale):
    group = q.shape[1] // k.shape[1]
    qd, kd = q.to(dtype), k.to(dtype)
    if group > 1:
        kd = kd.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (qd @ kd.transpose(-1, -2)) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device).expand_as(logits), -math.inf)
    return torch.logsumexp(logits.float() if dtype != torch.float64 else logits, dim=-1)


def attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> AttentionOracle:
    """The fp64 oracle for attention over ``allowed`` keys (see :func:`visible_keys`) and the
    tolerance of a path that computes in ``q.dtype`` (module docstring).

    The LSE tolerance is derived the same way from an LSE whose logits are computed in ``q.dtype``
    (with the log-sum-exp itself in fp32, as every backend does it), with a floor of
    ``rounding_floor`` at fp32.
    """
    q, k, v = q.detach().cpu(), k.detach().cpu(), v.detach().cpu()
    if allowed is not None:
        allowed = allowed.cpu()
    dtype = q.dtype
    out = attention_in_dtype(q, k, v, allowed, dtype=torch.float64, scale=scale)
    probe = attention_in_dtype(q, k, v, allowed, dtype=dtype, scale=scale)
    lse = _lse_in_dtype(q, k, allowed, torch.float64, scale)
    lse_probe = _lse_in_dtype(q, k, allowed, dtype, scale).to(torch.float64)
    empty = lse == -math.inf
    finite_lse = lse.masked_fill(empty, 0.0)
    lse_atol = 2.0 * _max_abs_diff(lse_probe.masked_fill(empty, 0.0), finite_lse)
    lse_atol += rounding_floor(finite_lse, torch.float32)
    return AttentionOracle(
        out=out,
        lse=lse,
        empty=empty,
        dtype=dtype,
        atol=noise_tolerance(out, probe, dtype, magnitude=v),
        lse_atol=lse_atol,
    )


#: Sizes of the tiny randomly initialised decoders the unit tests run (GQA: 4 query heads share
#: 2 KV heads of dim 16); tests add layers, vocabulary and token ids.
TINY_DECODER = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)


def tiny_decoder(model_cls, config_cls, *, seed: int = 0, **config):
    """A randomly initialised transformers decoder (seeded, eval mode) of ``TINY_DECODER`` sizes,
    e.g. ``tiny_decoder(LlamaForCausalLM, LlamaConfig, num_hidden_layers=2, vocab_size=128)``."""
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY_DECODER, **config})).eval()
