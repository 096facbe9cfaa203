"""Recall by one Triton kernel that reads the pinned host mirror directly (zero-copy).

The copy engine path (``recall="copies"``) issues one ``cudaMemcpyAsync`` per run of consecutive
chunks; with chunks scattered over the history that is hundreds of copies per refresh, and issuing
each costs the host several microseconds of Python and driver time that the decode step waits
for. Pinned host memory from ``cudaHostAlloc`` (what ``pin_memory=True`` allocates) is mapped into
the device's address space under unified addressing, at the same address, so a kernel can load it
over PCIe. One launch then moves every newly resident chunk of every layer straight into its
reserve slot: the host cost no longer grows with the number of chunks and no staging buffer is
needed. The price is SM time (the loads wait on PCIe) next to the decode kernels.

Addresses travel as int64 tensors (the launcher sees no host tensor); the kernel copies 32-bit
words, so it serves any dtype whose slot size is a multiple of 4 bytes. On CPU it runs in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported (tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)
_BLOCK = 1024  # 32-bit words per load/store: 4 KiB


def zero_copy_unavailable(device: torch.device) -> str | None:
    """Why the zero-copy recall cannot run on ``device`` (None: it can)."""
    if triton is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton.knobs.runtime.interpret:
        return None
    return f"it needs CUDA (or Triton's interpreter on CPU), got device {device}"


@_jit
def _recall_kernel(
    src_addr,  # int64 [N]: byte address of item i's chunk block [L, 2, H, cs, D] in the mirror
    dst_addr,  # int64 [L * 2]: byte address of layer l's reserve K (2l) and V (2l + 1)
    rows,  # int64 [N]
    slots,  # int64 [N]
    n_slots,
    H: tl.constexpr,
    SLOT_WORDS: tl.constexpr,  # 32-bit words of one head's slot: cs * D * itemsize / 4
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)  # (layer, K/V, head) = ((2 * l + kv) * H + h): the mirror's order
    h = j % H
    src = tl.load(src_addr + i).to(tl.pointer_type(tl.int32)) + j * SLOT_WORDS
    dst = tl.load(dst_addr + j // H).to(tl.pointer_type(tl.int32))
    b = tl.load(rows + i)
    s = tl.load(slots + i)
    dst = dst + ((b * H + h) * n_slots + s) * SLOT_WORDS
    for start in range(0, SLOT_WORDS, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < SLOT_WORDS
        tl.store(dst + offs, tl.load(src + offs, mask=inside), mask=inside)


def zero_copy_recall(
    src_addresses: torch.Tensor,
    reserves: list[tuple[torch.Tensor, torch.Tensor]],
    rows: torch.Tensor,
    slots: torch.Tensor,
    to_device,
) -> None:
    """Copy the mirror chunk blocks at byte addresses ``src_addresses[i]`` (each a contiguous
    [L, 2, H, cs, D] block of pinned host memory: :meth:`HostMirror.chunk_addresses`) into slot
    ``slots[i]`` of row ``rows[i]`` of every layer's reserve (``reserves[l] = (K, V)``, each
    contiguous [B, H, n_slots, cs, D]), on the current stream. Index tensors are int64 on the
    host; ``to_device`` moves a fresh host tensor to the reserves' device (asynchronously)."""
    n = src_addresses.numel()
    if n == 0:
        return
    if rows.shape != (n,) or slots.shape != (n,):
        raise ValueError(
            f"rows and slots must be [{n}] like src_addresses, got {tuple(rows.shape)} and "
            f"{tuple(slots.shape)}"
        )
    k0 = reserves[0][0]
    n_layers = len(reserves)
    _, heads, n_slots, cs, d = k0.shape
    slot_bytes = cs * d * k0.element_size()
    if slot_bytes % 4:
        raise ValueError(
            f"zero-copy recall copies 32-bit words: a slot of {slot_bytes} bytes "
            f"(chunk_size={cs}, head_dim={d}, {k0.dtype}) is not a multiple of 4"
        )
    for k, v in reserves:
        same = k.shape == k0.shape and v.shape == k0.shape
        if not (k.is_contiguous() and v.is_contiguous() and same):
            raise ValueError("every layer's reserve must be contiguous and of the same shape")
        if k.dtype != k0.dtype or v.dtype != k0.dtype:
            raise ValueError("every layer's reserve must have the same dtype")
    if bool((slots < 0).any()) or bool((slots >= n_slots).any()):
        raise IndexError(f"slots out of range (the reserve has {n_slots} slots)")
    dst = torch.tensor([t.data_ptr() for pair in reserves for t in pair], dtype=torch.int64)
    meta = to_device(torch.stack([src_addresses, rows, slots]).to(torch.int64))
    dst = to_device(dst)
    grid = (n, n_layers * 2 * heads)
    _recall_kernel[grid](
        meta[0],
        dst,
        meta[1],
        meta[2],
        n_slots,
        H=heads,
        SLOT_WORDS=slot_bytes // 4,
        BLOCK=min(_BLOCK, triton.next_power_of_2(slot_bytes // 4)),
    )


@_jit
def _write_kernel(
    src,  # the layer's K or V as words: [B, H, S, D * WORD_RATIO]-shaped through its strides
    dst_addr,  # int64 [N]: byte address of item i's chunk block [L, 2, H, cs, D] in the mirror
    rows,  # int64 [N]
    first_tok,  # int64 [N]: the source position of the chunk's first token (padding skipped)
    n_tok,  # int64 [N]: tokens of the chunk that exist (the rest is written as zeros)
    layer_word,  # word offset of this layer's K (or V) inside a chunk block
    s_b,
    s_h,
    s_s,
    H: tl.constexpr,
    CS: tl.constexpr,
    ROW: tl.constexpr,  # words of one token's vector
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(rows + i)
    t0 = tl.load(first_tok + i)
    n = tl.load(n_tok + i)
    word = src.dtype.element_ty
    dst = tl.load(dst_addr + i).to(tl.pointer_type(word)) + layer_word + h * CS * ROW
    r = tl.arange(0, BLOCK_R)
    for start in range(0, CS, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        inside = (t[:, None] < CS) & (r[None, :] < ROW)
        there = inside & (t[:, None] < n)
        x = tl.load(src + b * s_b + h * s_h + (t0 + t[:, None]) * s_s + r[None, :], mask=there)
        x = tl.where(there, x, tl.zeros_like(x))
        tl.store(dst + t[:, None] * ROW + r[None, :], x, mask=inside)


def zero_copy_write(
    kv: tuple[torch.Tensor, torch.Tensor],
    layer: int,
    dst_addresses: torch.Tensor,
    rows: torch.Tensor,
    first_tok: torch.Tensor,
    n_tok: torch.Tensor,
    chunk_size: int,
) -> None:
    """Write one layer's prompt K and V ([B, H, S, D] on the device, any strides with a unit last
    one) into the pinned host mirror by one kernel each, on the current stream: item ``i`` is the
    chunk whose block starts at byte address ``dst_addresses[i]`` (:meth:`HostMirror.
    chunk_addresses`), taking tokens ``first_tok[i] .. first_tok[i] + n_tok[i] - 1`` of row
    ``rows[i]`` (zeros past them). Index tensors are int64 on the device. The prefill issues it
    on a side stream, so the copy overlaps the next layers' compute instead of stalling it."""
    k = kv[0]
    _, heads, _, d = k.shape
    word = {2: torch.int16, 4: torch.int32}.get(k.element_size())
    if word is None or k.stride(-1) != 1:
        raise ValueError(
            f"zero-copy writes move 2- or 4-byte elements with a unit last stride, got {k.dtype} "
            f"with strides {k.stride()}"
        )
    n = dst_addresses.numel()
    if n == 0:
        return
    block_r = triton.next_power_of_2(d)
    block_t = max(1, min(chunk_size, 4096 // block_r))
    slot = heads * chunk_size * d  # words of one layer's K (or V) in a chunk block
    for which, t in enumerate(kv):
        words = t.view(word)
        _write_kernel[(n, heads)](
            words,
            dst_addresses,
            rows,
            first_tok,
            n_tok,
            (2 * layer + which) * slot,
            *words.stride()[:3],
            H=heads,
            CS=chunk_size,
            ROW=d,
            BLOCK_T=block_t,
            BLOCK_R=block_r,
        )
