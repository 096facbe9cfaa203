"""Print a results JSON from bench/results/ as a markdown table: ``python bench/table.py FILE``."""

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


if __name__ == "__main__":
    main(sys.argv[1])
