"""RULER tasks generated locally from the ``nvidia-long-context-eval`` package, and RULER's metric.

Install: ``pip install --no-deps nvidia-long-context-eval`` then ``pip install wonderwords nltk
tenacity``. The package's generators are scripts; :func:`generate` runs one per task in a
subprocess (``sys.executable``, not whatever ``python`` is on PATH) with two fixes:

- the essay haystacks call ``nltk.tokenize.sent_tokenize``, which needs the ``punkt_tab`` data
  that cannot be downloaded offline; an untrained ``PunktSentenceTokenizer().tokenize`` replaces it;
- the package's ``prepare.py`` exits 0 even when it wrote nothing, so the output file is checked
  here and an empty or missing file raises with the generator's stderr.

Each sample is ``{"index", "input", "outputs": [str], "length", "task", "answer_prefix"}``;
``input`` already ends with the task's answer prefix, as RULER feeds it to a base template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: RULER's 13 synthetic tasks (the package's ``synthetic.yaml``).
TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)

_BOOTSTRAP = """
import os, runpy, sys
import nltk.tokenize
from nltk.tokenize.punkt import PunktSentenceTokenizer
_punkt = PunktSentenceTokenizer()
nltk.tokenize.sent_tokenize = lambda text, language="english": _punkt.tokenize(text)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` would
runpy.run_path(script, run_name="__main__")
"""


# ---------------------------------------------------------------------------------------------
# Metric (RULER's own: case-insensitive substring match of each reference in the prediction)
# ---------------------------------------------------------------------------------------------


def string_match_all(pred: str, refs: list[str]) -> float:
    """Fraction (0..1) of the references found in the prediction (niah, vt, cwe, fwe)."""
    if not refs:
        raise ValueError("refs must hold at least one reference, got an empty list")
    low = pred.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def string_match_part(pred: str, refs: list[str]) -> float:
    """1.0 if any reference is found in the prediction, else 0.0 (qa)."""
    if not refs:
        raise ValueError("refs must hold at least one reference, got an empty list")
    low = pred.lower()
    return float(any(r.lower() in low for r in refs))


def metric_for(task: str):
    """RULER's per-sample metric for a task name (e.g. ``"qa_1"`` -> :func:`string_match_part`)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return string_match_part if task.startswith("qa") else string_match_all


def score(task: str, preds: list[str], refs: list[list[str]]) -> float:
    """RULER's task score in percent (0..100), as the package's evaluator computes it."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(
            f"preds and refs must be non-empty and of equal length, got {len(preds)} and "
            f"{len(refs)}"
        )
    fn = metric_for(task)
    return 100.0 * sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)


def postprocess_pred(text: str | None) -> str:
    """RULER's prediction clean-up: strip, and turn control characters into newlines."""
    if text is None:
        return ""
    out = "".join("\n" if ord(c) < 0x20 else c for c in text.strip())
    return out.strip()


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


#: the shortest ``max_seq_length`` each task's generator finishes at, measured with SmolLM2's
#: tokenizer (one sample): below it the generators loop without end instead of failing
#: (niah_single_1 at 256, niah_multikey_3 and vt at 512, qa at 1024: the 10 documents it starts
#: with do not fit)
MIN_LENGTHS = {task: 512 for task in TASKS} | {"niah_multikey_3": 1024, "vt": 1024}
MIN_LENGTHS |= {"qa_1": 2048, "qa_2": 2048}
#: the shortest of them, what ``--length`` accepts at all
MIN_LENGTH = min(MIN_LENGTHS.values())


def too_short(tasks, length: int) -> dict[str, int]:
    """The ``tasks`` whose generator cannot finish at ``length`` tokens, with their minimum."""
    return {t: MIN_LENGTHS[t] for t in tasks if length < MIN_LENGTHS[t]}


#: what generating RULER data needs: (importable module, the command that installs it)
REQUIREMENTS = (
    ("long_context_eval", "pip install --no-deps nvidia-long-context-eval"),
    ("wonderwords", "pip install wonderwords nltk tenacity"),
    ("nltk", "pip install wonderwords nltk tenacity"),
    ("tenacity", "pip install wonderwords nltk tenacity"),
    ("yaml", "pip install pyyaml"),
)


def package_dir() -> Path:
    """The installed ``long_context_eval`` package (from ``nvidia-long-context-eval``)."""
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "nvidia-long-context-eval is not installed; run: pip install --no-deps "
            "nvidia-long-context-eval && pip install wonderwords nltk tenacity"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def task_config(task: str) -> dict:
    """The task's generator arguments, template and answer prefix, as ``prepare.py`` builds them
    for the ``base`` model template."""
    import yaml

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = package_dir()
    custom = yaml.safe_load((root / "synthetic.yaml").read_text())[task]
    from long_context_eval.data.synthetic.constants import TASKS as BASE

    config = dict(custom)
    config.update(BASE[custom["task"]])
    config["answer_prefix"] = config.get("answer_prefix", "")
    config["template"] = config["template"] + config["answer_prefix"]
    return config


def generate(
    task: str,
    *,
    tokenizer_path: str | Path,
    max_seq_length: int,
    num_samples: int,
    save_dir: str | Path,
    seed: int = 42,
    subset: str = "validation",
    timeout: float = 1800,
) -> list[dict]:
    """Generate ``num_samples`` RULER samples of ``task`` at ``max_seq_length`` tokens.

    Args:
        tokenizer_path: a Hugging Face tokenizer directory (lengths are counted with it).
        max_seq_length: prompt plus generated tokens, as RULER counts it.
        save_dir: where the generator writes ``<task>/<subset>.jsonl``; an existing file is reused.

    Returns:
        the samples, each with ``task``, ``length`` and ``answer_prefix`` added.

    Raises:
        RuntimeError: the generator failed or wrote no samples (its stderr is included).
    """
    if num_samples < 1 or max_seq_length < 64:
        raise ValueError(
            f"num_samples must be >= 1 and max_seq_length >= 64, got {num_samples} and "
            f"{max_seq_length}"
        )
    config = task_config(task)
    save_dir = Path(save_dir)
    out = save_dir / task / f"{subset}.jsonl"
    if not (out.is_file() and out.stat().st_size > 0):
        script = package_dir() / "data" / "synthetic" / f"{config['task']}.py"
        argv = [
            sys.executable,
            "-c",
            _BOOTSTRAP,
            str(script),
            "--save_dir",
            str(save_dir),
            "--save_name",
            task,
            "--subset",
            subset,
            "--tokenizer_path",
            str(tokenizer_path),
            "--tokenizer_type",
            "hf",
            "--max_seq_length",
            str(max_seq_length),
            "--tokens_to_generate",
            str(config["tokens_to_generate"]),
            "--num_samples",
            str(num_samples),
            "--random_seed",
            str(seed),
            "--template",
            config["template"],
        ]
        for key, value in config["args"].items():
            argv += [f"--{key}", str(value)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not (out.is_file() and out.stat().st_size > 0):
            raise RuntimeError(
                f"RULER generator for {task!r} wrote no samples to {out} "
                f"(exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
    samples = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not samples:
        raise RuntimeError(f"RULER generator for {task!r} wrote an empty file {out}")
    for s in samples:
        s["task"] = task
        s["answer_prefix"] = config["answer_prefix"]
    return samples


def essays() -> list[str]:
    """The Paul Graham essays shipped with the package, split into single essays where possible."""
    text = json.loads(
        (package_dir() / "data" / "synthetic" / "json" / "PaulGrahamEssays.json").read_text()
    )["text"]
    return [text] if isinstance(text, str) else list(text)


# ---------------------------------------------------------------------------------------------
# A corpus for the indexer dump (``python -m lsa.eval.ruler --help``)
# ---------------------------------------------------------------------------------------------


def build_corpus(
    *,
    tokenizer_path: str | Path,
    save_dir: str | Path,
    lengths: tuple[int, ...],
    samples: tuple[int, ...],
    tasks: tuple[str, ...] = TASKS,
    n_essays: int = 0,
    essay_chars: int = 12000,
    seed: int = 42,
) -> list[dict]:
    """RULER samples at several lengths plus essay excerpts, each with a ``split``.

    Split by document: at the first length (the evaluation length), sample 0 of each task is
    ``test``, sample 1 is ``val`` and the rest ``train``; every other length and every essay
    excerpt is ``train``. Essay excerpts are consecutive ``essay_chars`` slices of the essays.
    """
    if len(lengths) != len(samples):
        raise ValueError(f"lengths and samples must pair up, got {lengths} and {samples}")
    docs = []
    for li, (length, n) in enumerate(zip(lengths, samples, strict=True)):
        for task in tasks:
            out = generate(
                task,
                tokenizer_path=tokenizer_path,
                max_seq_length=length,
                num_samples=n,
                save_dir=Path(save_dir) / f"ruler_{length}",
                seed=seed + length,
            )
            for i, s in enumerate(out):
                split = ("test", "val")[i] if li == 0 and i < 2 else "train"
                docs.append(
                    {
                        "id": f"ruler:{task}:{length}:{s.get('index', i)}",
                        "task": task,
                        "input": s["input"],
                        "outputs": s["outputs"],
                        "split": split,
                    }
                )
    text = " ".join(essays())
    for k in range(n_essays):
        docs.append(
            {
                "id": f"essay:{k}",
                "task": "essay",
                "text": text[k * essay_chars : (k + 1) * essay_chars],
                "split": "train",
            }
        )
    return docs


#: share of the essay text (contiguous, in order) that essay documents of each split come from.
ESSAY_SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


def essay_documents(
    tokenizer, lengths: tuple[int, ...], per_split: dict[str, int], seed: int = 42
) -> list[dict]:
    """Plain-text essay documents of exactly ``length`` tokens (``tokenizer``'s), split by text.

    The essays are cut into three contiguous regions (:data:`ESSAY_SPLITS`), so a test
    document shares no text with a train or validation essay document. Within a region,
    documents start at seeded random offsets and do not overlap each other.
    """
    import random

    text = " ".join(essays())
    rng = random.Random(seed)
    docs, start = [], 0
    for split, share in ESSAY_SPLITS:
        stop = start + int(share * len(text))
        region = text[start:stop]
        start = stop
        need = per_split.get(split, 0) * len(lengths)
        if need == 0:
            continue
        # Non-overlapping slots; ~4 chars per token with margin, each long enough for 16K tokens.
        slot = max(lengths) * 6
        slots = list(range(0, len(region) - slot, slot))
        if len(slots) < need:
            raise ValueError(
                f"the {split} essay region holds {len(slots)} documents of {max(lengths)} "
                f"tokens, {need} asked for"
            )
        picks = rng.sample(slots, need)
        k = 0
        for length in lengths:
            for _ in range(per_split[split]):
                piece = region[picks[k] : picks[k] + slot]
                enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                if len(enc["input_ids"]) < length:
                    raise ValueError(f"essay slot of {slot} chars has < {length} tokens")
                end = enc["offset_mapping"][length - 1][1]
                docs.append(
                    {
                        "id": f"essay:{split}:{length}:{k}",
                        "task": "essay",
                        "text": piece[:end],
                        "split": split,
                        "bucket": length,
                    }
                )
                k += 1
    return docs


def build_split_corpus(
    *,
    tokenizer_path: str | Path,
    save_dir: str | Path,
    lengths: tuple[int, ...],
    samples: int,
    tasks: tuple[str, ...] = TASKS,
    essays_per_split: dict[str, int] | None = None,
    seed: int = 42,
) -> list[dict]:
    """RULER samples at every length plus essay documents, each split by document.

    For every (task, length), sample 0 is ``test``, sample 1 ``val`` and the rest ``train``, so
    every split has every task at every length (each RULER sample is its own prompt: its own
    needles, questions and haystack excerpt). Each document carries ``bucket`` = its nominal
    length, for per-length metrics. Essay documents: :func:`essay_documents`.
    """
    from transformers import AutoTokenizer

    if samples < 3:
        raise ValueError(f"samples must be >= 3 (one test, one val, one train), got {samples}")
    # Corpora made with other seeds merge with the default one: their ids name the seed.
    source = "ruler" if seed == 42 else f"ruler@{seed}"
    docs = []
    for length in lengths:
        for task in tasks:
            out = generate(
                task,
                tokenizer_path=tokenizer_path,
                max_seq_length=length,
                num_samples=samples,
                save_dir=Path(save_dir) / f"ruler_{length}",
                seed=seed + length,
            )
            for i, s in enumerate(out):
                docs.append(
                    {
                        "id": f"{source}:{task}:{length}:{s.get('index', i)}",
                        "task": task,
                        "input": s["input"],
                        "outputs": s["outputs"],
                        "split": ("test", "val")[i] if i < 2 else "train",
                        "bucket": length,
                    }
                )
    if essays_per_split:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        docs += essay_documents(tokenizer, tuple(lengths), essays_per_split, seed=seed)
    return order_corpus(docs, seed=seed)


def order_corpus(docs: list[dict], seed: int = 0) -> list[dict]:
    """Test, then validation, then train documents (shuffled, seeded), ids checked unique.

    Dumping in this order means a dump cut short still has every held-out document, and its
    train documents are a mix of lengths and tasks.
    """
    import random

    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"corpus document ids must be unique, repeated: {dup}")
    by = {s: [d for d in docs if d.get("split") == s] for s in ("test", "val", "train")}
    if sum(map(len, by.values())) != len(docs):
        raise ValueError("every document needs a split in ('train', 'val', 'test')")
    random.Random(seed).shuffle(by["train"])
    return by["test"] + by["val"] + by["train"]


def _split_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m lsa.eval.ruler split-corpus", description=build_split_corpus.__doc__
    )
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--save-dir", required=True, help="where RULER's generators write")
    p.add_argument("--out", required=True, help="corpus JSONL for `lsa dump`")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--samples", type=int, default=6, help="per task and length")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument(
        "--essays", type=int, nargs=3, default=[2, 1, 1], metavar=("TRAIN", "VAL", "TEST"),
        help="essay documents per split and length",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    docs = build_split_corpus(
        tokenizer_path=a.tokenizer,
        save_dir=a.save_dir,
        lengths=tuple(a.lengths),
        samples=a.samples,
        tasks=tuple(a.tasks),
        essays_per_split=dict(zip(("train", "val", "test"), a.essays, strict=True)),
        seed=a.seed,
    )
    Path(a.out).write_text("".join(json.dumps(d) + "\n" for d in docs))
    counts = {s: sum(d["split"] == s for d in docs) for s in ("train", "val", "test")}
    print(f"{len(docs)} documents {counts} -> {a.out}")
    return 0


def _merge_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m lsa.eval.ruler merge-corpus", description=order_corpus.__doc__
    )
    p.add_argument("inputs", nargs="+", help="corpus JSONL files")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    docs = [json.loads(x) for f in a.inputs for x in Path(f).read_text().splitlines() if x.strip()]
    docs = order_corpus(docs, seed=a.seed)
    Path(a.out).write_text("".join(json.dumps(d) + "\n" for d in docs))
    counts = {s: sum(d["split"] == s for d in docs) for s in ("train", "val", "test")}
    print(f"{len(docs)} documents {counts} -> {a.out}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lsa.eval.ruler", description=build_corpus.__doc__)
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--save-dir", required=True, help="where RULER's generators write")
    p.add_argument("--out", required=True, help="corpus JSONL for `lsa dump`")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--samples", type=int, nargs="+", default=[3])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--essays", type=int, default=0)
    p.add_argument("--essay-chars", type=int, default=12000)
    p.add_argument("--seed", type=int, default=42)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["split-corpus"]:
        return _split_main(argv[1:])
    if argv[:1] == ["merge-corpus"]:
        return _merge_main(argv[1:])
    a = p.parse_args(argv)
    docs = build_corpus(
        tokenizer_path=a.tokenizer,
        save_dir=a.save_dir,
        lengths=tuple(a.lengths),
        samples=tuple(a.samples),
        tasks=tuple(a.tasks),
        n_essays=a.essays,
        essay_chars=a.essay_chars,
        seed=a.seed,
    )
    Path(a.out).write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"{len(docs)} documents -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
