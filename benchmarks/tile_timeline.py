"""Where a persistent CTA of the SM90 forward spends each tile: clock64 stamps per (CTA, warpgroup, tile).

Needs the extension built from a tree patched with `benchmarks/tile_timeline.patch` (it adds the stamps
and `torch.ops.flexattn_cuda.fwd_sm90_trace()`); the stamps cost a few instructions per tile, so the
timings are the instrumented kernel's. Usage: python benchmarks/tile_timeline.py SEQLEN HEADDIM CAUSAL.
Prints the median cycles of each phase over every tile after each CTA's first, per consumer warpgroup,
the key loop's waits (summed over its blocks), and when the CTAs start and end (%globaltimer).
"""

from __future__ import annotations

import math
import sys

import torch

from flexattn_ops.params import AttnArgs

# Consumer stamps (kernel.cuh): 0 tile index read, 1 Q landed, 2 first K landed, 3 turn taken,
# 4 first S = Q K^T done, 5 key loop done, 6 last P V done, 13 O normalised, 14 O store issued,
# 7 LSE stored. Tile slot 63, event 15 holds %globaltimer at the CTA's start (producer) and at each
# consumer warpgroup's end.
CONSUMER_PHASES = [
    ("wait for Q", 0, 1),
    ("wait for first K", 1, 2),
    ("wait for the turn", 2, 3),
    ("first S = Q K^T", 3, 4),
    ("key loop (blocks 2..n)", 4, 5),
    ("last P V", 5, 6),
    ("epilogue", 6, 7),
    ("  finalize", 6, 13),
    ("  O store", 13, 14),
    ("  LSE store", 14, 7),
]
# Sums over the key loop's blocks (durations, not stamps): 8 K wait, 9 turn wait, 10 V wait,
# 11 wgmma wait for S, 12 wgmma wait for P V.
LOOP_SUMS = [
    ("loop: K waits", 8),
    ("loop: turn waits", 9),
    ("loop: V waits", 10),
    ("loop: S wait", 11),
    ("loop: P V wait", 12),
]
# Producer stamps: 0 tile index written, 1 first K issued, 2 Q issued, 3 every K/V load issued.
PRODUCER_PHASES = [
    ("tile index written to first K issued", 0, 1),
    ("first K issued to Q issued", 1, 2),
    ("Q issued to every K/V load issued", 2, 3),
]


def median(xs: list[int]) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else float("nan")


def main() -> None:
    s, d, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    b, h = max(1, 16384 // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = AttnArgs(softmax_scale=1 / math.sqrt(d), window_right=0 if causal else -1)
    for _ in range(3):
        torch.ops.flexattn.fwd(q, k, v, *a)
    torch.cuda.synchronize()
    t = torch.ops.flexattn_cuda.fwd_sm90_trace().view(132, 4, 64, 16).cpu().tolist()
    warpgroups = 4 if d <= 64 else 3
    print(f"seqlen {s}, head dim {d}, causal {int(causal)}: median cycles per tile (tiles after each CTA's first)")
    rows = [(name, [lo, hi]) for name, lo, hi in CONSUMER_PHASES]
    print("| phase | " + " | ".join(f"consumer {w}" for w in range(1, warpgroups)) + " |")
    print("| --- |" + " ---: |" * (warpgroups - 1))
    per_wg = []
    for w in range(1, warpgroups):
        tiles = [(c, i) for c in range(132) for i in range(1, 63) if t[c][w][i][7] and t[c][w][i + 1][0]]
        phases = {name: median([t[c][w][i][hi] - t[c][w][i][lo] for c, i in tiles]) for name, (lo, hi) in rows}
        for name, e in LOOP_SUMS:
            phases[name] = median([t[c][w][i][e] for c, i in tiles])
        phases["to the next tile"] = median([t[c][w][i + 1][0] - t[c][w][i][7] for c, i in tiles])
        phases["whole tile"] = median([t[c][w][i + 1][0] - t[c][w][i][0] for c, i in tiles])
        per_wg.append(phases)
    for name in per_wg[0]:
        print(f"| {name} | " + " | ".join(f"{p[name]:.0f}" for p in per_wg) + " |")
    print("| producer phase | cycles |\n| --- | ---: |")
    tiles = [(c, i) for c in range(132) for i in range(1, 63) if t[c][0][i][3]]
    for name, lo, hi in PRODUCER_PHASES:
        print(f"| {name} | {median([t[c][0][i][hi] - t[c][0][i][lo] for c, i in tiles]):.0f} |")
    lead = median([t[c][1][i][0] - t[c][0][i][2] for c, i in tiles if t[c][1][i][0]])
    print(f"| Q issued before consumer 1 reads the tile's index | {lead:.0f} |")
    ends = [max(t[c][w][i][7] for w in range(1, warpgroups) for i in range(64)) for c in range(132)]
    span = median([end - t[c][0][0][0] for c, end in enumerate(ends)])
    tiles_cta0 = sum(1 for i in range(64) if t[0][1][i][7])
    print(f"CTA span (median over CTAs): {span:.0f} cycles; CTA 0 ran {tiles_cta0} tiles")
    starts = [t[c][0][63][15] for c in range(132)]
    ends_ns = [max(t[c][w][63][15] for w in range(1, warpgroups)) for c in range(132)]
    t0 = min(starts)
    q = torch.tensor([[s - t0, e - t0] for s, e in zip(starts, ends_ns, strict=True)], dtype=torch.float64)
    print(
        "globaltimer ns from the first CTA's start: start min/median/max "
        f"{q[:, 0].min():.0f}/{q[:, 0].median():.0f}/{q[:, 0].max():.0f}, end min/median/max "
        f"{q[:, 1].min():.0f}/{q[:, 1].median():.0f}/{q[:, 1].max():.0f}; "
        f"SM-busy fraction {float((q[:, 1] - q[:, 0]).sum() / (132 * q[:, 1].max())):.3f}"
    )


if __name__ == "__main__":
    main()
