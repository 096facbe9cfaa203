"""Sparse attention through FlexAttention under torch.compile.

The chunk selection is expressed twice, on purpose: as block lists (what the compiled kernel reads,
so only kept chunks cost bandwidth) and in ``mask_mod`` (what eager FlexAttention applies, and what
the kernel applies inside partial blocks), so eager and compiled compute the same function.

Plan once, run many: :func:`sparse_block_mask` / :func:`reserve_block_mask` build a ``BlockMask``
on the device (no host sync), :func:`flex_attend` runs the compiled kernel with it. Sizes that
mask_mod reads travel as tensors, so a decode loop whose KV grows by one token per step does not
recompile; a reserve mask stays valid while ``kv_len`` grows, until the block table changes.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lsa.compiled.block_mask import Q_TILE, chunk_block_lists, reserve_block_lists


def flex_supports(q: torch.Tensor, chunk_size: int) -> str | None:
    """Why the flex backend cannot serve this call, or None when it can."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        return f"chunk_size must be a power of two >= 16 for the flex backend, got {chunk_size}"
    if q.device.type == "cuda" and chunk_size > 128:
        return f"chunk_size must be <= 128 for the flex backend on CUDA, got {chunk_size}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the flex backend takes fp32, bf16 or fp16, got {q.dtype}"
    if q.device.type == "cuda" and q.shape[-1] < 16:
        return f"head dim must be >= 16 for the flex backend on CUDA, got {q.shape[-1]}"
    return None


@dataclass(frozen=True)
class FlexPlan:
    """A BlockMask plus how the queries are laid out for it."""

    block_mask: BlockMask
    fold: bool  # query groups folded into rows: [B, H_q, S_q, D] -> [B, H_kv, G * S_q, D]
    rows: int  # query rows per mask head
    chunk_size: int
    max_blocks: int  # most KV blocks one row may list (n_chunks or n_slots); sizes the KV splits


def use_fold(heads_q: int, heads_kv: int, per_head: bool, device: torch.device) -> bool:
    """CUDA FlexDecoding needs mask heads of 1 or H_q and a power-of-two GQA group; folding each
    KV head's query group into rows meets both for per-KV-head masks and odd groups. The CPU
    kernel has neither limit (and miscompiles the row -> position modulo), so there per-KV-head
    masks are repeated over their query heads instead."""
    group = heads_q // heads_kv
    return device.type == "cuda" and group > 1 and (per_head or group & (group - 1) != 0)


def _per_query_head(mask: torch.Tensor, group: int, fold: bool) -> torch.Tensor:
    """Repeat a per-KV-head [B, H_kv, n] mask over query heads when the rows are not folded."""
    if fold or group == 1 or mask.shape[1] == 1:
        return mask
    return mask.repeat_interleave(group, dim=1)


def _full_lists(device: torch.device, rows: int) -> bool | None:
    # Compiled CPU flex needs full-block lists present. The CUDA decode kernel (FlexDecoding,
    # < 128 query rows) sizes its KV splits by the whole KV length once full lists exist, so a
    # sparse mask would leave most splits idle: there every kept chunk goes in the partial lists.
    if device.type != "cuda":
        return True
    return True if rows >= Q_TILE else None


#: KV blocks each split of the CUDA decode kernel walks; it walks them one after another, so
#: fewer per split means more parallel work (measured in bench/test_decode.py).
BLOCKS_PER_SPLIT = 16


