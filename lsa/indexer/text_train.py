"""Fine-tuning the text scorer's sentence encoder on a dump's lookahead labels.

A dump (:mod:`lsa.indexer.dump`) holds, per sampled position ``t`` of a document, the graded
lookahead target over the chunks that exist at ``t``; it does not hold token ids, so the documents
are tokenised again from the corpus the dump was made from (:func:`lsa.indexer.dump.tokenize`,
same tokenizer and chat template: the manifest's documents give each one's length, checked here).
From that come (query text, chunk text, target) examples whose texts are exactly what
:class:`lsa.scorers.text.TextScorer` embeds in the cache (its ``query_text`` / ``chunk_text``).

Training uses sentence-transformers' own trainer with CoSENT, a loss over pairs of examples that
only asks the cosine similarities to be ordered like the targets, so a graded target works as it
is (per position it is scaled to a maximum of 1). Evaluation, on a split the training never reads:

- sentence-transformers' ``InformationRetrievalEvaluator`` (each position's query against every
  chunk of the split's documents; relevant = the chunks the oracle keeps at the budget);
- our coverage / overlap / NDCG per position (:mod:`lsa.indexer.metrics`) at 10% and 20%, beside
  recency and random at the same budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lsa.indexer.data import ShardData
from lsa.indexer.metrics import BUDGETS, baseline_scores
from lsa.indexer.metrics import evaluate as ranking_metrics
from lsa.reference.select import select_chunks
from lsa.scorers.text import TextScorer


@dataclass(frozen=True)
class Position:
    """One sampled position of a split, with its texts and targets."""

    doc: str
    position: int
    query: str
    chunks: tuple[str, ...]  # the texts of the chunks that exist at ``position``
    target: torch.Tensor  # float [n]: graded lookahead target (0 off selectable)
    selectable: torch.Tensor  # bool [n]


def split_positions(
    data: ShardData,
    tokens: dict[str, tuple[list[int], int | None]],
    scorer: TextScorer,
    *,
    max_positions: int | None = None,
    seed: int = 0,
) -> list[Position]:
    """The positions of ``data`` (one split of a dump) with their texts.

    Args:
        tokens: document id -> (token ids, index of the last prompt token or None), as
            :func:`lsa.indexer.dump.tokenize` gives them for the corpus the dump was made from.
        scorer: gives the texts (its decode, chunk size, overlap and query length).
        max_positions: a seeded sample of at most this many positions (None: all).
    """
    if data.chunk_size != scorer.chunk_size:
        raise ValueError(
            f"the dump's chunk_size ({data.chunk_size}) differs from the scorer's "
            f"({scorer.chunk_size})"
        )
    for meta in data.doc_meta:
        if meta["id"] not in tokens:
            raise ValueError(f"tokens lacks document {meta['id']!r} of the dump")
        if "length" in meta and len(tokens[meta["id"]][0]) < int(meta["length"]):
            raise ValueError(
                f"document {meta['id']!r} has {len(tokens[meta['id']][0])} tokens here, the dump "
                f"saw {meta['length']}: another tokenizer or corpus?"
            )
    order = list(range(len(data)))
    if max_positions is not None and max_positions < len(order):
        order = sorted(random.Random(seed).sample(order, max_positions))
    out = []
    for start in range(0, len(order), 256):
        idx = torch.tensor(order[start : start + 256])
        batch = data.batch(idx)
        for r, i in enumerate(idx.tolist()):
            doc = data.doc_ids[int(data.doc[i])]
            ids, answer = tokens[doc]
            t = int(batch.position[r])
            n = int(batch.n_chunks[r])
            row = torch.tensor(ids[: t + 1], dtype=torch.long)
            prompt_len = t + 1 if answer is None else min(answer + 1, t + 1)
            out.append(
                Position(
                    doc=doc,
                    position=t,
                    query=scorer.query_text(row, prompt_len),
                    chunks=tuple(scorer.chunk_text(row, j * data.chunk_size) for j in range(n)),
                    target=batch.target[r, :n].cpu(),
                    selectable=batch.selectable[r, :n].cpu(),
                )
            )
    return out


def pair_examples(
    positions: list[Position], *, positives: int = 4, negatives: int = 4, seed: int = 0
) -> dict[str, list]:
    """CoSENT pairs: per position its ``positives`` highest-target selectable chunks and
    ``negatives`` random other selectable ones, each labelled target / max target (in [0, 1]).
    Returns the columns of a ``datasets.Dataset``: sentence1, sentence2, score."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
    for p in positions:
        sel = p.selectable.nonzero().flatten().tolist()
        top = float(p.target.max()) if p.target.numel() else 0.0
        if not sel or top <= 0:
            continue
        ranked = sorted(sel, key=lambda j: -float(p.target[j]))
        chosen = ranked[:positives]
        rest = ranked[positives:]
        chosen += rng.sample(rest, min(negatives, len(rest)))
        for j in chosen:
            cols["sentence1"].append(p.query)
            cols["sentence2"].append(p.chunks[j])
            cols["score"].append(float(p.target[j]) / top)
    return cols


