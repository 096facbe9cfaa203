"""Needle-chunk recall of the zero-shot text scorer on RULER documents (no backbone needed).

    python bench/text_needle_recall.py --corpus CORPUS.jsonl --model smollm2

For each RULER document of a corpus (``{"id", "task", "input", "outputs"}`` lines, as ``lsa dump``
reads them), tokenised as the dump tokenises it (chat template), the prompt's chunks are scored
once, as at the prefill refresh: is a chunk whose own 64 tokens hold a reference answer among the
chunks kept at 10% / 20% (sink 1 + recent 2 inside the budget)? Recency beside it. Documents with
no such chunk (an answer cut by a boundary) are skipped.
"""

from __future__ import annotations

import argparse
import collections

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from lsa.indexer.dump import read_corpus, tokenize
    from lsa.models import ALIASES, model_dir
    from lsa.reference.select import select_chunks
    from lsa.scorers.contract import TokenIds
    from lsa.scorers.text import TextScorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--model", default="smollm2", help="whose tokenizer makes the prompts")
    ap.add_argument("--encoder", default=None, help="sentence-transformers folder (default MiniLM)")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(str(model_dir(ALIASES.get(args.model, args.model))))
    scorer = TextScorer(lambda x: tok.decode(x, skip_special_tokens=True), encoder=args.encoder)
    cs = scorer.chunk_size
    recall = collections.defaultdict(lambda: collections.defaultdict(list))
    for doc in read_corpus(args.corpus):
        if "input" not in doc:
            continue
        ids, answer = tokenize(doc, tok, True)
        p = answer + 1
        ids, n = torch.tensor(ids[:p]), p // cs
        refs = [str(o) for o in doc.get("outputs", [])]
        has = [
            j
            for j in range(n)
            if any(a in tok.decode(ids[j * cs : (j + 1) * cs].tolist()) for a in refs)
        ]
        if not has:
            continue
        tk = TokenIds((ids,), (p,))
        keys = scorer.encode_chunks(0, torch.zeros(1), torch.arange(n)[None] * cs, token_ids=tk)
        logit = scorer.score({}, torch.tensor([p - 1]), {0: keys}, token_ids=tk)[0]
        for budget in (0.1, 0.2):
            for name, s in (("text", logit), ("recency", torch.arange(n).float())):
                keep = select_chunks(s[None], budget=budget, sink_chunks=1, recent_chunks=2)[0]
                recall[(name, budget)][doc["task"]].append(
                    sum(bool(keep[j]) for j in has) / len(has)
                )
    for (name, budget), tasks in recall.items():
        flat = [x for v in tasks.values() for x in v]
        per_task = {t: f"{sum(v) / len(v):.2f} ({len(v)})" for t, v in tasks.items()}
        mean = sum(flat) / len(flat)
        print(f"{name} @ {budget:g}: mean {mean:.2f} over {len(flat)} docs; {per_task}")


if __name__ == "__main__":
    main()