def _kernel_options(q: torch.Tensor, heads_kv: int, plan: FlexPlan) -> dict | None:
    if q.device.type != "cuda":
        return None
    # The kernel's KV tile is the chunk: torch 2.11's FlexDecoding gave wrong results at B=8
    # when a split boundary fell inside a 128-token sparse block walked in 64-token tiles.
    options = {"BLOCK_N": plan.chunk_size}
    if plan.rows < Q_TILE:
        # FlexDecoding's default splits the KV 2 * SMs / (B * H_kv) ways: at B=8 that is 4 splits
        # each walking hundreds of kept chunks in sequence. Split by the listed blocks instead,
        # in powers of two so a growing cache recompiles only at doublings.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        default = max(1, 2 * sms // max(1, q.shape[0] * heads_kv))
        wanted = -(-plan.max_blocks // BLOCKS_PER_SPLIT)
        options["SPLIT_KV"] = max(default, 1 << max(0, wanted - 1).bit_length())
    return options


def _compile(fn):
    # On CUDA, sizes a decode loop changes become dynamic after the first recompile. Inductor's CPU
    # flex kernel (torch 2.13) fails on symbolic sizes, so on CPU every new shape compiles afresh.
    return {
        "cuda": torch.compile(fn, fullgraph=True),
        "cpu": torch.compile(fn, fullgraph=True, dynamic=False),
    }


def _flex_for_chunk(chunk_size: int):
    """A flex_attention wrapper with its own code object, hence its own compile cache.

    torch 2.11 reused a FlexDecoding kernel compiled for 64-token blocks on 128-token blocks once
    the batch size had become dynamic (wrong outputs at B=8; tests/test_flex_cuda.py); Dynamo
    keys its cache by code object, so one wrapper per chunk size keeps the block size static.
    """

    def flex(q, k, v, block_mask, scale, enable_gqa, return_lse, kernel_options):
        return flex_attention(
            q,
            k,
            v,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=enable_gqa,
            return_lse=return_lse,
            kernel_options=kernel_options,
        )

    code = flex.__code__.replace(co_name=f"flex_chunk{chunk_size}")
    return types.FunctionType(code, flex.__globals__, code.co_name, None, flex.__closure__)


@functools.cache
def _flex(kind: str, chunk_size: int):
    return _compile(_flex_for_chunk(chunk_size))[kind]


_chunk_lists = _compile(chunk_block_lists)
_reserve_lists = _compile(reserve_block_lists)


def _device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _block_mask(lists, mask_mod, chunk_size: int, rows: int, len_kv: int) -> BlockMask:
    return BlockMask.from_kv_blocks(
        lists.kv_num_blocks,
        lists.kv_indices,
        lists.full_kv_num_blocks,
        lists.full_kv_indices,
        BLOCK_SIZE=(Q_TILE, chunk_size),
        mask_mod=mask_mod,
        seq_lengths=(rows, len_kv),
        compute_q_blocks=False,
    )


def sparse_block_mask(
    keep: torch.Tensor,
    *,
    chunk_size: int,
    heads_q: int,
    heads_kv: int,
    len_q: int,
    len_kv: int,
    causal: bool = True,
) -> FlexPlan:
    """Plan sparse attention over the full logical KV for a keep mask [B, 1|H_kv, n_chunks]."""
    device = keep.device
    fold = use_fold(heads_q, heads_kv, keep.shape[1] > 1, device)
    keep = _per_query_head(keep, heads_q // heads_kv, fold)
    per_head = keep.shape[1] > 1
    rows = (heads_q // heads_kv) * len_q if fold else len_q
    # [len_q, offset]: a tensor, because mask_mod may not capture (symbolic) ints.
    sizes = torch.tensor([len_q, len_kv - len_q], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        # The kernel's KV tile divides the chunk, so kv_idx // chunk_size stays in range.
        kept = keep[b, h if per_head else 0, kv_idx // chunk_size]
        if not causal:
            return kept
        q_pos = (q_idx % sizes[0] if fold else q_idx) + sizes[1]
        return kept & (kv_idx <= q_pos)

    lists = _chunk_lists[_device_kind(device)](
        keep,
        chunk_size=chunk_size,
        len_q=len_q,
        len_kv=len_kv,
        rows=rows,
        causal=causal,
        full_lists=_full_lists(device, rows),
    )
    block_mask = _block_mask(lists, mask_mod, chunk_size, rows, len_kv)
    return FlexPlan(block_mask, fold, rows, chunk_size, keep.shape[-1])


def reserve_block_mask(
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    chunk_size: int,
    heads_q: int,
    heads_kv: int,
    len_q: int,
    causal: bool = True,
) -> FlexPlan:
    """Plan attention over a compacted reserve (slot s holds logical chunk block_table[..., s]).

    The plan reads ``kv_len`` when it runs, so it stays valid while ``kv_len`` grows in place;
    rebuild it only when the block table changes.
    """
    device = block_table.device
    fold = use_fold(heads_q, heads_kv, block_table.shape[1] > 1, device)
    block_table = _per_query_head(block_table, heads_q // heads_kv, fold)
    per_head = block_table.shape[1] > 1
    rows = (heads_q // heads_kv) * len_q if fold else len_q
    len_q_t = torch.tensor(len_q, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        chunk = block_table[b, h if per_head else 0, kv_idx // chunk_size]
        pos = chunk * chunk_size + kv_idx % chunk_size
        ok = (chunk >= 0) & (pos < kv_len[b])
        if not causal:
            return ok
        q_pos = (q_idx % len_q_t if fold else q_idx) + kv_len[b] - len_q_t
        return ok & (pos <= q_pos)

    lists = _reserve_lists[_device_kind(device)](
        block_table,
        kv_len,
        chunk_size=chunk_size,
        len_q=len_q,
        rows=rows,
        causal=causal,
        full_lists=_full_lists(device, rows),
    )
    n_slots = block_table.shape[-1]
    block_mask = _block_mask(lists, mask_mod, chunk_size, rows, n_slots * chunk_size)
    return FlexPlan(block_mask, fold, rows, chunk_size, n_slots)


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: FlexPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Run compiled FlexAttention with a plan; q [B, H_q, S_q, D], k/v [B, H_kv, S, D]."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qf = q.reshape(b, hkv, (hq // hkv) * sq, d) if plan.fold else q
    if q.device.type == "cpu" and return_lse:
        # Compiled CPU flex cannot return the LSE; eager flex computes the same function
        # (mask_mod carries the whole selection), only without skipping blocks.
        fn = flex_attention
    else:
        fn = _flex(_device_kind(q.device), plan.chunk_size)
    res = fn(
        qf,
        k,
        v,
        block_mask=plan.block_mask,
        scale=scale,
        enable_gqa=hq != hkv and not plan.fold,
        return_lse=return_lse,
        kernel_options=_kernel_options(q, hkv, plan),
    )
    if not plan.fold:
        return res
    # Unfold [B, H_kv, G * S_q, ...] back to [B, H_q, S_q, ...].
    if return_lse:
        out, lse = res
        return out.reshape(b, hq, sq, -1), lse.reshape(b, hq, sq)
    return res.reshape(b, hq, sq, -1)


def flex_sparse_attention(q, k, v, keep, *, chunk_size, causal=True, scale=None, return_lse=False):
    """Same contract as ``reference_sparse_attention``; inputs validated by the caller."""
    plan = sparse_block_mask(
        keep,
        chunk_size=chunk_size,
        heads_q=q.shape[1],
        heads_kv=k.shape[1],
        len_q=q.shape[2],
        len_kv=k.shape[2],
        causal=causal,
    )
    return flex_attend(q, k, v, plan, scale=scale, return_lse=return_lse)


def flex_reserve_attention(
    q,
    k_reserve,
    v_reserve,
    block_table,
    kv_len,
    *,
    chunk_size,
    causal=True,
    scale=None,
    return_lse=False,
):
    """Same contract as ``reference_reserve_attention``; inputs validated by the caller."""
    plan = reserve_block_mask(
        block_table,
        kv_len,
        chunk_size=chunk_size,
        heads_q=q.shape[1],
        heads_kv=k_reserve.shape[1],
        len_q=q.shape[2],
        causal=causal,
    )
    return flex_attend(q, k_reserve, v_reserve, plan, scale=scale, return_lse=return_lse)
