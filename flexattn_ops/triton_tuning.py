"""Tile configurations for the Triton kernels: a tuned table, an autotuner and its on-disk cache.

A configuration is ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` for one kernel
(``fwd``, ``dkdv``, ``dq``), or ``{"one_launch": 0 | 1}`` for ``bwd``: whether the dK/dV and dQ programs
share a launch when their configs allow it (measured on the H100: 6% faster at hd128 seqlen 512,
1-7% slower at hd64 512 and hd128 2k / 16k, so it is timed per key, not assumed).
Lookup order for a key (GPU name, Triton version, dtype, dqk, dv, causal):
1. ``TUNED`` (`flexattn_ops.triton_configs`, written by `benchmarks/tune_triton.py` from a device run);
2. the cache file (``$FLEXATTN_CACHE_DIR`` or ``~/.cache/flexattn_ops``)/``triton_tuning.json``
   (both skipped with ``FLEXATTN_TRITON_RETUNE=1``, or for some kinds with e.g. ``=dkdv,dq,bwd``);
3. tune now: time every candidate on the call's own inputs with `triton.testing.do_bench`, keep the
   fastest, write it to the cache file (so a second process does not re-tune); ``FLEXATTN_TRITON_TUNE_LOG=1``
   prints every candidate's time.
Tuning is skipped (a heuristic default is used) under ``TRITON_INTERPRET=1``, while a CUDA graph is
being captured (timing would synchronise), or with ``FLEXATTN_TRITON_AUTOTUNE=0``.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import triton

Config = dict[str, int]

INTERPRET_CONFIG: Config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}

_lock = threading.Lock()
_memory: dict[str, Config] = {}
# get_config's answers by its arguments: the string key costs ~3 us to build, and a training step asks 4 times
_picked: dict[tuple, Config] = {}
# the cache file's entries by its path, read once a process: a configuration that cannot be tuned (autotuning
# off, e.g. fp16 on the H100, whose table is bf16) fell back to the file on every call, ~100 us of reading
_disk: dict[Path, dict[str, Config]] = {}


@functools.cache
def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter. Triton decides that once, when it is imported
    (TRITON_INTERPRET=1), so this reads the variable once too: an environ lookup on every launch cost
    ~24 lookups per training step."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. triton.cdiv and triton.next_power_of_2 are constexpr_functions in Triton 3.9,
    ~4 us a call from Python; a training step called them ~15 times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), without triton.next_power_of_2's cost (see cdiv)."""
    return 1 << (n - 1).bit_length()


def _cache_path() -> Path:
    return _cache_file(os.environ.get("FLEXATTN_CACHE_DIR", ""))


@functools.cache
def _cache_file(root: str) -> Path:
    return Path(root or os.path.join(os.path.expanduser("~"), ".cache", "flexattn_ops")) / "triton_tuning.json"


