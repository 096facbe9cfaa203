"""Which tower flattens the key identity? Specific-variance fractions on saved tensors.

sf(X) = mean_i ||x_i - mean(x)||^2 / mean_i ||x_i||^2: the share of a vector's energy that differs
between items (0 = all items map to the same vector).

Key side (items = the selectable chunks of one niah_multikey_2 sample; every chunk holds ~3
needles that differ only in key words and digits): the key tower's input (derotated mean /
mean+min+max features) vs its output before the indexer's RoPE (k_norm(wk(f))). Also the needle
chunk's distance from the rest in units of the typical chunk-to-chunk distance.

Query side (items = the multikey_2 samples: same template, different asked key, last prompt
token): the layer's attention input h, the backbone's own query q_proj(h), and the indexer's query
tower output (wq_b(q_norm(wq_a(h))), before RoPE) and head weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lsa.indexer import load_indexer
from lsa.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
from rank_needles import CS, TARGETS

TENSORS = "out/needles/tensors"


def sf(x):
    x = x.float()
    return float((x - x.mean(0)).pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean())


def isolation(x, c):
    """Mean distance of chunk c to the others / mean pairwise distance among the others."""
    d = torch.cdist(x[None].float(), x[None].float())[0]
    others = [j for j in range(x.shape[0]) if j != c]
    base = d[others][:, others]
    return float(d[c, others].mean() / (base.sum() / (len(others) * (len(others) - 1))))


def main():
    torch.set_num_threads(1)
    with open("out/needles/results.jsonl") as f:
        rows = [json.loads(x) for x in f]
    model, _ = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    indexer = load_indexer("qwen", hidden_size=model.config.hidden_size).eval()
    lines = ["# Specific-variance fractions (see spread.py docstring)", ""]
    key_stats = {}
    queries = {}
    with torch.inference_mode():
        for r in rows:
            d = torch.load(f"{TENSORS}/{r['task']}_{r['sample']}.pt")
            n = d["n"]
            start = torch.arange(n)[None] * CS
            sel = list(range(1, n - 2))
            needle = [c - 1 for c in r["needle_chunks"] if 1 <= c < n - 2]
            for L in TARGETS:
                mod = indexer.layers[str(L)]
                feats = indexer.features(d["keys"][L][None, :, : n * CS], start)[0]
                pre = mod.k_norm(mod.wk(feats))
                third = feats.shape[1] // 3
                for tag, x in (("feat_mean", feats[:, :third]), ("feat_all", feats), ("ikey", pre)):
                    x = x[sel]
                    st = key_stats.setdefault((r["task"], L, tag), {"sf": [], "iso": []})
                    st["sf"].append(sf(x))
                    if needle:
                        st["iso"].append(isolation(x, needle[0]))
                h = d["hidden_last"][L]
                a = model.model.layers[L].self_attn
                q_idx = mod.wq_b(mod.q_norm(mod.wq_a(h[None])))[0]
                w_idx = mod.weights_proj(h[None])[0]
                for tag, x in (
                    ("hidden", h),
                    ("model_q", a.q_proj(h[None])[0]),
                    ("indexer_q", q_idx),
                    ("indexer_w", w_idx),
                ):
                    queries.setdefault((r["task"], L, tag), []).append(x)
    lines += [
        "## Key side, per sample over selectable chunks (median over samples)",
        "",
        "| task | layer | tower stage | sf | needle isolation |",
        "|---|---|---|---|---|",
    ]
    for (task, L, tag), st in sorted(key_stats.items()):
        med = torch.tensor(st["sf"]).median().item()
        iso = torch.tensor(st["iso"]).median().item() if st["iso"] else float("nan")
        lines.append(f"| {task} | {L} | {tag} | {med:.3f} | {iso:.2f} |")
    lines += [
        "",
        "## Query side, across samples of a task (last prompt token)",
        "",
        "| task | layer | stage | samples | sf |",
        "|---|---|---|---|---|",
    ]
    for (task, L, tag), xs in sorted(queries.items()):
        lines.append(f"| {task} | {L} | {tag} | {len(xs)} | {sf(torch.stack(xs)):.4f} |")
    text = "\n".join(lines) + "\n"
    with open("out/needles/spread.md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
