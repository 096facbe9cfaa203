"""Print a results JSON from bench/results/ as markdown tables: ``python bench/table.py FILE``.

First every row, then one line per config with each method's µs (CUDA-graph replay where timed,
else eager) and its × the HBM floor, so new methods (e.g. ``triton_reserve``) show beside the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    env = data["environment"]
    print(f"{env.get('gpu') or env.get('cpu')} · torch {env['torch']} · triton {env.get('triton')}")
    print(f"{env['date']} · copy bandwidth {data['rows'][0]['copy_gbps']:.0f} GB/s (read+write)\n")
    print("| config | method | µs | GB/s read | × floor | graph µs | graph × floor | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in data["rows"]:
        gbps = f"{r['gbps_read']:.0f}" if r.get("gbps_read") else "-"
        g_us = f"{r['graph_us']:.1f}" if r.get("graph_us") else "-"
        g_x = f"{r['graph_x_floor']:.2f}" if r.get("graph_x_floor") else "-"
        print(
            f"| {r['config']} | {r['method']} | {r['us']:.1f} | {gbps} | {r['x_floor']:.2f} | "
            f"{g_us} | {g_x} | {r['rel_err']:.1e} |"
        )
    print()
    print_by_config(data["rows"])


def print_by_config(rows: list[dict]) -> None:
    """Configs down, methods across: graph µs (× floor), or eager µs marked "e" without a graph."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "mask_build"))
    by_config: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["method"]] = r
    print("| config | floor µs | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for config, cells in by_config.items():
        floor = next(iter(cells.values()))["floor_us"]
        shown = []
        for m in methods:
            r = cells.get(m)
            if r is None:
                shown.append("-")
            elif r.get("graph_us"):
                shown.append(f"{r['graph_us']:.1f} ({r['graph_x_floor']:.2f}×)")
            else:
                shown.append(f"{r['us']:.1f}e ({r['x_floor']:.2f}×)")
        print(f"| {config} | {floor:.1f} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