def pad_dim(d: int) -> int:
    """A head dim as a tile dim: tl.dot needs every tile dim >= 16; powers of two cost masked lanes only."""
    return max(16, next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact float32 products for float32 inputs (tf32 would miss the oracle tolerance)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"  # the interpreter's dot mis-reads bfloat16 tiles (see triton_common.mm)
    return "tf32"  # ignored for 16-bit inputs


def page_tile_aligned(page_size: int, block_n: int) -> bool:
    """Whether every BLOCK_N-key tile (tiles start at multiples of BLOCK_N) lies inside one page of a paged
    cache (page_size 0: not paged). Then the kernels look block_table up once per tile, with contiguous
    slots inside the page (triton_common.page_lookup), instead of once per key (any other page size)."""
    return page_size > 0 and page_size % block_n == 0


@functools.cache
def _device_name(device: torch.device) -> str:
    # cached: get_device_name queries the driver (microseconds on every call otherwise)
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else device.type


# Sequences up to this long get their own tiles ("|short" keys): with 512 tokens a 128-row tile
# leaves 4 programs per head and 8 key tiles per program, where pipeline fill, not the loop, dominates.
SHORT_SEQLEN = 1024


@functools.cache
def config_key(
    kernel: str, device: torch.device, dtype: torch.dtype, dqk: int, dv: int, causal: bool, seqlen: int = 1 << 30
) -> str:
    """Cache key: head dims are rounded to the padded tile dims (40 and 64 share tiles); sequences up to
    SHORT_SEQLEN (seqlen = max(sq, sk)) get a "|short" suffix."""
    dt = str(dtype).replace("torch.", "")
    return (
        f"{kernel}|{_device_name(device)}|triton{triton.__version__}|{dt}|{pad_dim(dqk)}x{pad_dim(dv)}|"
        f"{'causal' if causal else 'full'}" + ("|short" if seqlen <= SHORT_SEQLEN else "")
    )


def default_config(kernel: str, dtype: torch.dtype, dqk: int, dv: int) -> Config:
    """Heuristic configuration (no timing): what an H100 liked for the nearest head dims."""
    if kernel == "bwd":  # the interpreter (CI) runs the one-launch path; untimed GPU calls keep two launches
        return {"one_launch": int(interpreting())}
    if interpreting():
        return dict(INTERPRET_CONFIG)
    width = pad_dim(dqk) + pad_dim(dv)
    fp32 = dtype == torch.float32
    if kernel == "fwd":
        if width <= 128:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        elif width <= 256:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        else:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    elif kernel == "dkdv":
        if width <= 128:
            cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
        elif width <= 256:
            cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
        else:
            cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    else:  # dq
        if width <= 256:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
        else:
            cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if fp32:  # fp32 tiles take twice the shared memory
        cfg = {**cfg, "BLOCK_M": min(cfg["BLOCK_M"], 64), "BLOCK_N": min(cfg["BLOCK_N"], 32), "num_stages": 1}
    return cfg


def candidates(kernel: str, dtype: torch.dtype, dqk: int, dv: int) -> list[Config]:
    """What the tuner tries: the default plus neighbours (tile sizes, warps, pipeline depth)."""
    if kernel == "bwd":
        return [{"one_launch": 0}, {"one_launch": 1}]
    width = pad_dim(dqk) + pad_dim(dv)
    out: list[Config] = [default_config(kernel, dtype, dqk, dv)]
    if kernel == "fwd":
        grid = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3)]
        if width <= 128:
            grid += [(128, 128, 4, 3), (128, 64, 4, 4)]
        if width > 256:
            grid += [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 3)]
    elif kernel == "dkdv":
        grid = [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 3)]
        if width > 256:
            grid += [(64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2)]
        else:
            # 32 query rows under 8 warps: at 3 stages the only hd128 tile that compiles without spills for sm_90
            # (2 stages: 40 B per thread; 64 x 128: 160 B at 3 stages, 360 B at 2; benchmarks/compile_bwd_sm90.py)
            grid += [(128, 128, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2)]
            if width <= 128:
                # narrow heads: 128 keys under 4 warps keep the dK/dV accumulators on 128 threads (255 registers
                # at 32 x 128 for (32, 64)); fewer query rows a step or a deeper pipeline are the neighbours
                grid += [(16, 128, 4, 2), (32, 128, 4, 3)]
    else:
        grid = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3)]
        if width > 256:
            grid += [(64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (128, 32, 8, 3)]
        else:
            grid += [(128, 128, 8, 2)]
    for m, n, w, s in grid:
        cfg = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        if cfg not in out:
            out.append(cfg)
    return out


def _tuned_table() -> dict[str, Config]:
    try:
        from flexattn_ops.triton_configs import TUNED
    except ImportError:
        return {}
    return TUNED


def _read_disk(path: Path) -> dict[str, Config]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_disk() -> dict[str, Config]:
    """The cache file's entries (read on the first call for its path; callers do not modify them)."""
    path = _cache_path()
    data = _disk.get(path)
    if data is None:
        data = _disk[path] = _read_disk(path)
    return data


def _save_disk(key: str, cfg: Config) -> None:
    """Merge one entry into the cache file atomically (write a temp file, then rename); the file is read
    again first, so entries other processes wrote meanwhile are kept."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_disk(path), key: cfg}
        _disk[path] = data
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


def _may_tune(device: torch.device) -> bool:
    if interpreting() or device.type != "cuda" or os.environ.get("FLEXATTN_TRITON_AUTOTUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def retunes(kernel: str) -> bool:
    """Whether `kernel`'s configurations are measured again, ignoring the table and the cache file:
    FLEXATTN_TRITON_RETUNE=1 for every kind (benchmarks/tune_triton.py), or a comma list of kinds
    (e.g. "dkdv,dq,bwd": retuning the backward leaves the forward's tiles alone)."""
    value = os.environ.get("FLEXATTN_TRITON_RETUNE", "")
    return value == "1" or kernel in value.split(",")


def get_config(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    dqk: int,
    dv: int,
    causal: bool,
    launch: Optional[Callable[[Config], None]] = None,
    seqlen: int = 1 << 30,
) -> Config:
    """The configuration for `kernel` at max(sq, sk) = `seqlen`; tunes with `launch(cfg)` (which runs the
    kernel once) if none is known."""
    if interpreting():
        return default_config(kernel, dtype, dqk, dv)
    picked_key = _picked_key(kernel, device, dtype, dqk, dv, causal, seqlen)
    cfg = _picked.get(picked_key)
    if cfg is not None:
        return cfg
    key = config_key(kernel, device, dtype, dqk, dv, causal, seqlen)
    cfg = _memory.get(key)
    if cfg is not None:
        _picked[picked_key] = cfg
        return cfg
    with _lock:
        cfg = None if retunes(kernel) else (_tuned_table().get(key) or _load_disk().get(key))
        if cfg is None and launch is not None and _may_tune(device):
            cands = candidates(kernel, dtype, dqk, dv)
            long_cfg = _tuned_table().get(config_key(kernel, device, dtype, dqk, dv, causal))
            if long_cfg is not None and long_cfg not in cands:
                cands.append(long_cfg)  # a short key also tries what won for long sequences
            cfg = _tune(launch, cands, key)
            if cfg is not None:
                _save_disk(key, cfg)
        if cfg is None:  # not memoised: tune later when allowed; meanwhile the long-sequence tiles or the default
            return _tuned_table().get(config_key(kernel, device, dtype, dqk, dv, causal)) or default_config(
                kernel, dtype, dqk, dv
            )
        _memory[key] = _picked[picked_key] = cfg
        return cfg


def _picked_key(kernel: str, device: torch.device, dtype: torch.dtype, dqk: int, dv: int, causal: bool, seqlen: int):
    return (kernel, device, dtype, dqk, dv, causal, seqlen <= SHORT_SEQLEN)


def settled(
    kernel: str, device: torch.device, dtype: torch.dtype, dqk: int, dv: int, causal: bool, seqlen: int
) -> bool:
    """Whether `get_config` with these arguments returns the same configuration from now on in this process
    (the interpreter's default, or a memoised pick); not while it falls back because it may not tune yet."""
    return interpreting() or _picked_key(kernel, device, dtype, dqk, dv, causal, seqlen) in _picked


def _tune(launch: Callable[[Config], None], cands: list[Config], key: str) -> Optional[Config]:
    """The fastest of `cands` (median time of `launch`); FLEXATTN_TRITON_TUNE_LOG=1 prints every time."""
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    for cfg in cands:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=10, rep=40, return_mode="median")
        except Exception:  # noqa: BLE001  (out of shared memory / registers: not a candidate here)
            continue
        if os.environ.get("FLEXATTN_TRITON_TUNE_LOG") == "1":
            print(f"tune {key} {cfg}: {ms * 1e3:.1f} us", flush=True)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def known_configs() -> dict[str, Config]:
    """Every configuration this process knows (tuned table, disk cache, memory): for writing the table."""
    return {**_tuned_table(), **_load_disk(), **_memory}
