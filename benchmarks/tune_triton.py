"""Tune the Triton tiles for the benchmark grid's head-dim pairs and write the tuned table.

1. Compile every candidate configuration in parallel worker processes (on small inputs, into
   Triton's shared kernel cache), since compiling dominates tuning time (~2 s per kernel, ~20
   candidates x 3 kernels (fwd, dkdv, dq) x 14 (pair, causal) keys).
2. In this process, time the candidates on a grid-sized problem (seqlen 4096, batch 4, heads 2048 /
   min(dqk, dv)) through `triton_tuning.get_config` (the same path a user's first call takes); then the
   backward's one-launch choice ("bwd") with the winning tiles, whose combined kernel compiles here.
   `--kernels` limits which kinds are retuned; compare the new table's entries with the old before
   keeping them (session 4's all-kinds retune moved a forward tile that then measured slower at long
   sequences).
3. Write the winners to $OUT/triton_tuning.json and, as Python, $OUT/triton_configs.py (copied into
   the package as `flexattn_ops/triton_configs.py`, the tuned table `triton_tuning` reads first).

Usage: python benchmarks/tune_triton.py [--workers 14] [--pairs 64x64,128x128,...] [--seqlen 4096]
       [--kernels all | fwd,dkdv,dq,bwd] [--causal 0,1]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pprint
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PAIRS = "64x64,128x128,256x256,192x128,128x256,64x128,32x64"


def _problem(dqk: int, dv: int, causal: bool, s: int, b: int):
    from flexattn_ops.params import AttnArgs

    h = 2048 // min(dqk, dv)
    q = torch.randn(b, s, h, dqk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, h, dqk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, s, h, dv, device="cuda", dtype=torch.bfloat16)
    a = AttnArgs(softmax_scale=1.0 / math.sqrt(dqk), window_right=0 if causal else -1)
    return q, k, v, a


def _run(dqk: int, dv: int, causal: bool, s: int, b: int) -> None:
    from flexattn_ops import triton_backend

    q, k, v, a = _problem(dqk, dv, causal, s, b)
    out, lse = triton_backend.fwd(q, k, v, a)
    triton_backend.bwd(torch.randn_like(out), q, k, v, out, lse, a, False)
    torch.cuda.synchronize()


def _warm(job: tuple[int, int, bool]) -> str:
    """Worker: tune on a tiny problem with a throwaway cache dir: compiles every candidate."""
    os.environ["FLEXATTN_CACHE_DIR"] = tempfile.mkdtemp()
    t0 = time.time()
    try:
        _run(*job, s=256, b=1)
    except Exception as e:  # noqa: BLE001
        return f"{job}: {type(e).__name__}: {e}"
    return f"{job}: compiled in {time.time() - t0:.0f}s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--kernels", default="all", help='kinds to retune, e.g. "dkdv,dq,bwd" (the rest keep the table)')
    ap.add_argument("--causal", default="0,1", help='"0", "1" or "0,1": which masks to tune')
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    os.environ.setdefault("FLEXATTN_CACHE_DIR", os.path.join(out_dir, "tuning_cache"))
    # measure again even where the table has an entry, for the kinds asked for
    os.environ["FLEXATTN_TRITON_RETUNE"] = "1" if args.kernels == "all" else args.kernels
    masks = [bool(int(c)) for c in args.causal.split(",")]
    jobs = [(int(p.split("x")[0]), int(p.split("x")[1]), c) for p in args.pairs.split(",") for c in masks]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for msg in pool.imap_unordered(_warm, jobs):
            print("warm", msg, flush=True)
    print(f"parallel compile: {time.time() - t0:.0f}s", flush=True)
    from flexattn_ops import triton_tuning

    for dqk, dv, causal in jobs:
        t1 = time.time()
        _run(dqk, dv, causal, s=args.seqlen, b=max(1, 16384 // args.seqlen))
        print(f"tuned {dqk}x{dv} causal={causal} in {time.time() - t1:.0f}s", flush=True)
    table = {**triton_tuning._tuned_table(), **triton_tuning._memory}  # fresh winners replace old entries
    with open(os.path.join(out_dir, "triton_tuning.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "triton_configs.py"), "w") as f:
        f.write(
            '"""Tuned Triton tiles, written by benchmarks/tune_triton.py on a device run (do not edit by hand).\n\n'
            f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}.\n"
            '"""\n\nTUNED: dict[str, dict[str, int]] = '
        )
        f.write(pprint.pformat(dict(sorted(table.items())), width=118, sort_dicts=True) + "\n")
    pprint.pprint(table)
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