def text_scores(scorer: TextScorer, positions: list[Position]) -> list[torch.Tensor]:
    """The scorer's logits [n] at each position (cosine of query and chunk texts). Each distinct
    text is embedded once: a chunk's text is the same at every position of its document."""
    texts = list(dict.fromkeys(t for p in positions for t in (p.query, *p.chunks)))
    row = {t: i for i, t in enumerate(texts)}
    emb = scorer.embed(texts, scorer.encoder.device).cpu()
    return [emb[[row[c] for c in p.chunks]] @ emb[row[p.query]] for p in positions]


def ranking_report(
    scorer: TextScorer,
    positions: list[Position],
    *,
    sink_chunks: int,
    recent_chunks: int,
    budgets=BUDGETS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Coverage / overlap / NDCG of the text scorer, recency and random (metrics.evaluate)."""
    scores = {"text": text_scores(scorer, positions)}
    base = baseline_scores([len(p.chunks) for p in positions], [p.target for p in positions])
    scores.update({k: v for k, v in base.items() if k != "snapkv"})
    return ranking_metrics(
        scores,
        [p.target for p in positions],
        [p.selectable for p in positions],
        budgets=budgets,
        sink_chunks=sink_chunks,
        recent_chunks=recent_chunks,
    )


def ir_evaluator(
    positions: list[Position], *, budget: float, sink_chunks: int, recent_chunks: int, name: str
):
    """sentence-transformers' ``InformationRetrievalEvaluator``: each position's query against
    every chunk of the split's documents; relevant = the chunks the oracle keeps at ``budget``
    (its free picks: sink and recent chunks excluded)."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for i, p in enumerate(positions):
        for j, text in enumerate(p.chunks):
            corpus[f"{p.doc}#{j}"] = text  # a chunk's text is final: the same at every position
        keep = select_chunks(
            p.target[None], budget=budget, sink_chunks=sink_chunks, recent_chunks=recent_chunks
        )[0]
        picks = (keep & p.selectable & (p.target > 0)).nonzero().flatten().tolist()
        if picks:
            queries[str(i)] = p.query
            relevant[str(i)] = {f"{p.doc}#{j}" for j in picks}
    return InformationRetrievalEvaluator(
        queries, corpus, relevant, name=name, show_progress_bar=False, batch_size=64
    )


def finetune(
    scorer: TextScorer,
    train: list[Position],
    val: list[Position],
    out: str | Path,
    *,
    epochs: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 2e-5,
    seed: int = 0,
    sink_chunks: int = 1,
    recent_chunks: int = 2,
    log: Callable[[str], None] = print,
) -> Path:
    """Fine-tune ``scorer.encoder`` in place with CoSENT on ``train``'s pairs, evaluating on
    ``val`` (IR evaluator at 10%); the model is saved (safetensors) to ``out``/final."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    pairs = pair_examples(train, seed=seed)
    if not pairs["score"]:
        raise ValueError("train holds no position with a selectable chunk of positive target")
    out = Path(out)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=0.1,  # a fraction of the steps (transformers 5)
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to=[],
        use_cpu=scorer.encoder.device.type == "cpu",
        disable_tqdm=False,
    )
    evaluator = ir_evaluator(
        val, budget=0.1, sink_chunks=sink_chunks, recent_chunks=recent_chunks, name="val"
    )
    trainer = SentenceTransformerTrainer(
        model=scorer.encoder,
        args=args,
        train_dataset=Dataset.from_dict(pairs).shuffle(seed=seed),
        loss=CoSENTLoss(scorer.encoder),
        evaluator=evaluator,
    )
    log(f"{len(pairs['score'])} training pairs from {len(train)} positions")
    trainer.train()
    final = out / "final"
    scorer.encoder.save_pretrained(str(final), safe_serialization=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m lsa.indexer.text_train``: held-out ranking metrics of the zero-shot encoder,
    fine-tuning on the dump's train split (IR evaluator on val), the same metrics after; writes
    ``OUT/report.json`` and the model to ``OUT/final`` (safetensors)."""
    import argparse
    import json

    from transformers import AutoTokenizer

    from lsa.indexer.dump import read_corpus, tokenize
    from lsa.models import ALIASES, model_dir

    ap = argparse.ArgumentParser(prog="python -m lsa.indexer.text_train", description=main.__doc__)
    ap.add_argument("--dump", type=Path, required=True, help="a folder `lsa dump` wrote")
    ap.add_argument("--corpus", nargs="+", required=True, help="the dump's corpus JSONL file(s)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--encoder", default=None, help="base encoder folder (default MiniLM-L6)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-positions", type=int, default=None, help="per split, seeded sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    splits = {s: ShardData(args.dump, s) for s in ("train", "val", "test")}
    settings = splits["train"].settings
    name = ALIASES.get(settings["model"], settings["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(name)))
    wanted = {d for data in splits.values() for d in data.doc_ids}
    tokens = {
        d["id"]: tokenize(d, tokenizer, bool(settings.get("chat_template", False)))
        for d in read_corpus(args.corpus)
        if d["id"] in wanted
    }
    from lsa.scorers.text import load_encoder

    encoder = load_encoder(args.encoder, device=args.device)
    scorer = TextScorer(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        encoder=encoder,
        chunk_size=splits["train"].chunk_size,
    )
    positions = {
        s: split_positions(data, tokens, scorer, max_positions=args.max_positions, seed=args.seed)
        for s, data in splits.items()
    }
    forced = {"sink_chunks": splits["train"].sink_chunks}
    forced["recent_chunks"] = splits["train"].recent_chunks
    report = {"settings": vars(args) | {"dump": str(args.dump), "out": str(args.out)}}
    report["settings"]["encoder"] = str(args.encoder)
    report["positions"] = {s: len(p) for s, p in positions.items()}
    report["zero_shot"] = ranking_report(scorer, positions["test"], **forced)
    report["zero_shot_ir"] = ir_evaluator(positions["test"], budget=0.1, name="test", **forced)(
        scorer.encoder
    )
    print("zero-shot, test split:", json.dumps(report["zero_shot"]["text"]))
    finetune(
        scorer,
        positions["train"],
        positions["val"],
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        **forced,
    )
    report["fine_tuned"] = ranking_report(scorer, positions["test"], **forced)
    report["fine_tuned_ir"] = ir_evaluator(positions["test"], budget=0.1, name="test", **forced)(
        scorer.encoder
    )
    print("fine-tuned, test split:", json.dumps(report["fine_tuned"]["text"]))
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "Position",
    "finetune",
    "ir_evaluator",
    "pair_examples",
    "ranking_report",
    "split_positions",
    "text_scores",
]
