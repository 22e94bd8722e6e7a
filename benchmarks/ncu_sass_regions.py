"""Where a kernel's warps stall, by region of its SASS: before the first loop, inside loops, between them,
after the last one. A loop is a backward branch's range. For a Triton attention kernel that separates the
tile loops (the matmul work) from the per-program set-up (resident tile loads, pipeline prologues) and the
epilogue (stores): session 6 found 24% of our dK/dV kernel's stall samples before its loop at seqlen 512,
vs 8% in FlexAttention's.

Input: an Nsight Compute source-page export, `ncu -i REP --page source --csv --print-source sass > F.csv`
(the report taken with `--section SourceCounters --import-source yes`); one table per kernel in it.
Usage: python benchmarks/ncu_sass_regions.py F.csv [TOP]   (TOP: instructions outside loops to list, 12)
"""

from __future__ import annotations

import collections
import csv
import re
import sys
from collections.abc import Iterator

SAMPLES = "Warp Stall Sampling (All Samples)"


def kernels(path: str) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """(kernel name, header, instruction rows) for each kernel of the export."""
    name, header, rows = None, None, []
    with open(path) as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                if name:
                    yield name, header, rows
                name, header, rows = row[1], None, []
            elif row and row[0] == "Address":
                header = row
            elif header and row and row[0].startswith("0x"):
                rows.append(row)
    if name:
        yield name, header, rows


def number(x: str) -> float:
    return float(x.replace(",", "")) if x and x not in "-" else 0.0


def report(name: str, header: list[str], rows: list[list[str]], top: int) -> None:
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    addr = [int(r[0], 16) for r in rows]
    text = [r[1].strip() for r in rows]
    samples = [number(r[col[SAMPLES]]) for r in rows]
    loops = []
    for a, t in zip(addr, text, strict=True):
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
        if target and int(target.group(1), 16) < a:
            loops.append((int(target.group(1), 16), a))
    first = min((lo for lo, _ in loops), default=addr[-1] + 1)
    last = max((hi for _, hi in loops), default=addr[-1] + 1)

    def region(a: int) -> str:
        if any(lo <= a <= hi for lo, hi in loops):
            return "loop"
        return "pre" if a < first else "post" if a > last else "between"

    where = [region(a) for a in addr]
    total = sum(samples) or 1.0
    print(f"== {name}: {len(rows)} instructions, {total:.0f} stall samples, {len(loops)} loops")
    for reg in ("pre", "loop", "between", "post"):
        idx = [i for i, w in enumerate(where) if w == reg]
        reasons: collections.Counter = collections.Counter()
        for i in idx:
            for s in stalls:
                reasons[s[len("stall_") :]] += number(rows[i][col[s]])
        n = sum(samples[i] for i in idx)
        top5 = ", ".join(f"{r} {v:.0f}" for r, v in reasons.most_common(5) if v)
        print(f"  {reg:8s} {n:8.0f} ({100 * n / total:4.1f}%)  {top5}")
    outside = sorted((i for i, w in enumerate(where) if w != "loop"), key=lambda i: -samples[i])
    for i in outside[:top]:
        print(f"    {addr[i] - addr[0]:#8x} {samples[i]:6.0f}  {text[i][:72]}")


def main() -> None:
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    for name, header, rows in kernels(sys.argv[1]):
        report(name, header, rows, top)


if __name__ == "__main__":
    main()
