"""Summarise an Nsight Compute source-page export: the kernel's warp-state section and the SASS
instructions with the most stall samples (with every stall-reason column that is non-zero there).

Usage: python benchmarks/ncu_stall_table.py DETAILS.txt SASS.csv [TOP]
"""

from __future__ import annotations

import csv
import sys


def number(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    details, sass = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    with open(details) as f:
        text = f.read()
    keep = False
    for line in text.splitlines():
        if "Section:" in line:
            keep = "Warp State" in line or "Speed Of Light" in line
        if keep:
            print(line)
    with open(sass, newline="") as f:
        rows = list(csv.reader(f))
    head_at = next((i for i, r in enumerate(rows) if any("Warp Stall Sampling" in c for c in r)), None)
    if head_at is None:
        print("no source table in", sass, "; first lines:", rows[:3])
        return
    head, body = rows[head_at], rows[head_at + 1 :]
    total_col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    src_col = next((i for i, c in enumerate(head) if c == "Source"), 1)
    total = sum(number(r[total_col]) for r in body if len(r) > total_col)
    print(f"\nSASS lines: {len(body)}, stall samples: {total:.0f}; columns: {head}")
    for r in sorted((r for r in body if len(r) > total_col), key=lambda r: -number(r[total_col]))[:top]:
        reasons = [
            f"{head[i].replace('stall_', '')}={number(v):.0f}"
            for i, v in enumerate(r)
            if "stall" in head[i].lower() and i != total_col and "Sampling" not in head[i] and number(v) > 0
        ]
        share = 100 * number(r[total_col]) / max(total, 1)
        print(f"{share:5.1f}%  {r[0]:>6}  {r[src_col][:70]:70s} {' '.join(reasons)}")


if __name__ == "__main__":
    main()
