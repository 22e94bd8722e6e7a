"""Plot benchmark CSVs (bench_attention.py output) as TFLOP/s bars per configuration.

Usage: python benchmarks/plot_results.py OUT.png bench_core.csv [bench_pairs.csv ...]
"""

from __future__ import annotations

import csv
import sys


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = sys.argv[1], sys.argv[2:]
    rows = [r for p in paths for r in csv.DictReader(open(p))]
    impls = ["triton", "flex", "sdpa_flash", "sdpa_cudnn"]
    panels = sorted({(r["mode"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(16, 3.6 * len(panels)))
    for ax, (mode, causal) in zip(axes, panels, strict=True):
        sub = [r for r in rows if r["mode"] == mode and r["causal"] == causal]
        keys = sorted({(int(r["dqk"]), int(r["dv"]), int(r["s"])) for r in sub})
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            vals = []
            for dqk, dv, s in keys:
                hit = [
                    r for r in sub if r["impl"] == impl and (int(r["dqk"]), int(r["dv"]), int(r["s"])) == (dqk, dv, s)
                ]
                vals.append(float(hit[0]["tflops"]) if hit and hit[0]["tflops"] not in ("", "nan") else 0.0)
            ax.bar([i + n * width for i in range(len(keys))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{a}/{b}\n{s}" for a, b, s in keys], fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, causal={causal} (bf16, H100)")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
