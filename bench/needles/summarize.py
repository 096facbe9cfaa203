"""Summary table of out/needles/results.jsonl (written by rank_needles.py) -> summary.md."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter

SIGNALS = [
    ("indexer", "shipped indexer (mean of L6/12/18)"),
    ("idx_L6", "indexer, layer-6 head only"),
    ("idx_L12", "indexer, layer-12 head only"),
    ("idx_L18", "indexer, layer-18 head only"),
    ("snapkv", "SnapKV: last 64 prompt rows, all layers"),
    ("last", "last prompt row, all layers"),
    ("attn_L6", "last row, layer 6 only"),
    ("attn_L12", "last row, layer 12 only"),
    ("attn_L15", "last row, layer 15 only"),
    ("attn_L18", "last row, layer 18 only"),
    ("attn_L21", "last row, layer 21 only"),
    ("meank_L12", "real L12 query . chunk-mean key"),
    ("meank_L15", "real L15 query . chunk-mean key"),
    ("meank_L18", "real L18 query . chunk-mean key"),
    ("meank_L21", "real L21 query . chunk-mean key"),
    ("quest_L18", "Quest min/max bound, real L18 query"),
    ("quest_L21", "Quest min/max bound, real L21 query"),
    ("answer", "answer-digit queries (dense oracle)"),
]


def main(path="out/needles/results.jsonl", out="out/needles/summary.md"):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t != "niah_multikey_2", t))
    by = {t: [r for r in rows if r["task"] == t] for t in tasks}
    lines = [
        "# Needle-chunk rank per selection signal (Qwen2.5-Coder-0.5B, RULER 8K, CPU fp32)",
        "",
    ]
    lines.append(
        "Rank 0 = best among selectable chunks 1..n-3; hit = every chunk holding the answer "
        "digits is kept at budget ceil(0.1 n) (free picks = k - 3); a needle in a forced chunk "
        "(sink / last 2) counts as a hit and is left out of the median rank. "
        "z = needle score in std over selectable chunks; "
        "rho = Spearman of the score with chunk index (recency)."
    )
    lines.append("")
    head = "| signal |"
    sep = "|---|"
    for t in tasks:
        head += f" {t} (N={len(by[t])}) median rank | hit@10% | median z | rho |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for name, desc in SIGNALS:
        line = f"| `{name}` {desc} |"
        for t in tasks:
            sig = [r["signals"][name] for r in by[t] if name in r["signals"]]
            if not sig:
                line += " - | - | - | - |"
                continue
            ranked = [s["needle_rank"] for s in sig if s["needle_rank"] >= 0]  # -1: forced
            med = statistics.median(ranked) if ranked else -1
            hit = sum(s["hit"] for s in sig)
            zs = [s["needle_z"] for s in sig if s["needle_rank"] >= 0]
            z = statistics.median(zs) if zs else float("nan")
            rho = statistics.median(s["spearman_pos"] for s in sig)
            line += f" {med:g} | {hit}/{len(sig)} | {z:.1f} | {rho:+.2f} |"
        lines.append(line)
    lines += ["", "Free picks per sample (k - 3): "]
    for t in tasks:
        lines.append(f"- {t}: " + ", ".join(str(r["free"]) for r in by[t]))
    lines += ["", "## Per sample", ""]
    lines.append(
        "| task | sample | n | needle chunk | indexer | idx L6/L12/L18 | snapkv | last | "
        "attn L18 | meank L18 | answer | indexer top-3 (distance from end) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in tasks:
        for r in by[t]:
            s = r["signals"]
            top = ",".join(str(r["n"] - 1 - c) for c in s["indexer"]["top3"])
            lines.append(
                f"| {t} | {r['sample']} | {r['n']} | {r['needle_chunks']} | "
                f"{s['indexer']['needle_rank']} | {s['idx_L6']['needle_rank']}/"
                f"{s['idx_L12']['needle_rank']}/{s['idx_L18']['needle_rank']} | "
                f"{s['snapkv']['needle_rank']} | {s['last']['needle_rank']} | "
                f"{s['attn_L18']['needle_rank']} | {s['meank_L18']['needle_rank']} | "
                f"{s['answer']['needle_rank']} | {top} |"
            )
    lines += ["", "## What the indexer ranks first (multikey_2)", ""]
    dist = Counter()
    for r in by.get("niah_multikey_2", []):
        for c in r["signals"]["indexer"]["top3"]:
            dist[r["n"] - 1 - c] += 1
        tops = "; ".join(
            f"chunk {x['chunk']} keys={x['keys']} answer-mass={x['answer_mass']:.3f}"
            for x in r["indexer_top"]
        )
        lines.append(
            f"- sample {r['sample']} asked `{r['key']}` (needle chunk {r['needle_chunks']}, "
            f"answer mass {r['answer_mass_needle']:.3f}): {tops}"
        )
        lines.append(f"  - top-1 text: {r['indexer_top'][0]['text']!r}")
    lines.append("")
    lines.append(
        "Indexer top-3 positions, as distance from the last completed chunk (0 = chunk n-1): "
        + ", ".join(f"{d}: {c}" for d, c in sorted(dist.items()))
    )
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
