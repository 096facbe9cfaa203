"""Tables and plots of a long-generation fidelity run (:mod:`lsa.eval.long_cli`).

``python -m lsa.eval.long_report OUT/results.json`` redraws them from a results file.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _key(r: dict) -> tuple:
    return (r["budget"], r["refresh_every"], r["method"])


def summary(records: list[dict]) -> list[dict]:
    """One row per (budget, τ, method): means over prompts, in budget, τ, method order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[_key(r)].append(r)
    rows = []
    for (budget, tau, method), rs in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        n = len(rs)
        steps = sum(r["decode_steps"] for r in rs)
        row = {
            "budget": budget,
            "refresh_every": tau,
            "method": method,
            "prompts": n,
            # per token, pooled over prompts (a long answer weighs more than a short one)
            "mean_kl": sum(sum(r["kl"]) for r in rs) / steps,
            "max_kl": max(r["max_kl"] for r in rs),
            "top1_agreement": sum(r["top1_agreement"] * r["decode_steps"] for r in rs) / steps,
            "agree_tokens": sum(r["agree_tokens"] for r in rs) / n,
            "answer_f1": (
                sum(r["answer_f1"] for r in rs) / n if all("answer_f1" in r for r in rs) else None
            ),
            "refreshes_per_step": sum(r["refreshes_per_step"] * r["decode_steps"] for r in rs)
            / steps,
            "recalled_kib_per_step": sum(
                r["recalled_bytes_per_step"] * r["decode_steps"] for r in rs
            )
            / steps
            / 1024,
            "device_fraction": sum(r["device_fraction"] for r in rs) / n,
        }
        rows.append(row)
    order = {"lsa": 0, "oracle": 1, "recency": 2, "random": 3}
    rows.sort(key=lambda r: (r["budget"], r["refresh_every"], order.get(r["method"], 9)))
    return rows


def markdown(records: list[dict], *, title: str = "") -> str:
    """The summary table, plus lsa's KL against the oracle's and recency's per budget and τ."""
    rows = summary(records)
    out = [f"# {title}", ""] if title else []
    out += [
        "| budget | τ | method | mean KL (nats/token) | max KL | top-1 agreement | tokens before "
        "first divergence | answer F1 | refreshes / token | recalled KiB / token | device / "
        "dense |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f1 = "" if r["answer_f1"] is None else f"{r['answer_f1']:.3f}"
        out.append(
            f"| {r['budget']:g} | {r['refresh_every']} | {r['method']} | {r['mean_kl']:.4f} | "
            f"{r['max_kl']:.2f} | {r['top1_agreement']:.3f} | {r['agree_tokens']:.1f} | {f1} | "
            f"{r['refreshes_per_step']:.4f} | {r['recalled_kib_per_step']:.1f} | "
            f"{r['device_fraction']:.3f} |"
        )
    by = {(r["budget"], r["refresh_every"], r["method"]): r["mean_kl"] for r in rows}
    ratios = []
    for (budget, tau, method), kl in sorted(by.items()):
        if method != "lsa":
            continue
        parts = []
        for other in ("oracle", "recency"):
            ref = by.get((budget, tau, other))
            if ref:
                parts.append(f"{kl / ref:.2f}× {other}")
        if parts:
            ratios.append(f"- budget {budget:g}, τ {tau}: lsa mean KL = {', '.join(parts)}")
    if ratios:
        out += ["", "lsa's mean KL relative to the oracle's and recency's:", "", *ratios]
    return "\n".join(out) + "\n"


def plot(records: list[dict], out: Path) -> Path:
    """``kl_over_generation.png``: per budget (rows) and τ (columns), each method's per-token KL
    (mean over prompts at each decode step) with the refreshes marked as vertical lines."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "the long-generation plot needs matplotlib: pip install -e '.[eval]' (or pass "
            "--no-plots)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in records})
    taus = sorted({r["refresh_every"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(
        len(budgets), len(taus), figsize=(4.5 * len(taus), 3.2 * len(budgets)), squeeze=False
    )
    for i, budget in enumerate(budgets):
        for j, tau in enumerate(taus):
            ax = axes[i][j]
            refresh_steps: set[int] = set()
            for method in methods:
                rs = [
                    r
                    for r in records
                    if (r["budget"], r["refresh_every"], r["method"]) == (budget, tau, method)
                ]
                if not rs:
                    continue
                width = max(len(r["kl"]) for r in rs)
                mean = []
                for t in range(width):
                    vals = [r["kl"][t] for r in rs if t < len(r["kl"])]
                    mean.append(sum(vals) / len(vals))
                ax.plot(range(1, width + 1), mean, label=method, linewidth=0.9)
                for r in rs:
                    refresh_steps.update(r["refresh_steps"])
            for s in sorted(refresh_steps):
                ax.axvline(s, color="grey", alpha=0.6, linewidth=0.7, linestyle=":")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
            ax.set_title(f"budget {budget:g}, τ {tau}", fontsize=9)
            ax.set_xlabel("decode step")
            if j == 0:
                ax.set_ylabel("KL(dense ‖ method), nats")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Per-token KL over the generation (grey: refreshes)", fontsize=10)
    fig.tight_layout()
    path = Path(out) / "kl_over_generation.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def records_of(results: dict) -> list[dict]:
    """Every method record of a results file (one list per prompt)."""
    return [r for p in results["prompts"] for r in p["records"]]


def _main(argv: list[str] | None = None) -> int:
    from lsa.cli_errors import Parser, UsageError, check_input_file, run_command

    p = Parser(prog="python -m lsa.eval.long_report", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="results.json of python -m lsa longgen")

    def run() -> int:
        a = p.parse_args(argv)
        check_input_file("results", a.results)
        try:
            results = json.loads(a.results.read_text())
            records = records_of(results)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UsageError(f"{a.results} is not a longgen results file: {err}") from None
        md = markdown(records, title=results.get("title", ""))
        (a.results.parent / "results.md").write_text(md)
        print(md)
        print(plot(records, a.results.parent))
        return 0

    return run_command(p.prog, run)


if __name__ == "__main__":
    sys.exit(_main())
