"""Split-KV (flash-decoding) attention over a compacted reserve, in Triton.

The reserve and block table are those of :func:`lsa.reference.reserve.reference_reserve_attention`:
slot ``s`` of row (b, h) holds logical chunk ``block_table[b, h, s]`` (-1 = empty) and token ``o``
of that slot sits at position ``chunk * chunk_size + o``, present iff it is < ``kv_len[b]``.

Two kernels:

1. ``_split_kernel``, grid (B * H_kv, splits, row blocks). A program folds the G = H_q / H_kv query
   heads x S_q queries of one KV head into the rows of one tile (loaded once), walks its share of
   the row's slots one chunk per BLOCK_N tile, masks padding / empty slots / positions >= kv_len /
   causality, and keeps an online softmax in fp32 (base 2). It writes the normalised partial
   output and the partial log-sum-exp (natural log, -inf when it saw no key).
2. ``_merge_kernel``, one program per (B * H_kv, row): weights the splits by exp(lse - max) and
   writes the output in the input dtype, plus the merged LSE.

Masked loads read no memory, so empty slots cost a table read and some arithmetic, not KV bytes.
Nothing depends on the number of resident chunks on the host (no synchronisation): the split count
comes from B, H_kv and the number of slots, so CUDA-graph capture works.

On CPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton
was imported (tests, CI).
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable (triton_supports)
    triton = None
    tl = None

# Triton decides at import whether its own library functions (tl.zeros, tl.max, ...) are compiled
# or interpreted, so interpreter mode is fixed for the process: TRITON_INTERPRET=1 must be set
# before anything imports triton (torch may, too).
_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)
# Without triton the kernels stay plain functions that are never launched.
_jit = triton.jit if triton is not None else (lambda fn: fn)

# Each split reads at least this many tokens, so a split's fixed cost (loading Q, the merge) stays
# small next to its KV bytes.
MIN_TOKENS_PER_SPLIT = 256
# The merge kernel holds every split's partial row in registers; beyond this the wave-filling rule
# gains nothing that matters (it only binds when B * H_kv * row blocks < 7 on an H200).
MAX_SPLITS = 64
_INTERPRETER_SMS = 4  # stands in for the SM count under the interpreter (exercises several splits)


def triton_available() -> str | None:
    """Why Triton cannot run at all here, or None."""
    if triton is None:
        return "triton is not installed"
    return None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def triton_supports(q: torch.Tensor, chunk_size: int) -> str | None:
    """Why the triton backend cannot serve this call, or None when it can."""
    reason = triton_available()
    if reason is not None:
        return reason
    if q.device.type == "cpu" and not interpreting():
        return (
            "the triton backend needs CUDA tensors (CPU tensors run only in Triton's interpreter: "
            "set TRITON_INTERPRET=1 before the process imports triton)"
        )
    if q.device.type not in ("cuda", "cpu"):
        return f"the triton backend runs on CUDA, got device {q.device}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the triton backend takes float32/bfloat16/float16, got {q.dtype}"
    if chunk_size > 256:
        return f"the triton backend loads one chunk per tile, chunk_size <= 256, got {chunk_size}"
    if q.shape[-1] > 256:
        return f"the triton backend supports head_dim <= 256, got {q.shape[-1]}"
    return None


def _pow2(n: int, minimum: int = 16) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(minimum, triton.next_power_of_2(n))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_stages(block_n: int, block_d: int) -> int:
    """Pipeline depth: 3 (two K/V tiles in flight while one is used) up to 64x128 tiles, 2 above,
    where three 128x128 K+V buffers (139 KB of shared memory) would leave one program per SM."""
    return 3 if block_n * block_d <= 64 * 128 else 2


def resident_programs(block_n: int, block_d: int, element_size: int) -> int:
    """Split-kernel programs one SM holds at once (sm_90, 4 warps). Shared memory: the K and V
    tiles of (stages - 1) iterations in flight plus a little for Q and P; registers: 168 per
    thread at 64x128 bf16 tiles (3 programs per SM), 234 at 128x128 (2), read from the compiled
    kernels with ``cuobjdump -res-usage``."""
    stages = num_stages(block_n, block_d)
    smem = (stages - 1) * 2 * block_n * block_d * element_size + 8 * 1024
    by_smem = max(1, (227 * 1024) // smem)
    by_regs = 3 if block_n * block_d <= 64 * 128 else 2
    return min(by_smem, by_regs)


def num_splits(
    programs: int, n_slots: int, chunk_size: int, device: torch.device, resident: int
) -> int:
    """Splits per (batch x KV head, row block), so that programs x splits fills the GPU in one
    wave (``resident`` programs per SM): a second, partial wave would cost as much as a full one.
    No split is shorter than MIN_TOKENS_PER_SPLIT tokens of slots. Above one wave, one split."""
    sms = _INTERPRETER_SMS if device.type == "cpu" else _sm_count(device.index or 0)
    want = (sms * resident) // max(programs, 1)
    most = math.ceil(n_slots * chunk_size / MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, most, n_slots, MAX_SPLITS))


@_jit
def _split_kernel(
    Q,
    K,
    V,
    TABLE,
    KV_LEN,
    O_PART,
    LSE_PART,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_tb,
    stride_th,
    stride_ts,
    heads_kv,
    n_slots,
    slots_per_split,
    n_splits,
    len_q,
    group,
    HEAD_DIM: tl.constexpr,
    chunk_size,
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INTERPRET_SLOTS: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // heads_kv
    h = pid_bh % heads_kv
    rows = group * len_q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded row = g * S_q + i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    d_ok = offs_d < HEAD_DIM
    g = offs_m // len_q
    i = offs_m % len_q
    q_ptrs = (
        Q
        + b * stride_qb
        + (h * group + g)[:, None] * stride_qh
        + i[:, None] * stride_qs
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    kv_len = tl.load(KV_LEN + b).to(tl.int64)
    q_pos = kv_len - len_q + i  # logical position of each row's query

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    t_base = TABLE + b * stride_tb + h * stride_th

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    start = split * slots_per_split
    # Under the interpreter the loop bound must be a Python int (see INTERPRET_SLOTS); it is not
    # assigned to a name first because the interpreter turns every assigned value into a tensor.
    for j in range(0, slots_per_split if INTERPRET_SLOTS == 0 else INTERPRET_SLOTS):
        slot = start + j  # the last split may run past n_slots: those slots read as empty
        chunk = tl.load(t_base + slot * stride_ts, mask=slot < n_slots, other=-1).to(tl.int64)
        pos = chunk * chunk_size + offs_n
        key_ok = (offs_n < chunk_size) & (chunk >= 0) & (pos < kv_len)
        tok = slot.to(tl.int64) * chunk_size + offs_n
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_base + tok[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 units
        allowed = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (pos[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no key its max is -inf; subtract 0 instead so no inf - inf = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + tok[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        p = p.to(v.dtype)  # P rounded to the input dtype for the tensor-core product
        if DOT_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    ln2 = 0.6931471805599453
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * ln2, float("-inf"))
    part = (pid_bh * n_splits + split) * rows + offs_m  # O_PART [B*H_kv, splits, rows, D]
    tl.store(
        O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
        out,
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE_PART + part, lse, mask=row_ok)


@_jit
def _merge_kernel(
    O_PART,
    LSE_PART,
    OUT,
    LSE,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    heads_kv,
    n_splits,
    len_q,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (b * H_kv + h) * rows + row
    rows = group * len_q
    bh = pid // rows
    row = pid % rows
    b = bh // heads_kv
    h = bh % heads_kv
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM
    part = (bh * n_splits + offs_s) * rows + row
    lse_s = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    top = tl.max(lse_s, 0)
    top_use = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_s - top_use)  # 0 for splits that saw no key
    total = tl.sum(w, 0)
    o = tl.load(
        O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    seen = total > 0.0
    out = tl.sum(o * w[:, None], 0) / tl.where(seen, total, 1.0)
    head = h * group + row // len_q
    out_ptrs = OUT + b * stride_ob + head * stride_oh + (row % len_q) * stride_os
    tl.store(out_ptrs + offs_d * stride_od, out.to(OUT.dtype.element_ty), mask=d_ok)
    lse = tl.where(seen, top_use + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(LSE + (b * heads_kv + h) * rows + row, lse)


def triton_reserve_attention(
    q: torch.Tensor,
    k_reserve: torch.Tensor,
    v_reserve: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    chunk_size: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference_reserve_attention``; inputs validated by the caller.

    ``splits`` overrides the split count chosen by :func:`num_splits` (benchmarks sweep it).
    """
    b, hq, sq, d = q.shape
    hkv = k_reserve.shape[1]
    group = hq // hkv
    n_slots = block_table.shape[2]
    rows = group * sq
    block_m = min(64, _pow2(rows))
    m_blocks = triton.cdiv(rows, block_m)
    block_n = _pow2(chunk_size)
    block_d = _pow2(d)
    if splits is None:
        resident = resident_programs(block_n, block_d, q.element_size())
        splits = num_splits(b * hkv * m_blocks, n_slots, chunk_size, q.device, resident)
    splits = max(1, min(splits, n_slots, 4 * MAX_SPLITS))
    per_split = triton.cdiv(n_slots, splits)
    splits = max(1, triton.cdiv(n_slots, per_split))  # no split left without slots

    out = torch.empty(b, hq, sq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, hkv, rows, device=q.device, dtype=torch.float32)
    o_part = torch.empty(b * hkv, splits, rows, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    # Triton 3.6's interpreter multiplies bf16 dot operands wrongly; it gets their fp32 values.
    dot_fp32 = interpreting() and q.dtype == torch.bfloat16
    # Shared tables ([B, 1, n_slots]) broadcast over KV heads through a zero stride.
    stride_th = block_table.stride(1) if block_table.shape[1] > 1 else 0
    _split_kernel[(b * hkv, splits, m_blocks)](
        q,
        k_reserve,
        v_reserve,
        block_table,
        kv_len,
        o_part,
        lse_part,
        *q.stride(),
        *k_reserve.stride(),
        *v_reserve.stride(),
        block_table.stride(0),
        stride_th,
        block_table.stride(2),
        hkv,
        n_slots,
        per_split,
        splits,
        sq,
        group,
        d,
        chunk_size,
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2(e))
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        # Triton 3.6's interpreter turns a runtime loop bound into a 1-element NumPy array, which
        # NumPy >= 2.3 refuses to convert to an int; there a constexpr bound costs no compile.
        INTERPRET_SLOTS=per_split if interpreting() else 0,
        num_warps=4,
        num_stages=num_stages(block_n, block_d),
    )
    block_s = _pow2(splits, minimum=2)
    _merge_kernel[(b * hkv * rows,)](
        o_part,
        lse_part,
        out,
        lse,
        *out.stride(),
        hkv,
        splits,
        sq,
        group,
        d,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        num_warps=8 if block_s * block_d > 64 * 128 else 4,
    )
    if return_lse:
        return out, lse.view(b, hkv, group, sq).reshape(b, hq, sq)
    return out
