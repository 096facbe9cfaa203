"""Tables and plots from an eval results JSON (``python -m lsa.eval.report results.json``).

The markdown table has one row per task and one column per method, for each budget; below the
tasks: the mean over all tasks, the mean over the tasks the model solves densely (dense >= 50%),
the resident KV on the device as a fraction of dense, and decode tokens per second. Plots use
matplotlib's Agg backend (no display needed): accuracy per task per method, accuracy vs budget,
and the resident set over decode steps for one sample.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

SOLVED = 50.0  # a task is "solved densely" when dense scores at least this (percent)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def method_order(records: list[dict]) -> list[str]:
    """Methods in the order they first appear, dense first."""
    seen = list(dict.fromkeys(r["method"] for r in records))
    return sorted(seen, key=lambda m: (m != "dense", seen.index(m)))


def budgets_of(records: list[dict]) -> list[float]:
    return sorted({r["budget"] for r in records if r["budget"] is not None})


def accuracy(records: list[dict]) -> dict[tuple[str, float | None, str], float]:
    """Percent score per (method, budget, task), mean over samples."""
    acc = defaultdict(list)
    for r in records:
        acc[(r["method"], r["budget"], r["task"])].append(r["score"])
    return {k: 100.0 * _mean(v) for k, v in acc.items()}


def summary(records: list[dict]) -> dict:
    """Per budget and method: per-task accuracy, means, resident fraction and tokens/s."""
    acc = accuracy(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    solved = [t for t in tasks if acc.get(("dense", None, t), -1.0) >= SOLVED]
    out = {"tasks": tasks, "solved_tasks": solved, "budgets": {}}
    for budget in budgets_of(records) or [None]:
        rows = {}
        for m in method_order(records):
            b = None if m == "dense" else budget
            recs = [r for r in records if r["method"] == m and r["budget"] == b]
            if not recs:
                continue
            per_task = {t: acc[(m, b, t)] for t in tasks if (m, b, t) in acc}
            seconds = sum(r["decode_seconds"] for r in recs)
            # a mean over fewer tasks than the row names would not compare with the others' means
            rows[m] = {
                "per_task": per_task,
                "mean_all": _mean(per_task.values()) if len(per_task) == len(tasks) else math.nan,
                "mean_solved": (
                    _mean(per_task[t] for t in solved)
                    if all(t in per_task for t in solved)
                    else math.nan
                ),
                "device_fraction": _mean(
                    r["kv"]["device_bytes"] / r["kv"]["dense_bytes"] for r in recs
                ),
                "tokens_per_s": (
                    sum(r["decode_tokens"] for r in recs) / seconds if seconds > 0 else math.nan
                ),
            }
        out["budgets"][str(budget)] = rows
    return out


def markdown(records: list[dict], *, title: str = "") -> str:
    s = summary(records)
    lines = [f"## {title}", ""] if title else []
    n_samples = _mean(
        len({r["sample"] for r in records if r["task"] == t and r["method"] == "dense"})
        for t in s["tasks"]
    )
    solved = ", ".join(s["solved_tasks"]) or "none"
    for budget, rows in s["budgets"].items():
        methods = list(rows)
        lines += [
            f"### budget {budget}" if budget != "None" else "### dense only",
            "",
            "| task | " + " | ".join(methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for t in s["tasks"]:
            cells = [_fmt(rows[m]["per_task"].get(t)) for m in methods]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append(
            "| **mean, all tasks** | "
            + " | ".join(_fmt(rows[m]["mean_all"]) for m in methods)
            + " |"
        )
        lines.append(
            f"| **mean, solved densely ({len(s['solved_tasks'])})** | "
            + " | ".join(_fmt(rows[m]["mean_solved"]) for m in methods)
            + " |"
        )
        lines.append(
            "| resident KV / dense | "
            + " | ".join(f"{rows[m]['device_fraction']:.3f}" for m in methods)
            + " |"
        )
        lines.append(
            "| decode tokens/s | "
            + " | ".join(_fmt(rows[m]["tokens_per_s"]) for m in methods)
            + " |"
        )
        lines.append("")
    lines.append(
        f"Accuracy: RULER's metric in percent, mean over {n_samples:g} samples per task. Solved "
        f"densely (dense >= {SOLVED:g}%): {solved}. Resident KV: device bytes at the end of each "
        "request over a dense DynamicCache of the same tokens (LSACache.footprint(): reserve incl. "
        "tail and free slots, block table, chunk keys; kvpress: its compressed DynamicCache). "
        "Decode tokens/s excludes the prefill."
    )
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Write the three plots as PNG files under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary(records)
    paths = []
    budgets = list(s["budgets"])

    # 1. accuracy per task per method, at the first budget
    rows = s["budgets"][budgets[0]]
    methods, tasks = list(rows), s["tasks"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) + 2), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [rows[m]["per_task"].get(t, math.nan) for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], ys, width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (RULER, %)")
    ax.set_ylim(0, 105)
    ax.set_title(f"accuracy per task, budget {budgets[0]}")
    ax.legend(fontsize="small", ncol=min(4, len(methods)))
    fig.tight_layout()
    paths.append(out_dir / "accuracy_per_task.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. accuracy vs budget (mean over the tasks solved densely, else over all tasks)
    key = "mean_solved" if s["solved_tasks"] else "mean_all"
    numeric = [b for b in budgets if b != "None"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in method_order(records):
        if m == "dense":
            continue
        xs = [float(b) for b in numeric if m in s["budgets"][b]]
        ys = [s["budgets"][b][m][key] for b in numeric if m in s["budgets"][b]]
        ax.plot(xs, ys, marker="o", label=m)
    dense_rows = s["budgets"][budgets[0]].get("dense")
    if dense_rows is not None:
        ax.axhline(dense_rows[key], color="k", linestyle="--", label="dense")
    ax.set_xlabel("budget (fraction of chunks kept)")
    ax.set_ylabel(f"accuracy, {'tasks solved densely' if key == 'mean_solved' else 'all tasks'}")
    ax.set_ylim(0, 105)
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3. resident set over decode steps for one sample, per method (first traced record each)
    traced = {}
    for r in records:
        if "resident_trace" in r and r["method"] not in traced:
            traced[r["method"]] = r
    if traced:
        fig, axes = plt.subplots(
            1, len(traced), figsize=(3.5 * len(traced), 4), sharey=True, squeeze=False
        )
        for ax, (m, r) in zip(axes[0], traced.items(), strict=True):
            for ev in r["resident_trace"]:
                ax.scatter(
                    [ev["step"]] * len(ev["resident"]),
                    ev["resident"],
                    s=6,
                    c="tab:gray",
                    marker="s",
                )
                ax.scatter(
                    [ev["step"]] * len(ev["keep"]), ev["keep"], s=6, c="tab:blue", marker="s"
                )
            ax.set_title(f"{m} (budget {r['budget']})", fontsize="small")
            ax.set_xlabel("decode step of the refresh")
        axes[0][0].set_ylabel("chunk index (blue: kept, grey: tail)")
        first = next(iter(traced.values()))
        fig.suptitle(f"resident chunks, {first['task']} sample {first['sample']}", fontsize="small")
        fig.tight_layout()
        paths.append(out_dir / "resident_set.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def merge(results: list[dict]) -> tuple[list[dict], str]:
    """Records of several results files (e.g. task groups run as separate commands) and a title.

    A (method, budget, task, sample) present in two files is an error, not a silent overwrite.
    """
    records, seen = [], set()
    for data in results:
        for r in data["records"]:
            key = (r["method"], r["budget"], r["task"], r["sample"])
            if key in seen:
                raise ValueError(f"record {key} appears in more than one results file")
            seen.add(key)
            records.append(r)
    titles = [t for t in dict.fromkeys(d.get("title", "") for d in results) if t]
    if len(titles) > 1:
        return records, f"{titles[0]} (and {len(titles) - 1} more merged runs)"
    return records, titles[0] if titles else ""


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m lsa.eval.report",
        description="table and plots from one or more eval results JSON files (merged)",
    )
    p.add_argument("results", type=Path, nargs="+", help="results.json from `python -m lsa eval`")
    p.add_argument("--out", type=Path, default=None, help="folder (default: the results' folder)")
    p.add_argument("--no-plots", action="store_true", help="only results.md")
    a = p.parse_args(argv)
    if len(a.results) > 1 and a.out is None:
        p.error("merging several results files needs --out (a folder of its own)")
    datas = [json.loads(path.read_text()) for path in a.results]
    records, title = merge(datas)
    if any(d.get("partial") for d in datas):  # a run stopped by a time limit (cli checkpoints)
        title += " [partial: a run stopped before all its methods and budgets finished]"
    out = a.out or a.results[0].parent
    if len(a.results) > 1 and any(out.resolve() == r.parent.resolve() for r in a.results):
        p.error("--out must differ from the folders of the merged files (it gets results.json)")
    out.mkdir(parents=True, exist_ok=True)
    if len(a.results) > 1:
        (out / "results.json").write_text(
            json.dumps(
                {"title": title, "merged_from": [str(x) for x in a.results], "records": records},
                indent=1,
            )
        )
    (out / "results.md").write_text(markdown(records, title=title))
    if not a.no_plots:
        for path in plots(records, out):
            print(path)
    print(out / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
