"""Does the strongest attention head find the needle where the mean over heads does not? (CPU)

For the NIAH prompts of an ``lsa eval`` results folder (SmolLM2 by default): prompt + that run's
dense answer go through one teacher-forced pass; for the first 64 answer queries (what the cache's
selection after the prompt serves) and every chunk, three ways to combine the attention of the
label layers' heads:

  mean     sum over the window of the mean over (layer, head): the oracle's and the old targets'
  max      per (layer, head), the window's mass on the chunk; then the largest
  qmax     per query, the largest (layer, head) probability; summed over the window
           (``LabelConfig(head_reduce="max")``, what ``lsa dump --label-reduce max`` trains on)

and the rank of the chunk(s) holding the reference digits among the selectable chunks (0 = best,
-1 = a forced chunk). One JSON line per sample.

    python bench/needles/head_max_ranks.py --results bench/results/eval-h200-smollm2-4k-2026-11-29
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import torch

import lsa.indexer.labels as labels
from lsa.models import load_model
from lsa.reference.select import budget_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
from rank_needles import char_to_token, locate

CS = 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True, help="lsa eval folder (dense answers)")
    p.add_argument("--prompts", default="out/eval_smollm2_4k/prompts.jsonl.gz")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="niah_single_2")
    p.add_argument("--label-layers", type=int, nargs="*", default=None, help="default: all")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    per_head, per_query = [], []
    original = labels.chunk_attention_mass

    def record(query, key, scaling, chunk_size, query_block=256, query_start=0, reduce="sum"):
        # the window's per-head probabilities, kept beside the recorder's own (mean) mass
        h_q, s, d = query.shape
        q = query.float().view(key.shape[0], h_q // key.shape[0], s, d)[
            :, :, query_start : query_start + CS
        ]
        logits = torch.einsum("hgbd,hsd->hgbs", q, key.float()) * scaling
        u = torch.arange(query_start, query_start + q.shape[2])[:, None]
        logits.masked_fill_(torch.arange(s)[None, :] > u, float("-inf"))
        prob = torch.softmax(logits, -1).reshape(h_q, q.shape[2], s)
        prob = torch.nn.functional.pad(prob, (0, (-s) % chunk_size))
        prob = prob.view(h_q, q.shape[2], -1, chunk_size).sum(-1)  # [H, window, chunks]
        per_head.append(prob.sum(1))
        per_query.append(prob.amax(0))
        return original(query, key, scaling, chunk_size, query_block, query_start, reduce)

    labels.chunk_attention_mass = record
    model, tok = load_model(a.model)
    res = json.loads((a.results / "results.json").read_text())["records"]
    dense = {r["sample"]: r for r in res if r["method"] == "dense" and r["task"] == a.task}
    with gzip.open(a.prompts, "rt") as f:
        rows = [json.loads(x) for x in f]
    cfg_layers = tuple(a.label_layers) if a.label_layers else None
    for r in [x for x in rows if x["task"] == a.task and x["sample"] in dense]:
        ids, n_prompt = r["input_ids"], len(r["input_ids"])
        text, owner = char_to_token(tok, ids)
        key = re.search(r"special magic number for (\S+) mentioned", text).group(1)
        _, digits = locate(text, owner, key, r["references"][0])
        need = sorted({t // CS for t in digits})
        per_head.clear()
        per_query.clear()
        seq = torch.tensor([ids + dense[r["sample"]]["new_ids"]])
        cfg = labels.LabelConfig(chunk_size=CS, query_start=n_prompt, label_layers=cfg_layers)
        labels.teacher_forced_pass(model, seq, (0,), cfg)
        heads = torch.cat(per_head)[:, : n_prompt // CS]  # [layers * H, n]
        n = heads.shape[1]
        selectable = list(range(1, n - 2))  # sink 1, recent 2
        signals = {
            "mean": heads.mean(0),
            "max": heads.amax(0),
            "qmax": torch.stack(per_query).amax(0)[:, : n_prompt // CS].sum(0),
        }
        out = {"sample": r["sample"], "need": need, "n": n, "free": budget_count(0.1, n) - 3}
        for name, v in signals.items():
            order = sorted(selectable, key=lambda j, v=v: -float(v[j]))
            out[name] = [order.index(j) if j in selectable else -1 for j in need]
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
