"""Decode benchmark: `flash_attn_with_kvcache` on the Triton backend beside the peers (BENCHMARKS.md).

One query token against a KV cache, GQA 32/8, head dim 128, bf16, for (batch, kv length) in
(1, 2k) (1, 8k) (1, 32k) (16, 8k) (64, 4k) (128, 2k). Decode reads K and V once: the figure of merit is
GB/s of K+V read (2 * b * sk * hk * d * 2 bytes over the time), against the device copy bandwidth
measured in the same run (a 2 GiB device-to-device copy, bytes read + written).

Ours: contiguous cache, full (no append, as the peers); contiguous with a one-token append at
cache_seqlens = sk - 1 (+ rotary); paged caches with pages of 256 and 16 slots, pages shuffled.
Peers: SDPA flash and cuDNN (`enable_gqa=True`, (b, h, s, d) inputs as peers.py part_decode), compiled
FlexAttention on the dense cache and on a paged cache through torch's experimental PagedAttention
block-mask conversion (page 128), if they run.

Times: medians of CUDA-event timings. "graph": each implementation captured in a CUDA graph (20 calls a
replay; no launch gaps, which at b=1 2k exceed the kernel itself); "eager": `triton.testing.do_bench`
of the plain call (BENCHMARKS.md's protocol; includes host overhead where it exceeds the GPU time).
Caches smaller than 256 MB are replicated and the calls rotate over the copies, so no call reads K/V
that an earlier one left in the 50 MB L2.

Usage: python benchmarks/bench_decode.py [--sweep] [--deadline SECONDS]
Writes $OUT/bench_decode.csv (and $OUT/decode_sweep.csv with --sweep); prints a table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

os.environ["FLEXATTN_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flexattn_ops import flash_attn_with_kvcache, triton_decode  # noqa: E402
from flexattn_ops.params import KVCacheArgs  # noqa: E402

DT = torch.bfloat16
DEV = "cuda"
OUT = os.environ.get("OUT", "/tmp")
H, HK, D = 32, 8, 128
SHAPES = [(1, 2048), (1, 8192), (1, 32768), (16, 8192), (64, 4096), (128, 2048)]
FLEX_SHAPES = [(1, 32768), (64, 4096)]  # FlexAttention compiles per shape: the two that matter most
ROTATE_BYTES = 256 << 20  # replicate K/V until the copies exceed 5x the 50 MB L2


def kv_bytes(b: int, sk: int) -> int:
    return 2 * b * sk * HK * D * 2


def time_graph(fns: list[Callable[[], object]], inner: int = 20, reps: int = 15) -> float:
    """Median ms per call of `fns` (cycled) captured `inner` calls to a CUDA graph, replayed `reps` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def time_eager(fns: list[Callable[[], object]]) -> float:
    from triton.testing import do_bench

    counter = itertools.count()
    return do_bench(lambda: fns[next(counter) % len(fns)](), warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    from triton.testing import do_bench

    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * 2 * 1024**3 / (ms * 1e-3) / 1e9


class Inputs:
    """Several copies of one decode problem: q (b, 1, H, D), caches (b, sk, HK, D) and their (b, HK, sk, D)
    twins for SDPA/flex, paged pools (pages shuffled) for page sizes 256 and 16."""

    def __init__(self, b: int, sk: int):
        self.b, self.sk = b, sk
        self.copies = max(1, min(32, math.ceil(ROTATE_BYTES / kv_bytes(b, sk))))
        g = torch.Generator(device=DEV).manual_seed(b * 100003 + sk)
        self.q = torch.randn(b, 1, H, D, device=DEV, dtype=DT, generator=g)
        self.k_new = torch.randn(b, 1, HK, D, device=DEV, dtype=DT, generator=g)
        self.v_new = torch.randn(b, 1, HK, D, device=DEV, dtype=DT, generator=g)
        self.kc = [torch.randn(b, sk, HK, D, device=DEV, dtype=DT, generator=g) for _ in range(self.copies)]
        self.vc = [torch.randn(b, sk, HK, D, device=DEV, dtype=DT, generator=g) for _ in range(self.copies)]
        angles = torch.rand(sk, D // 2, device=DEV, generator=g) * 2 * math.pi
        self.cos, self.sin = angles.cos().to(DT), angles.sin().to(DT)
        self.seqlens_full = torch.full((b,), sk, dtype=torch.int32, device=DEV)
        self.seqlens_append = torch.full((b,), sk - 1, dtype=torch.int32, device=DEV)

    def paged(self, page: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        blocks = self.sk // page
        n_pages = self.b * blocks
        g = torch.Generator(device=DEV).manual_seed(page)
        table = torch.randperm(n_pages, device=DEV, generator=g).view(self.b, blocks).int()
        kp, vp = [], []
        for kc, vc in zip(self.kc, self.vc, strict=True):
            # page table[i, j] holds slots j*page.. of sequence i: scatter the dense cache into the pool
            pool_k = torch.empty(n_pages, page, HK, D, device=DEV, dtype=DT)
            pool_v = torch.empty_like(pool_k)
            pool_k[table.long().flatten()] = kc.view(self.b * blocks, page, HK, D)
            pool_v[table.long().flatten()] = vc.view(self.b * blocks, page, HK, D)
            kp.append(pool_k)
            vp.append(pool_v)
        return kp, vp, table

    def bhsd(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        return (
            self.q.transpose(1, 2).contiguous(),
            [k.transpose(1, 2).contiguous() for k in self.kc],
            [v.transpose(1, 2).contiguous() for v in self.vc],
        )


def ours_variants(x: Inputs) -> dict[str, tuple[list[Callable[[], object]], Optional[torch.Tensor]]]:
    """name -> (callables over the copies, one output to check against cuDNN or None)."""
    out: dict[str, tuple[list[Callable[[], object]], Optional[torch.Tensor]]] = {}
    q = x.q
    out["ours"] = ([lambda k=k, v=v: flash_attn_with_kvcache(q, k, v) for k, v in zip(x.kc, x.vc, strict=True)], None)
    out["ours_append"] = (
        [
            lambda k=k, v=v: flash_attn_with_kvcache(q, k, v, x.k_new, x.v_new, cache_seqlens=x.seqlens_append)
            for k, v in zip(x.kc, x.vc, strict=True)
        ],
        None,
    )
    out["ours_append_rotary"] = (
        [
            lambda k=k, v=v: flash_attn_with_kvcache(
                q, k, v, x.k_new, x.v_new, rotary_cos=x.cos, rotary_sin=x.sin, cache_seqlens=x.seqlens_append
            )
            for k, v in zip(x.kc, x.vc, strict=True)
        ],
        None,
    )
    for page in (256, 16):
        kp, vp, table = x.paged(page)
        out[f"ours_paged{page}"] = (
            [
                lambda k=k, v=v, t=table: flash_attn_with_kvcache(q, k, v, block_table=t)
                for k, v in zip(kp, vp, strict=True)
            ],
            None,
        )
    return out


def peer_variants(x: Inputs, flex_too: bool) -> dict[str, list[Callable[[], object]]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, ks, vs = x.bhsd()
    peers: dict[str, list[Callable[[], object]]] = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):

        def make(k, v, backend=backend):
            def fn():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            return fn

        peers[name] = [make(k, v) for k, v in zip(ks, vs, strict=True)]
    if not flex_too:
        return peers
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        peers["flex"] = [lambda k=k, v=v: flex(q, k, v, enable_gqa=True) for k, v in zip(ks, vs, strict=True)]
    except Exception as e:  # noqa: BLE001
        print(f"flex unavailable: {type(e).__name__}: {e}", flush=True)
    try:
        peers["flex_paged128"] = flex_paged(x, q)
    except Exception as e:  # noqa: BLE001
        print(f"flex paged unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return peers


def flex_paged(x: Inputs, q: torch.Tensor) -> list[Callable[[], object]]:
    """FlexAttention over a paged pool (1, HK, pages * 128, D) through torch's PagedAttention block-mask
    conversion (its page size must equal the block mask's KV block, 128)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    page = 128
    n_pages = x.b * x.sk // page
    pa = PagedAttention(n_pages, page, x.b, device=DEV)
    for i in range(x.b):
        pa.reserve(torch.tensor(i, device=DEV), torch.tensor(x.sk, device=DEV))
    bm = create_block_mask(lambda b, h, qi, kv: kv >= 0, x.b, None, 1, x.sk, device=DEV, BLOCK_SIZE=page)
    pbm = pa.convert_logical_block_mask(bm)
    flex = torch.compile(flex_attention, dynamic=False)
    fns = []
    for kc, vc in zip(x.kc, x.vc, strict=True):
        pool_k = torch.empty(1, HK, n_pages * page, D, device=DEV, dtype=DT)
        pool_v = torch.empty_like(pool_k)
        # slot s of sequence i lives at page_table[i, s // page] * page + s % page
        slots = pa.page_table[: x.b, : x.sk // page, None] * page + torch.arange(page, device=DEV)
        pool_k[0][:, slots.flatten()] = kc.permute(2, 0, 1, 3).reshape(HK, -1, D)
        pool_v[0][:, slots.flatten()] = vc.permute(2, 0, 1, 3).reshape(HK, -1, D)
        fns.append(lambda k=pool_k, v=pool_v: flex(q, k, v, block_mask=pbm, enable_gqa=True))
    return fns


def sweep(x: Inputs, rows: list[dict], deadline: float, paged: bool) -> None:
    """Tile configs x split counts of the kernel itself (graph-timed) on the contiguous cache, and a smaller
    grid on paged caches (pages of 256 and 16) when `paged`: the data for the defaults in decode_config."""
    base = triton_decode.decode_config(DT, D, D, H // HK)
    heur = triton_decode.choose_num_splits(0, x.b * HK, x.sk, base["BLOCK_N"], torch.device(DEV))
    splits = sorted({max(1, heur // 2), heur, min(128, heur * 2), 1})
    caches: list[tuple[str, list, list, Optional[torch.Tensor]]] = [("contig", x.kc, x.vc, None)]
    if paged:
        for page in (256, 16):
            kp, vp, table = x.paged(page)
            caches.append((f"paged{page}", kp, vp, table))
    for cache, kcs, vcs, table in caches:
        c = KVCacheArgs(block_table=table, softmax_scale=1 / math.sqrt(D))
        grid = itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits)
        if cache != "contig":
            grid = itertools.product((32, 64, 128), (4,), (2, 3, 4), [heur])
        for bn, warps, stages, n_splits in grid:
            if time.time() > deadline:
                print("sweep: deadline reached", flush=True)
                return
            cfg = {
                "BLOCK_M": base["BLOCK_M"],
                "BLOCK_N": bn,
                "num_warps": warps,
                "num_stages": stages,
                "num_splits": n_splits,
            }
            fns = [
                lambda k=k, v=v, cfg=cfg, c=c: triton_decode.fwd_kvcache(x.q, k, v, c, config=cfg)
                for k, v in zip(kcs, vcs, strict=True)
            ]
            try:
                ms = time_graph(fns)
            except Exception as e:  # noqa: BLE001
                print(f"sweep {cache} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            gbs = kv_bytes(x.b, x.sk) / (ms * 1e-3) / 1e9
            rows.append(
                dict(
                    cache=cache,
                    b=x.b,
                    sk=x.sk,
                    BLOCK_N=bn,
                    num_warps=warps,
                    num_stages=stages,
                    splits=n_splits,
                    heuristic=heur,
                    ms=round(ms, 5),
                    gbs=round(gbs, 1),
                )
            )
        best = max((r for r in rows if (r["b"], r["sk"], r["cache"]) == (x.b, x.sk, cache)), key=lambda r: r["gbs"])
        print(f"sweep {cache} b={x.b} sk={x.sk}: best {best}", flush=True)


def measure(name: str, fns: list[Callable[[], object]], b: int, sk: int, rows: list[dict], copy_gbs: float) -> None:
    """Graph- and eager-timed GB/s of one implementation; a failure is printed and recorded as NaN."""
    for mode, timer in (("graph", time_graph), ("eager", time_eager)):
        try:
            ms = timer(fns)
        except Exception as e:  # noqa: BLE001
            ms = float("nan")
            print(f"{name} b={b} sk={sk} {mode}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        gbs = kv_bytes(b, sk) / (ms * 1e-3) / 1e9
        rows.append(
            dict(
                impl=name, b=b, sk=sk, mode=mode, ms=round(ms, 5), gbs=round(gbs, 1), frac_copy=round(gbs / copy_gbs, 3)
            )
        )
        print(
            f"  {name:20s} b={b:3d} sk={sk:5d} {mode:5s} {ms:.4f} ms {gbs:7.0f} GB/s {gbs / copy_gbs:.2f} of copy",
            flush=True,
        )


def _write(rows: list[dict], name: str) -> None:
    if rows:
        with open(os.path.join(OUT, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from the start: no sweeping after")
    parser.add_argument("--flex-deadline", type=float, default=1e9, help="seconds from the start: no flex after")
    args = parser.parse_args()
    t_start = time.time()
    torch._dynamo.config.recompile_limit = 10**6
    torch._dynamo.config.accumulated_recompile_limit = 10**6
    import triton

    print(
        f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
        f"cudnn {torch.backends.cudnn.version()} | triton {triton.__version__} | "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}",
        flush=True,
    )
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth (2 GiB, read + write): {copy_gbs:.0f} GB/s", flush=True)
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    for b, sk in SHAPES:
        try:
            x = Inputs(b, sk)
            impls = {name: fns for name, (fns, _) in ours_variants(x).items()}
            impls.update(peer_variants(x, flex_too=False))
            # correctness beside cuDNN on the first copy (bf16 outputs of the same float32 softmax)
            ref = impls["sdpa_cudnn"][0]().transpose(1, 2).float()
            errs = {
                n: (impls[n][0]().float() - ref).abs().max().item() for n in ("ours", "ours_paged256", "ours_paged16")
            }
            print(f"b={b} sk={sk}: max |ours - cudnn| {errs}", flush=True)
            for name, fns in impls.items():
                measure(name, fns, b, sk, rows, copy_gbs)
        except Exception as e:  # noqa: BLE001
            print(f"b={b} sk={sk}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        _write(rows, "bench_decode.csv")
        x = impls = None  # type: ignore[assignment]
        torch.cuda.empty_cache()
    # the sweep, most important shapes first, then FlexAttention (its compile takes ~20 s a shape)
    order = [(1, 32768), (16, 8192), (64, 4096), (128, 2048), (1, 8192), (1, 2048)]
    for b, sk in order if args.sweep else []:
        if time.time() > t_start + args.deadline:
            break
        try:
            x = Inputs(b, sk)
            sweep(x, sweep_rows, t_start + args.deadline, paged=(b, sk) in ((1, 32768), (64, 4096)))
        except Exception as e:  # noqa: BLE001
            print(f"sweep b={b} sk={sk}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        _write(sweep_rows, "decode_sweep.csv")
        x = None  # type: ignore[assignment]
        torch.cuda.empty_cache()
    for b, sk in FLEX_SHAPES:
        if time.time() > t_start + args.flex_deadline:
            print("flex: skipped (time)", flush=True)
            break
        try:
            x = Inputs(b, sk)
            for name, fns in peer_variants(x, flex_too=True).items():
                if name.startswith("flex"):
                    measure(name, fns, b, sk, rows, copy_gbs)
        except Exception as e:  # noqa: BLE001
            print(f"flex b={b} sk={sk}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        _write(rows, "bench_decode.csv")
    # table: GB/s (graph / eager) per impl and shape, ratio of ours to cuDNN
    by = {(r["impl"], r["b"], r["sk"], r["mode"]): r["gbs"] for r in rows}
    names = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"\ncopy {copy_gbs:.0f} GB/s; GB/s of K+V read, graph-timed (eager do_bench in brackets)")
    print("impl".ljust(20) + "".join(f"b={b},kv={sk // 1024}k".rjust(20) for b, sk in SHAPES))
    for name in names:
        cells = [
            f"{by.get((name, b, sk, 'graph'), float('nan')):.0f} ({by.get((name, b, sk, 'eager'), float('nan')):.0f})"
            for b, sk in SHAPES
        ]
        print(name.ljust(20) + "".join(c.rjust(20) for c in cells))
    for mode in ("graph", "eager"):
        ratios = [
            by.get(("ours", b, sk, mode), float("nan")) / by.get(("sdpa_cudnn", b, sk, mode), float("nan"))
            for b, sk in SHAPES
        ]
        fracs = [by.get(("ours", b, sk, mode), float("nan")) / copy_gbs for b, sk in SHAPES]
        print(f"ours/cudnn ({mode})".ljust(20) + "".join(f"{r:.2f}".rjust(20) for r in ratios))
        print(f"ours/copy ({mode})".ljust(20) + "".join(f"{r:.2f}".rjust(20) for r in fracs))
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
