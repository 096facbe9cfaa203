"""``python -m lsa longgen``: long-generation fidelity of lsa, oracle, recency and random.

For each prompt of the chosen split (:mod:`lsa.eval.long_prompts`: an essay document with
records, an assignment chain or nothing inserted, and an instruction that needs a long answer),
the dense greedy answer is generated once, then every method x budget x τ is teacher-forced on it
through :class:`lsa.LSACache`'s decode path and, unless ``--no-free-run``, decoded on its own
(:mod:`lsa.eval.long`). Example (CPU, SmolLM2 and its shipped indexer)::

    python -m lsa longgen --model smollm2 --length 2048 --new-tokens 96 --documents 1 \\
        --out runs/longgen_smollm2

Writes under ``--out``: ``results.json`` (settings, versions, and per prompt its dense answer and
one record per method with the per-token KL, refresh steps and costs; rewritten after every
prompt), ``results.md`` (the table) and ``kl_over_generation.png`` (``--no-plots`` skips it).
Choose settings on ``--split tune``; report ``--split test`` (the default), on which nothing is
chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
from lsa.eval.long import METHODS
from lsa.eval.long_prompts import KINDS, SPLITS
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="smollm2", help="smollm2, qwen, qwen-1.5b or a transformers model folder")
    a("--indexer", default=None, help="indexer name or folder (default: the model's shipped one)")
    a("--split", default="test", choices=list(SPLITS), help="prompt split (default test)")
    a("--documents", type=COUNT, default=1, help="documents of the split (x kinds = prompts)")
    a("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="instruction kinds")
    a("--facts", type=COUNT, default=24, help="lines inserted for records / trace (default 24)")
    a(
        "--length",
        type=Number(int, 256),
        default=4096,
        help="document tokens (default 4096; facts and instruction come on top)",
    )
    a(
        "--new-tokens",
        type=Number(int, 2),
        default=512,
        help="tokens of the dense answer (default 512; it may end earlier at end of sequence)",
    )
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    a("--budget", type=FRACTION, nargs="+", default=[0.1, 0.2], help="fractions of chunks kept")
    a(
        "--refresh-every",
        type=COUNT,
        nargs="+",
        default=[16, 64, 256],
        help="τ values, decode steps between refreshes (default 16 64 256)",
    )
    a("--chunk-size", type=COUNT, default=64, help="tokens per chunk (must match the indexer)")
    a("--sink-chunks", type=NON_NEGATIVE, default=SINK_CHUNKS)
    a("--recent-chunks", type=NON_NEGATIVE, default=RECENT_CHUNKS)
    a("--seed", type=NON_NEGATIVE, default=0, help="documents, facts and Random scorer seed")
    a("--device", type=device_option, default=None, help="cpu or cuda (default: cuda if any)")
    a("--dtype", default="float32", choices=list(DTYPES), help="model dtype (default float32)")
    a("--no-free-run", action="store_true", help="teacher forcing only (no answer overlap)")
    a(
        "--ignore-eos",
        action="store_true",
        help="greedy decoding never picks end of sequence, so every answer runs --new-tokens "
        "(for models that stop early; the KL still uses the full distributions)",
    )
    a("--out", type=Path, required=True, help="output folder")
    a("--no-plots", action="store_true", help="skip the plot (no matplotlib needed)")
    a(
        "--prompts",
        type=Path,
        default=None,
        help="read the prompts from a file --prepare-only wrote (no essay package needed; "
        "--kinds selects among them, --split, --documents, --facts, --length are ignored)",
    )
    a(
        "--prepare-only",
        action="store_true",
        help="write OUT/prompts.jsonl (needs the model's tokenizer only) and stop",
    )


def _settings(args) -> list:
    from lsa.eval.long import Setting

    return [
        Setting(
            method=m,
            budget=b,
            refresh_every=tau,
            chunk_size=args.chunk_size,
            sink_chunks=args.sink_chunks,
            recent_chunks=args.recent_chunks,
        )
        for b in args.budget
        for tau in args.refresh_every
        for m in args.methods
    ]


def run(args: argparse.Namespace) -> int:
    """The ``longgen`` command; every check that can fail runs before the model loads."""
    from tqdm.auto import tqdm

    from lsa.eval import long_report, ruler
    from lsa.eval.cli import load_eval_indexer
    from lsa.eval.long import dense_continuation, make_scorer, measure
    from lsa.eval.long_prompts import build_prompts, read_prompts, write_prompts
    from lsa.eval.runner import eos_token_ids
    from lsa.models import ALIASES, KNOWN_DIMS, load_model, model_dims, model_dir

    t0 = time.perf_counter()
    check_output_dir("--out", args.out)
    if not args.no_plots:
        check_installed("drawing the plot", [("matplotlib", "pip install matplotlib")],
                        ", or pass --no-plots")  # fmt: skip
    if args.prompts is not None:
        check_input_file("--prompts", args.prompts)
        if args.prepare_only:
            raise UsageError("--prompts and --prepare-only exclude each other")
    else:
        check_installed("the essay documents", ruler.REQUIREMENTS[:1], "; or pass --prompts")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    name = ALIASES.get(args.model, args.model)
    try:
        dims = model_dims(name)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    needs_indexer = "lsa" in args.methods and not args.prepare_only
    indexer = load_eval_indexer(args, name, dims) if needs_indexer else None
    prompts = None
    if args.prompts is not None:
        try:
            prompts = [p for p in read_prompts(args.prompts) if p.kind in args.kinds]
        except ValueError as err:
            raise UsageError(f"--prompts: {err}") from None
        if not prompts:
            raise UsageError(f"--prompts: {args.prompts} holds no prompts of --kinds {args.kinds}")
    try:
        path = model_dir(name)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    if prompts is None:
        from transformers import AutoTokenizer

        prompts = build_prompts(
            AutoTokenizer.from_pretrained(str(path)),
            length=args.length,
            per_split={args.split: args.documents},
            kinds=tuple(args.kinds),
            n_facts=args.facts,
            seed=args.seed,
        )
        write_prompts(prompts, args.out / "prompts.jsonl")
        if args.prepare_only:
            print(f"{len(prompts)} prompts -> {args.out / 'prompts.jsonl'}")
            return 0
    model, tokenizer = load_model(name, dtype=DTYPES[args.dtype])
    if tokenizer is None:
        raise UsageError(f"--model {args.model}: {path} has no tokenizer")
    model.to(args.device)
    if indexer is not None:
        indexer = indexer.to(args.device)
    eos = eos_token_ids(model)
    settings = _settings(args)
    tag = name if name in KNOWN_DIMS else Path(name).name
    meta = {
        "title": (
            f"{tag}, long generation on the {'/'.join(sorted({p.split for p in prompts}))} split "
            f"({len(prompts)} prompts: {', '.join(p.id for p in prompts)}), "
            f"{args.new_tokens} dense tokens{' (end of sequence ignored)' * args.ignore_eos}, "
            f"{args.dtype} on "
            f"{args.device}, chunk {args.chunk_size}, sink {args.sink_chunks} + recent "
            f"{args.recent_chunks} inside the budget, seed {args.seed}"
        ),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    passes = 1 + len(settings) * (1 if args.no_free_run else 2)
    # decode steps (an answer that ends early leaves the bar short of its total)
    bar = tqdm(total=len(prompts) * passes * (args.new_tokens - 1), desc="longgen", unit="step",
               file=sys.stderr)  # fmt: skip
    results = []
    try:
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                tokenize=False,
            ) if getattr(tokenizer, "chat_template", None) else prompt.text  # fmt: skip
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            bar.set_postfix_str(f"{prompt.id} dense")
            dense = dense_continuation(
                model, ids, args.new_tokens, eos_ids=eos, ignore_eos=args.ignore_eos,
                progress=lambda: bar.update(),
            )  # fmt: skip
            entry = {
                "id": prompt.id,
                "split": prompt.split,
                "kind": prompt.kind,
                "facts": list(prompt.facts),
                "prompt_tokens": len(ids),
                "dense_tokens": dense.tokens,
                "dense_answer": tokenizer.decode(dense.tokens, skip_special_tokens=True),
                "records": [],
            }
            for s in settings:
                bar.set_postfix_str(f"{prompt.id} {s.name}")
                scorer = make_scorer(s, indexer=indexer, model=model, dense=dense, seed=args.seed)
                rec = measure(
                    model, dense, s, scorer, free_run=not args.no_free_run, eos_ids=eos,
                    progress=lambda: bar.update(),
                )  # fmt: skip
                if "answer_tokens" in rec:
                    rec["answer"] = tokenizer.decode(rec["answer_tokens"], skip_special_tokens=True)
                entry["records"].append({"prompt": prompt.id, **rec})
                # after every setting: a run cut short keeps what it measured
                meta["wall_s"] = time.perf_counter() - t0
                done = {**meta, "prompts": [*results, entry]}
                (args.out / "results.json").write_text(json.dumps(done))
            results.append(entry)
    finally:
        bar.close()
    records = long_report.records_of({"prompts": results})
    md = long_report.markdown(records, title=meta["title"])
    (args.out / "results.md").write_text(md)
    print(md)
    if not args.no_plots:
        print(long_report.plot(records, args.out))
    print(f"{args.out / 'results.json'} ({meta['wall_s']:.0f} s)")
    return 0


__all__ = ["add_arguments", "run"]
