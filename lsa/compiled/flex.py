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

import logging
import types
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch._inductor.exc
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lsa.compiled.block_mask import Q_TILE, chunk_block_lists, reserve_block_lists

log = logging.getLogger(__name__)


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
    len_kv: int  # the KV length the kernel reads (whole chunks where the KV was padded)
    #: what mask_mod and the block lists specialise a compiled kernel on (see _shape_class)
    key: tuple


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


def _flex_function(name: str):
    """A flex_attention wrapper with a code object of its own, hence a compile cache of its own
    (Dynamo keys its cache, and counts recompilations, by code object)."""

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

    code = flex.__code__.replace(co_name=name)
    return types.FunctionType(code, flex.__globals__, name, None, flex.__closure__)


_EAGER = _flex_function("flex_eager")

#: compiled flex functions by shape class (:func:`_shape_class`), least recently used first
_COMPILED: OrderedDict[tuple, object] = OrderedDict()
#: shape classes kept compiled; an evaluation loop over real prompts meets a few dozen
MAX_SHAPE_CLASSES = 64

#: CPU shape classes whose dynamic kernel failed to build: compiled per exact shape instead
_STATIC_CLASSES: set[tuple] = set()

#: what Inductor raises when a generated kernel does not build
_BUILD_FAILED = tuple(
    getattr(mod, name)
    for mod, name in (
        (torch._inductor.exc, "InductorError"),
        (torch._dynamo.exc, "BackendCompilerFailed"),
    )
    if hasattr(mod, name)
)

#: what Dynamo raises for a fullgraph function past its recompile limit (the name changed in 2.x)
_RECOMPILE_LIMIT = tuple(
    getattr(torch._dynamo.exc, name)
    for name in ("FailOnRecompileLimitHit", "RecompileLimitExceeded", "CacheLimitExceeded")
    if hasattr(torch._dynamo.exc, name)
)


def _shape_class(q, k, plan: FlexPlan, scale, enable_gqa, return_lse, kernel_options) -> tuple:
    """What one compiled flex function serves: everything it specialises on except the sizes
    that may vary inside it.

    On CUDA the sequence lengths vary (Dynamo makes them dynamic after the first change, so a
    decode loop whose KV grows does not recompile); batch and heads stay static, as FlexDecoding
    needs, and the chunk size is the kernel's block size (torch 2.11 reused a 64-token
    FlexDecoding kernel for 128-token blocks once the batch size had become dynamic: wrong
    outputs at B=8, tests/test_flex_cuda.py). On the CPU batch, heads and lengths are all
    dynamic from the first compile (compiling costs seconds there); only which of them are 1
    is part of the class, since Dynamo specialises sizes of 1 anyway."""
    options = tuple(sorted((kernel_options or {}).items()))
    if q.device.type == "cuda":
        sizes = (q.shape[0], q.shape[1], k.shape[1], plan.rows < Q_TILE)
    else:
        sizes = tuple(n == 1 for n in (*q.shape[:3], *k.shape[1:3]))
    return (q.device, q.dtype, q.shape[3], sizes, plan.key, scale, enable_gqa, return_lse, options)


def _compiled_flex(key: tuple, dynamic: bool | None, *, fresh: bool = False):
    fn = None if fresh else _COMPILED.pop(key, None)
    if fn is None:
        fn = torch.compile(
            _flex_function(f"flex_{len(_COMPILED)}"), fullgraph=True, dynamic=dynamic
        )
    _COMPILED[key] = fn
    while len(_COMPILED) > MAX_SHAPE_CLASSES:
        _COMPILED.popitem(last=False)
    return fn


def _exact(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.stride()) for t in tensors)


def _call(key: tuple, dynamic: bool | None, args: tuple):
    # Without duck shaping, sizes that happen to be equal on the first call (a KV of one block,
    # two query rows and two chunks) are not tied together, which would recompile the next call.
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        try:
            return _compiled_flex(key, dynamic)(*args)
        except _RECOMPILE_LIMIT:  # more length classes than expected: a fresh function takes over
            return _compiled_flex(key, dynamic, fresh=True)(*args)


def _run_compiled(key: tuple, args: tuple, plan: FlexPlan):
    """Run the shape class's compiled flex; torch's limits never reach the caller.

    A function that still hits Dynamo's recompile limit is replaced by a fresh one (``_call``).
    On the CPU, Inductor's flex kernel for symbolic sizes fails to build for some shapes (C++
    "cur_kvSplitSize3 was not declared", torch 2.13): that class then compiles once per exact
    shape. Either way the result is the same compiled kernel's.
    """
    if key in _STATIC_CLASSES:
        mask = plan.block_mask
        exact = (*key, _exact(*args[:3], mask.kv_num_blocks, mask.kv_indices))
        return _call(exact, False, args)
    cpu = args[0].device.type != "cuda"
    try:
        return _call(key, True if cpu else None, args)
    except _BUILD_FAILED:
        if not cpu:
            raise
        _COMPILED.pop(key, None)
        _STATIC_CLASSES.add(key)
        log.debug("flex: exact-shape compiles for %s (the dynamic kernel did not build)", key)
        return _run_compiled(key, args, plan)


def kernel_blocks(n: int) -> int:
    """KV blocks the kernel sees for ``n`` chunks or slots: at least two, since Dynamo
    specialises a size of 1 and the first call with more blocks would compile again."""
    return max(n, 2)


