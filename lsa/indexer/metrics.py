"""How well a chunk ranking predicts the lookahead target, against the oracle and baselines.

For one position ``t`` with ``n`` existing chunks, a graded target ``y`` over the selectable
chunks (:mod:`lsa.indexer.labels`) and a method's scores ``s`` [n], at a budget ``b``:

- the method keeps ``select_chunks(s, budget=b, sink_chunks, recent_chunks)``: forced chunks count
  toward the budget exactly as the cache keeps them; its *free picks* are the kept selectable ones;
- the oracle keeps ``select_chunks(y, ...)`` (the most target mass);
- **coverage** = ``Σ y[method's free picks] / Σ y[oracle's free picks]`` (1.0 = oracle);
- **overlap** = ``|method's free picks ∩ oracle's free picks| / |oracle's free picks|``;
- **NDCG** of the method's order of the selectable chunks, with gains ``y`` (full list).

Positions where the budget leaves no free pick, or the target has no mass, are skipped (counted in
``skipped``). Results are means over positions.

Baselines at the same budget: ``recency`` (newest first), ``random`` (seeded), ``snapkv`` (the
attention of the last 64 queries up to ``t``: :attr:`lsa.indexer.labels.Targets.reactive`).
"""

from __future__ import annotations

import math

import torch

from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS, select_chunks

BUDGETS = (0.1, 0.2)


def ndcg(scores: torch.Tensor, gains: torch.Tensor) -> float:
    """NDCG of the order given by ``scores`` [m] (ties to the earlier item) for ``gains`` [m]."""
    if gains.numel() == 0 or float(gains.sum()) <= 0:
        return float("nan")
    disc = 1.0 / torch.log2(torch.arange(gains.numel(), dtype=torch.float64) + 2.0)
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    dcg = (gains.double()[order] * disc).sum()
    idcg = (torch.sort(gains.double(), descending=True).values * disc).sum()
    return float(dcg / idcg)


def position_metrics(
    scores: torch.Tensor,
    target: torch.Tensor,
    selectable: torch.Tensor,
    budget: float | int,
    *,
    sink_chunks: int,
    recent_chunks: int,
) -> dict[str, float] | None:
    """Coverage, overlap and NDCG at one position (``None`` if it has no free pick or no mass).

    Args:
        scores: float [n]; target: float [n] (zero outside ``selectable``); selectable: bool [n].
    """
    kw = {"budget": budget, "sink_chunks": sink_chunks, "recent_chunks": recent_chunks}
    oracle = select_chunks(target[None], **kw)[0] & selectable
    if not bool(oracle.any()) or float(target[oracle].sum()) <= 0:
        return None
    picks = select_chunks(scores.float()[None], **kw)[0] & selectable
    return {
        "coverage": float(target[picks].sum() / target[oracle].sum()),
        "overlap": float((picks & oracle).sum()) / float(oracle.sum()),
        "ndcg": ndcg(scores[selectable], target[selectable]),
    }


def evaluate(
    scores: dict[str, list[torch.Tensor]],
    targets: list[torch.Tensor],
    selectable: list[torch.Tensor],
    *,
    budgets=BUDGETS,
    sink_chunks: int = SINK_CHUNKS,
    recent_chunks: int = RECENT_CHUNKS,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {budget: {coverage, overlap, ndcg, n, skipped}}}`` over all positions."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in scores.items():
        if len(rows) != len(targets):
            raise ValueError(f"{name}: {len(rows)} score rows for {len(targets)} targets")
        out[name] = {}
        for budget in budgets:
            acc = {"coverage": [], "overlap": [], "ndcg": []}
            skipped = 0
            for s, y, sel in zip(rows, targets, selectable, strict=True):
                m = position_metrics(
                    s, y, sel, budget, sink_chunks=sink_chunks, recent_chunks=recent_chunks
                )
                if m is None:
                    skipped += 1
                    continue
                for k, v in m.items():
                    if not math.isnan(v):
                        acc[k].append(v)
            res = {k: (sum(v) / len(v) if v else float("nan")) for k, v in acc.items()}
            res["n"] = len(acc["coverage"])
            res["skipped"] = skipped
            out[name][f"{budget:g}"] = res
    return out


def baseline_scores(
    n_chunks: list[int], reactive: list[torch.Tensor], seed: int = 0
) -> dict[str, list[torch.Tensor]]:
    """Recency, Random and SnapKV-style scores for each position."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "recency": [torch.arange(n, dtype=torch.float32) for n in n_chunks],
        "random": [torch.rand(n, generator=gen) for n in n_chunks],
        "snapkv": list(reactive),
    }


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A GitHub table: one row per method, coverage / overlap / NDCG per budget."""
    budgets = list(next(iter(results.values())).keys())
    head = "| method | " + " | ".join(f"cov@{b} | ovl@{b} | ndcg@{b}" for b in budgets) + " |"
    sep = "|---" * (1 + 3 * len(budgets)) + "|"
    lines = [head, sep]
    for name, per in results.items():
        cells = []
        for b in budgets:
            r = per[b]
            cells += [f"{r['coverage']:.3f}", f"{r['overlap']:.3f}", f"{r['ndcg']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    counts = ", ".join(f"{b}: {first[b]['n']} ({first[b]['skipped']} skipped)" for b in budgets)
    lines.append(f"\npositions evaluated per budget: {counts}; skipped = no free pick or no mass")
    return "\n".join(lines)
