"""Would a refresh a few tokens into the answer find the needle? (CPU, Qwen, RULER prompts)

Per sample: one teacher-forced pass over prompt + the dense answer the H200 evaluation recorded
(``results.json`` of ``python -m lsa eval``). At every answer step ``j`` (the cache has the prompt
and ``j`` answer tokens; ``j = 0`` is the selection after the prompt) the indexer (``--indexer``,
default the shipped one) scores
the prompt's completed chunks from the attention input at position ``P - 1 + j``, exactly as a
refresh there would. Printed per sample: the needle chunk's rank at ``j = 0``, at the last step
before the answer's first digit, and the best step; a hit = within the free picks at 10%.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
from rank_needles import CS, char_to_token, locate, ranks

from lsa.indexer import load_indexer
from lsa.indexer.labels import LabelConfig, teacher_forced_pass
from lsa.models import load_model
from lsa.reference.select import budget_count


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", default="out/eval_qwen_8k/prompts.jsonl.gz")
    p.add_argument("--results", default="bench/results/eval-h200-qwen-8k-2026-11-29/results.json")
    p.add_argument("--plan", default="niah_multikey_2:0-11")
    p.add_argument("--out", default="out/needles/answer_refresh.jsonl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--indexer", default="qwen", help="indexer name or folder (default: shipped)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    want = {}
    for item in a.plan.split(","):
        task, rng = item.split(":")
        lo, hi = (int(x) for x in rng.split("-"))
        want.setdefault(task, set()).update(range(lo, hi + 1))
    dense = {
        (r["task"], r["sample"]): r["new_ids"]
        for r in json.loads(Path(a.results).read_text())["records"]
        if r["method"] == "dense"
    }
    with gzip.open(a.prompts, "rt") as f:
        rows = [d for d in map(json.loads, f) if d["sample"] in want.get(d["task"], ())]
    model, tok = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    indexer = load_indexer(a.indexer, hidden_size=model.config.hidden_size).eval()
    layers = indexer.target_layers
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for d in rows:
        ids, answer = d["input_ids"], d["references"][0]
        new = dense[(d["task"], d["sample"])]
        s, n = len(ids), len(ids) // CS
        text, owner = char_to_token(tok, ids)
        key = re.search(r"special magic numbers? for (\S+?) mentioned", text).group(1)
        _, dig_tok = locate(text, owner, key, answer)
        needle = sorted({t // CS for t in dig_tok if t // CS < n})
        full = torch.tensor([ids + new])
        cfg = LabelConfig(chunk_size=CS, query_start=full.shape[1])  # no attention mass needed
        with torch.inference_mode():
            rec = teacher_forced_pass(model, full, layers, cfg)
            start = torch.arange(n)[None] * CS
            ckeys = {
                L: indexer.encode_chunks(L, rec.keys[L][None, :, : n * CS], start) for L in layers
            }
            steps = []
            for j in range(len(new)):
                pos = s - 1 + j
                hidden = {L: rec.hidden[L][pos][None] for L in layers}
                logits = indexer.score(hidden, torch.tensor([pos]), ckeys)[0]
                r = ranks(logits.float(), n)
                steps.append(max(int(r[c]) for c in needle) if needle else -1)
        answer_text = tok.decode(new)
        first_digit = next(
            (j for j in range(len(new)) if re.search(r"\d", tok.decode(new[: j + 1]))), len(new)
        )
        free = budget_count(0.1, n) - 3
        before = steps[max(0, first_digit - 1)] if first_digit < len(new) else steps[-1]
        out = {
            "task": d["task"],
            "sample": d["sample"],
            "needle": needle,
            "free": free,
            "answer": answer_text,
            "first_digit_step": first_digit,
            "rank_after_prompt": steps[0],
            "rank_before_digits": before,
            "best_rank": min(steps),
            "best_step": steps.index(min(steps)),
            "ranks": steps,
        }
        with open(a.out, "a") as f:
            f.write(json.dumps(out) + "\n")
        print(
            f"{d['task']} {d['sample']} needle={needle} free={free} after_prompt={steps[0]} "
            f"before_digits(step {first_digit - 1})={before} best={min(steps)}@{out['best_step']} "
            f"answer={answer_text[:70]!r}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