def padded_length(len_kv: int, chunk_size: int, device: torch.device) -> int:
    """The KV length the kernel reads: whole blocks on the CPU, where compiled flex returned wrong
    values for some partial KV blocks (e.g. 8 keys in a 16-token block); on CUDA only a KV shorter
    than one chunk is padded (a copy of the whole KV on every call would cost what sparsity saves).
    """
    whole = kernel_blocks(-(-len_kv // chunk_size)) * chunk_size
    if device.type != "cuda" or len_kv < chunk_size:
        return whole
    return len_kv


def _pad_blocks(t: torch.Tensor, fill) -> torch.Tensor:
    """A keep mask or block table [B, h, n] padded to kernel_blocks(n) with ``fill``."""
    extra = kernel_blocks(t.shape[-1]) - t.shape[-1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((*t.shape[:-1], extra), fill)], dim=-1)


def pad_to_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, S, D] zero-padded along S to ``length`` (mask_mod hides the padding)."""
    if t.shape[2] == length:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2]))


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
    keep = _pad_blocks(_per_query_head(keep, heads_q // heads_kv, fold), False)
    per_head = keep.shape[1] > 1
    rows = (heads_q // heads_kv) * len_q if fold else len_q
    # [len_q, offset, len_kv, not causal]: a tensor, because mask_mod may not capture (symbolic)
    # ints, and data rather than a constant so that causal and not share one compiled kernel.
    sizes = torch.tensor([len_q, len_kv - len_q, len_kv, not causal], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        # The kernel's KV tile divides the chunk, so kv_idx // chunk_size stays in range; keys
        # past len_kv are padding (see pad_to_chunks).
        kept = keep[b, h if per_head else 0, kv_idx // chunk_size] & (kv_idx < sizes[2])
        q_pos = (q_idx % sizes[0] if fold else q_idx) + sizes[1]
        return kept & ((kv_idx <= q_pos) | (sizes[3] > 0))

    lists = chunk_block_lists(
        keep,
        chunk_size=chunk_size,
        len_q=len_q,
        len_kv=len_kv,
        rows=rows,
        causal=causal,
        full_lists=_full_lists(device, rows),
    )
    n_chunks = keep.shape[-1]
    kernel_len = padded_length(len_kv, chunk_size, device)
    block_mask = _block_mask(lists, mask_mod, chunk_size, rows, kernel_len)
    key = ("sparse", chunk_size, fold, per_head, lists.full_kv_num_blocks is not None)
    return FlexPlan(block_mask, fold, rows, chunk_size, n_chunks, kernel_len, key)


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
    block_table = _pad_blocks(_per_query_head(block_table, heads_q // heads_kv, fold), -1)
    per_head = block_table.shape[1] > 1
    rows = (heads_q // heads_kv) * len_q if fold else len_q
    flags = torch.tensor([len_q, not causal], device=device)  # data, as in sparse_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        chunk = block_table[b, h if per_head else 0, kv_idx // chunk_size]
        pos = chunk * chunk_size + kv_idx % chunk_size
        ok = (chunk >= 0) & (pos < kv_len[b])
        q_pos = (q_idx % flags[0] if fold else q_idx) + kv_len[b] - flags[0]
        return ok & ((pos <= q_pos) | (flags[1] > 0))

    lists = reserve_block_lists(
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
    key = ("reserve", chunk_size, fold, per_head, lists.full_kv_num_blocks is not None)
    return FlexPlan(block_mask, fold, rows, chunk_size, n_slots, n_slots * chunk_size, key)


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
    k, v = pad_to_chunks(k, plan.len_kv), pad_to_chunks(v, plan.len_kv)
    qf = q.reshape(b, hkv, (hq // hkv) * sq, d) if plan.fold else q
    enable_gqa = hq != hkv and not plan.fold
    options = _kernel_options(q, hkv, plan)
    args = (qf, k, v, plan.block_mask, scale, enable_gqa, return_lse, options)
    if q.device.type == "cpu" and return_lse:
        # Compiled CPU flex cannot return the LSE; eager flex computes the same function
        # (mask_mod carries the whole selection), only without skipping blocks.
        res = _EAGER(*args)
    else:
        key = _shape_class(qf, k, plan, scale, enable_gqa, return_lse, options)
        res = _run_compiled(key, args, plan)
    if not plan.fold:
        return res
    # Unfold [B, H_kv, G * S_q, ...] back to [B, H_q, S_q, ...].
    if return_lse:
        out, lse = res
        return out.reshape(b, hq, sq, -1), lse.reshape(b, hq, sq)
    return res.reshape(b, hq, sq, -1)


def _two_rows(q: torch.Tensor) -> bool:
    """A single query on the CPU runs as the second of two rows (the first, one position
    earlier, is discarded): Inductor's CPU flex kernel for one query and symbolic KV sizes fails
    to build for some lengths (torch 2.13), and one kernel then serves decode and longer blocks."""
    return q.device.type == "cpu" and q.shape[2] == 1


def _last_row(res, return_lse: bool):
    if return_lse:
        return res[0][:, :, 1:], res[1][:, :, 1:]
    return res[:, :, 1:]


def flex_sparse_attention(q, k, v, keep, *, chunk_size, causal=True, scale=None, return_lse=False):
    """Same contract as ``reference_sparse_attention``; inputs validated by the caller."""
    if _two_rows(q):
        res = flex_sparse_attention(
            torch.cat([q, q], 2), k, v, keep,
            chunk_size=chunk_size, causal=causal, scale=scale, return_lse=return_lse,
        )  # fmt: skip
        return _last_row(res, return_lse)
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
    if _two_rows(q):
        res = flex_reserve_attention(
            torch.cat([q, q], 2), k_reserve, v_reserve, block_table, kv_len,
            chunk_size=chunk_size, causal=causal, scale=scale, return_lse=return_lse,
        )  # fmt: skip
        return _last_row(res, return_lse)
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
