"""Shared pieces of the benchmark suites: configs, environment facts, timing, result files."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class DecodeConfig:
    """One decode shape: [B, H_q, 1, D] queries against [B, H_kv, S_kv, D] keys."""

    batch: int
    heads_q: int
    heads_kv: int
    len_kv: int
    head_dim: int
    chunk_size: int
    kept: float  # fraction of chunks kept
    dtype: str

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.len_kv / self.chunk_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def name(self) -> str:
        return (
            f"B{self.batch}-S{self.len_kv // 1024}K-c{self.chunk_size}-"
            f"{self.heads_q}x{self.heads_kv}x{self.head_dim}-{self.dtype}"
        )


def _command() -> str:
    """How this process was started: ``python -m pytest ...`` or ``python -m bench.x ...``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = "pytest" if spec is None or "pytest" in spec.name else spec.name
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": _command(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def time_call(fn, device: torch.device) -> float:
    """Median seconds per call. CUDA: CUDA events with the L2 flushed before each call
    (triton.testing.do_bench); CPU: wall clock over repeats after a warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write rows with the environment as JSON under bench/results/ (and $LSA_BENCH_OUT)."""
    payload = {"environment": environment(), **(extra or {}), "rows": rows}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stamp = _dt.date.today().isoformat()
    paths = [RESULTS / f"{name}-{device}-{stamp}.json"]
    if os.environ.get("LSA_BENCH_OUT"):
        paths.append(Path(os.environ["LSA_BENCH_OUT"]) / paths[0].name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str))
    return paths[0]


def as_row(config: DecodeConfig, **fields) -> dict:
    return {**asdict(config), "config": config.name(), **fields}


def time_graph(fn, device: torch.device) -> float | None:
    """Median seconds per replay of ``fn`` captured in a CUDA graph (no launch overhead), or None
    off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_call(graph.replay, device)
