"""Query-swap test on tensors saved by rank_needles.py: does the score depend on the question?

For a multikey_2 sample i, score i's chunks with the last-token state of another multikey_2
sample j (same question template, a different asked key, position held at S_i - 1). A scorer that
matches the asked key must change its ranking and lose i's needle; a query-agnostic prior
(recency / generic salience) keeps the same ranking. Done for the shipped indexer and, as the
reference, for the backbone's own layer-18 and layer-21 last-token attention (exact softmax over
the recorded keys) and the chunk-mean-key score.

``--indexer`` scores another indexer (a name or a folder; its target layers must be among the
saved layers 6/12/15/18/21) and ``--indexer-only`` skips the backbone's signals (no model load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lsa.indexer import load_indexer
from lsa.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
from rank_needles import CS, layer_query, ranks

TENSORS = "out/needles/tensors"
BACKBONE = ("attn_L18", "attn_L21", "meank_L18", "meank_L21")


def spearman(a, b):
    ra = torch.argsort(torch.argsort(a)).float()
    rb = torch.argsort(torch.argsort(b)).float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def score(name, h, doc, ck, model, indexer, pos):
    """Chunk scores [n] of doc's chunks for the last-token states h [layers, hidden]."""
    n, s = doc["n"], doc["S"]
    if name == "indexer":
        return indexer.score({L: h[L][None] for L in indexer.target_layers}, pos, ck)[0]
    if name.startswith("idx_L"):
        L = int(name[5:])
        return indexer.layer_logits(L, h[L][None], pos, ck[L])[0]
    kind, layer = name.split("_L")
    L = int(layer)
    q, scale = layer_query(model, L, h[L], s - 1)
    k = doc["keys"][L].repeat_interleave(q.shape[0] // doc["keys"][L].shape[0], 0)
    if kind == "meank":
        kc = k[:, : n * CS].reshape(q.shape[0], n, CS, -1).mean(2)
        return torch.einsum("hd,hnd->hn", q, kc).amax(0)
    p = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * scale, -1)
    return p[:, : n * CS].reshape(q.shape[0], n, CS).sum((0, 2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--indexer", default="qwen", help="indexer name or folder (default: shipped)")
    p.add_argument("--indexer-only", action="store_true", help="skip the backbone's signals")
    p.add_argument("--out", default="out/needles/swap", help="writes OUT.jsonl and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    with open("out/needles/results.jsonl") as f:
        rows = [json.loads(x) for x in f]
    mk = [r for r in rows if r["task"] == "niah_multikey_2"]
    model = None
    if not args.indexer_only:
        model, _ = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    data = {r["sample"]: torch.load(f"{TENSORS}/{r['task']}_{r['sample']}.pt") for r in mk}
    hidden = next(iter(data.values()))["hidden_last"].shape[-1]
    indexer = load_indexer(args.indexer, hidden_size=hidden).eval()
    layers = indexer.target_layers
    names = ("indexer", *(f"idx_L{L}" for L in layers), *(() if model is None else BACKBONE))
    out = []
    with torch.inference_mode():
        for idx, r in enumerate(mk):
            i, j = r["sample"], mk[(idx + 1) % len(mk)]["sample"]
            if i == j:
                continue
            di, dj = data[i], data[j]
            s, n = di["S"], di["n"]
            if any(not 1 <= c < n - 2 for c in r["needle_chunks"]):
                continue  # the needle sits in a forced chunk: nothing to rank
            pos = torch.tensor([s - 1])
            start = torch.arange(n)[None] * CS
            ck = {
                L: indexer.encode_chunks(L, di["keys"][L][None, :, : n * CS], start) for L in layers
            }

            row = {"sample": i, "foreign": j, "needle": r["needle_chunks"]}
            for name in names:
                own = score(name, di["hidden_last"], di, ck, model, indexer, pos)
                foreign = score(name, dj["hidden_last"], di, ck, model, indexer, pos)
                ro, rf = ranks(own, n), ranks(foreign, n)
                sel = slice(1, n - 2)
                row[name] = {
                    "own_rank": max(int(ro[c]) for c in r["needle_chunks"]),
                    "foreign_rank": max(int(rf[c]) for c in r["needle_chunks"]),
                    "spearman_own_vs_foreign": spearman(own[sel], foreign[sel]),
                }
            out.append(row)
            print(json.dumps(row), flush=True)
    with open(f"{args.out}.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in out)
    lines = [
        "| scorer | median needle rank, own question | median needle rank, foreign question | "
        "median Spearman(own, foreign) over selectable chunks |",
        "|---|---|---|---|",
    ]
    for name in names:
        o = statistics.median(x[name]["own_rank"] for x in out)
        fr = statistics.median(x[name]["foreign_rank"] for x in out)
        sp = statistics.median(x[name]["spearman_own_vs_foreign"] for x in out)
        lines.append(f"| `{name}` | {o:g} | {fr:g} | {sp:.3f} |")
    text = "\n".join(lines)
    with open(f"{args.out}.md", "w") as f:
        f.write(
            f"# Query-swap test (niah_multikey_2, N={len(out)}, indexer {args.indexer})\n\n"
            f"{__doc__}\n{text}\n"
        )
    print(text)


if __name__ == "__main__":
    main()
