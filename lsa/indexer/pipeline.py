"""Dump then train in one call, the backbone confined to the dump's process.

``python -m lsa.indexer.pipeline --preset qwen2.5-coder-0.5b --corpus C.jsonl --work W --out O``
runs ``python -m lsa dump`` (the backbone's one pass over the corpus) and then, in a separate
process that never loads the backbone, ``python -m lsa train``, which writes the best indexer
(``indexer.safetensors`` + ``indexer_config.json``) and ``metrics.json`` (validation, test,
test by document length, answer positions; with Recency / Random / SnapKV-style) to ``O``.
The dump's manifest (without the per-shard document lists' tensors) and the train log are
copied beside them. The dump is resumable: run the same line again after an interruption.
``--dump-only`` stops after the dump, so dump and training can go to separate device calls.

Presets hold the recipe of each shipped indexer; any dump/train flag can be added after
``--dump-args`` / ``--train-args`` to override it (argparse keeps the last value).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lsa.cli_errors import (
    SECONDS,
    Parser,
    UsageError,
    check_input_file,
    check_output_dir,
    run_command,
)

#: dump / train arguments of each shipped indexer (see lsa/indexer/README.md for the why).
PRESETS: dict[str, dict[str, list[str]]] = {
    "qwen2.5-coder-0.5b": {
        "dump": [
            "--target-layers", "6", "12", "18", "--recent-chunks", "2",
            "--stride", "64", "--min-position", "1024", "--max-length", "16640",
            "--docs-per-shard", "8", "--query-block", "1024", "--chat-template",
        ],
        "train": ["--epochs", "12", "--loss", "kl", "--batch-size", "64"],
    },
    # The SmolLM2 recipe (README "Shipped weights: SmolLM2"), with the token keys that the
    # fine-grained key tower trains from (``--train-args --key-group 4``).
    "smollm2": {
        "dump": [
            "--target-layers", "7", "15", "23",
            "--label-layers", "1", "4", "7", "10", "13", "16", "19", "22", "25", "28",
            "--stride", "32", "--min-position", "1024", "--max-length", "8192",
            "--docs-per-shard", "1", "--query-block", "512", "--chat-template",
            "--label-reduce", "max", "--recent-chunks", "2", "--token-keys",
        ],
        "train": ["--epochs", "20", "--loss", "kl", "--answer-repeat", "5"],
    },
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="backbone (default: the preset's name)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--corpus", required=True, nargs="+", help="JSONL corpus file(s)")
    parser.add_argument("--work", required=True, help="scratch folder for the dump shards")
    parser.add_argument("--out", required=True, help="where the indexer and metrics go")
    parser.add_argument("--dump-seconds", type=SECONDS, default=None, help="dump --max-seconds")
    parser.add_argument("--train-seconds", type=SECONDS, default=None, help="train --max-seconds")
    parser.add_argument(
        "--dump-only",
        action="store_true",
        help="stop after the dump; the same line without it resumes the (finished) dump and trains",
    )
    # ``--dump-args ...`` and ``--train-args ...`` (at the end) are cut off by :func:`main`.


def _split_extra(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``argv`` cut at ``--dump-args`` / ``--train-args`` (either order)."""
    marks = {"--dump-args": [], "--train-args": []}
    head, current = [], None
    for a in argv:
        if a in marks:
            current = marks[a]
        elif current is None:
            head.append(a)
        else:
            current.append(a)
    return head, marks["--dump-args"], marks["--train-args"]


def _run(cmd: list[str], log: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    if log is None:
        proc = subprocess.run(cmd, check=False)
    else:
        with log.open("w") as f:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            proc.wait()
    print(f"({time.time() - t0:.0f}s, exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit {proc.returncode}: {' '.join(cmd)}")


def run(args: argparse.Namespace) -> int:
    if args.model is None and args.preset is None:
        raise UsageError("give --model or --preset")
    for path in args.corpus:
        check_input_file("--corpus", Path(path))
    check_output_dir("--work", Path(args.work))
    check_output_dir("--out", Path(args.out))
    preset = PRESETS.get(args.preset, {"dump": [], "train": []})
    model = args.model or args.preset
    work, out = Path(args.work), Path(args.out)
    dump_dir = work / "dump"
    out.mkdir(parents=True, exist_ok=True)
    dump = [sys.executable, "-m", "lsa", "dump", "--model", model, "--corpus", *args.corpus]
    dump += ["--out", str(dump_dir), *preset["dump"], *args.dump_args]
    if args.dump_seconds is not None:
        dump += ["--max-seconds", str(args.dump_seconds)]
    _run(dump)
    if args.dump_only:
        print(f"dump done in {dump_dir}; run again without --dump-only to train")
        return 0
    # A fresh process: training reads the shards only and never imports the backbone.
    train = [sys.executable, "-m", "lsa", "train", "--data", str(dump_dir), "--out", str(out)]
    train += [*preset["train"], *args.train_args]
    if args.train_seconds is not None:
        train += ["--max-seconds", str(args.train_seconds)]
    _run(train, log=out / "train.log")
    manifest = json.loads((dump_dir / "manifest.json").read_text())
    manifest["settings"].pop("backbone_inv_freq", None)
    # Fewer dumped than in the corpus: --dump-seconds stopped it (or documents were too short).
    manifest["corpus_docs"] = sum(
        1 for c in args.corpus for line in Path(c).read_text().splitlines() if line.strip()
    )
    (out / "dump_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name in ("indexer.safetensors", "indexer_config.json", "metrics.json"):
        if not (out / name).is_file():
            raise SystemExit(f"train did not write {out / name}")
    print(f"done: {sorted(p.name for p in out.iterdir())} in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    head, dump_extra, train_extra = _split_extra(argv)
    parser = Parser(prog="python -m lsa.indexer.pipeline", description=__doc__)
    add_arguments(parser)

    def parse_and_run() -> int:
        args = parser.parse_args(head)
        args.dump_args, args.train_args = dump_extra, train_extra
        return run(args)

    return run_command(parser.prog, parse_and_run)


if __name__ == "__main__":
    sys.exit(main())
