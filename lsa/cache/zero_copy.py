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
