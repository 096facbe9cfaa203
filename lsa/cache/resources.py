"""Where an :class:`~lsa.cache.LSACache` keeps its memory, and whether a request fits.

The device arguments are checked when the cache is built. The pre-flight check runs when a
request starts (the prompt's batch and length are known) on a cache given ``max_new_tokens``: the
host mirror for the prompt plus ``max_new_tokens`` and the device reserve at its worst case for
the budget must fit in the memory available now, or the request fails before its first forward
stores anything, with the bytes needed and available, instead of running out in the middle of
decoding.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from lsa.reference.select import budget_count

DEVICE_TYPES = ("cpu", "cuda")


class CacheMemoryError(MemoryError):
    """A request needs more host or device memory than is available (raised before it starts)."""


def check_device(name: str, value: object) -> torch.device:
    """``value`` as a torch.device on which the cache can allocate, or a ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, torch.device | str | Integral):
        raise TypeError(
            f"{name} must be a torch.device, a str such as 'cpu' or 'cuda:0', or a CUDA device "
            f"index, got {type(value).__name__} {value!r}"
        )
    try:
        # an int is a CUDA index (torch.device(int) means the current accelerator)
        device = (
            torch.device("cuda", int(value)) if isinstance(value, Integral) else torch.device(value)
        )
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        ) from exc
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be a CPU or CUDA device, got {value!r} ({device.type})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}={value!r} needs CUDA, but torch.cuda.is_available() is False here"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{name}={value!r} does not exist: this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1})"
            )
    return device


def host_available_bytes() -> int | None:
    """Host memory that can still be allocated: MemAvailable (Linux), else psutil's figure if it
    is installed, else None (unknown: the host side is then not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator holds but does not use serve new tensors too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available_bytes()


def worst_case_slots(
    *,
    tokens: int,
    chunk_size: int,
    budget: int | float | None,
    sink_chunks: int,
    recent_chunks: int,
    refresh_every: int,
    recall_lag: int = 0,
) -> int:
    """The most reserve slots a row of ``tokens`` logical tokens can need, as ``_refresh`` sizes
    the reserve: kept chunks (the budget, or every completed chunk under a threshold alone, forced
    chunks included), the partial chunk and the chunks begun during a recall lag, and
    ``ceil(τ / chunk_size)`` chunks of tail room."""
    done = tokens // chunk_size
    if budget is None:
        kept = done
    else:
        kept = min(done, max(budget_count(budget, done), sink_chunks + recent_chunks))
    return kept + 1 + math.ceil(recall_lag / chunk_size) + math.ceil(refresh_every / chunk_size)


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exp:.1f} {('B', 'KiB', 'MiB', 'GiB')[exp]}"


def check_request(*, needs: list[tuple[torch.device, str, int, str]], request: str) -> None:
    """Raise :class:`CacheMemoryError` unless each device's needs fit what it has available.

    ``needs``: (device, what, bytes, detail), e.g. (cpu, "the host mirror", 12e9, ""); ``request``
    describes the request ("batch 4, 131072 prompt + 512 new tokens, 32 layers")."""
    by_device: dict[torch.device, list[tuple[str, int, str]]] = {}
    for device, what, nbytes, detail in needs:
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one pool
            device = torch.device("cuda", torch.cuda.current_device())
        by_device.setdefault(device, []).append((what, nbytes, detail))
    for device, parts in by_device.items():
        total = sum(n for _, n, _ in parts)
        have = available_bytes(device)
        if have is None or total <= have:
            continue
        where = "host" if device.type == "cpu" else str(device)
        what = " and ".join(f"{w} ({format_bytes(n)}{', ' + d if d else ''})" for w, n, d in parts)
        raise CacheMemoryError(
            f"LSACache needs {format_bytes(total)} of {where} memory for {what} ({request}) but "
            f"{format_bytes(have)} are available; lower the batch, the prompt length or "
            "max_new_tokens"
        )
