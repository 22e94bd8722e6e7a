"""Is the forward's gap to cuDNN at short rows a tail effect? Times ours (FLEXATTN_BACKEND=cuda) and cuDNN's SDPA
at one (seqlen, head dim) over several batch sizes, in interleaved rounds in one process, and prints each batch's
TFLOP/s, the ratio, and how many waves of tiles a persistent grid of one CTA per SM runs (tiles / SMs; a tile is
128 query rows, or 192 at head dims <= 64 unless causal with rows of <= 1024 keys: kernel_traits.cuh).

A whole number of waves leaves no SM idle at the end; 15.5 waves (the benchmark grid's seqlen 512: 2048 tiles on
132 SMs) leave half the SMs idle for the last tile. If the ratio at whole waves matches the ratio at half waves, the
gap is in the tiles themselves, not the tail.

Usage: python benchmarks/waves.py [--seqlen 512] [--dim 128] [--batches 31,32,33,64,66] [--causal 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import bench_ms, flops, ours_fn, sdpa_fn  # noqa: E402


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batches", default="31,32,33,64,66")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    s, d, causal = args.seqlen, args.dim, bool(args.causal)
    h = 2048 // d
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "SMs", sms, flush=True)
    impls = {"cuda": ours_fn(causal, "cuda"), "cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION, causal)}
    print("| batch | waves | cuda TFLOP/s | cuDNN TFLOP/s | ratio (median, min - max) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for b in (int(x) for x in args.batches.split(",")):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in impls}
        with torch.no_grad():
            for r in range(args.rounds):
                for name in list(impls) if r % 2 == 0 else list(impls)[::-1]:
                    fn = impls[name]
                    times[name].append(bench_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)))
        f = flops(b, h, s, d, d, causal, "fwd")
        ratios = [c / o for o, c in zip(times["cuda"], times["cudnn"], strict=True)]
        rows = 192 if d <= 64 and not (causal and s <= 1024) else 128
        tiles = b * h * -(-s // rows)
        tf = {name: f / statistics.median(t) / 1e9 for name, t in times.items()}
        print(
            f"| {b} | {tiles / sms:.2f} | {tf['cuda']:.0f} | {tf['cudnn']:.0f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f} - {max(ratios):.3f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
