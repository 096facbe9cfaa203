"""Cheap alternatives to the indexer, scored on tensors saved by rank_needles.py.

All use only what a cache holds after prefill: the last prompt token's attention input at a layer
(-> the backbone's own query, q_proj + RoPE) and the layer's cached post-RoPE keys.

  attn_L15+18+21   exact last-token attention mass, summed over layers 15, 18, 21 (all heads)
  meank_L15+18+21  per head softmax over chunks of scale * q . mean(chunk keys) (a 64x smaller
                   landmark store: one mean key per chunk and KV head), summed over heads/layers
  meank_L18+21     the same on layers 18 and 21
  idx_L18          the indexer's layer-18 head alone (no mean with the L6/L12 heads)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from lsa.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
from rank_needles import CS, layer_query, ranks

TENSORS = "out/needles/tensors"


def last_attention(model, d, L):
    n, s = d["n"], d["S"]
    q, scale = layer_query(model, L, d["hidden_last"][L], s - 1)
    k = d["keys"][L].repeat_interleave(q.shape[0] // d["keys"][L].shape[0], 0)
    p = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * scale, -1)
    exact = p[:, : n * CS].reshape(q.shape[0], n, CS).sum((0, 2))
    mean_k = k[:, : n * CS].reshape(q.shape[0], n, CS, -1).mean(2)
    landmark = torch.softmax(torch.einsum("hd,hnd->hn", q, mean_k) * scale, -1).sum(0)
    return exact, landmark


def main():
    torch.set_num_threads(1)
    with open("out/needles/results.jsonl") as f:
        rows = [json.loads(x) for x in f]
    model, _ = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    res = []
    with torch.inference_mode():
        for r in rows:
            d = torch.load(f"{TENSORS}/{r['task']}_{r['sample']}.pt")
            n = d["n"]
            per = {L: last_attention(model, d, L) for L in (15, 18, 21)}
            sig = {
                "attn_L15+18+21": sum(per[L][0] for L in per),
                "meank_L15+18+21": sum(per[L][1] for L in per),
                "meank_L18+21": per[18][1] + per[21][1],
            }
            row = {"task": r["task"], "sample": r["sample"]}
            for name, v in sig.items():
                rk = ranks(v, n)
                rs = [int(rk[c]) for c in r["needle_chunks"]]
                row[name] = {"needle_rank": max(rs), "hit": all(x < r["free"] for x in rs)}
            for name in ("indexer", "idx_L18", "snapkv", "last"):
                row[name] = {
                    "needle_rank": r["signals"][name]["needle_rank"],
                    "hit": r["signals"][name]["hit"],
                }
            res.append(row)
    names = [k for k in res[0] if k not in ("task", "sample")]
    tasks = sorted({x["task"] for x in res}, key=lambda t: (t != "niah_multikey_2", t))
    lines = ["# Cheap signals from cached state (see cheap_signals.py)", "", __doc__, ""]
    lines.append("| signal | " + " | ".join(f"{t} median rank | hit@10%" for t in tasks) + " |")
    lines.append("|---|" + "---|---|" * len(tasks))
    for name in names:
        cells = []
        for t in tasks:
            xs = [x[name] for x in res if x["task"] == t]
            ranked = [x["needle_rank"] for x in xs if x["needle_rank"] >= 0]  # -1: forced
            med = statistics.median(ranked) if ranked else -1
            cells.append(f"{med:g} | {sum(x['hit'] for x in xs)}/{len(xs)}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open("out/needles/cheap_signals.md", "w") as f:
        f.write(text)
    with open("out/needles/cheap_signals.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in res)
    print(text)


if __name__ == "__main__":
    main()
