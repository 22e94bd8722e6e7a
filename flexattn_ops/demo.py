"""The main job: a small transformer block using flexattn_ops, run eager, compiled, exported,
saved/loaded and AOT-compiled, printing which backend ran.

    python -m flexattn_ops.demo [--no-aoti]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import Tensor, nn

from flexattn_ops import explain_backend, flash_attn_func


class Block(nn.Module):
    """Pre-norm attention block with GQA (hq=4, hk=hv=2), causal, and learnable sinks.

    x (batch, seqlen, dim) -> (batch, seqlen, dim).
    """

    def __init__(self, dim: int = 64, heads_q: int = 4, heads_kv: int = 2) -> None:
        super().__init__()
        self.hq, self.hk, self.hd = heads_q, heads_kv, dim // heads_q
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads_q + 2 * heads_kv) * self.hd)
        self.proj = nn.Linear(heads_q * self.hd, dim)
        self.sinks = nn.Parameter(0.1 * torch.randn(heads_q))

    def attention_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split([self.hq * self.hd, self.hk * self.hd, self.hk * self.hd], dim=-1)
        return q.view(b, t, self.hq, self.hd), k.view(b, t, self.hk, self.hd), v.view(b, t, self.hk, self.hd)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.attention_inputs(x)
        out = flash_attn_func(q, k, v, causal=True, sinks=self.sinks)
        return x + self.proj(out.flatten(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-aoti", action="store_true", help="skip AOTInductor (about 20 s on 2 CPU cores)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    block = Block().to(device)
    x = torch.randn(2, 37, 64, device=device)

    choice = explain_backend(*block.attention_inputs(x), causal=True, sinks=block.sinks)
    print(f"device: {device}; FLEXATTN_BACKEND={choice.requested}; backend that runs: {choice.selected}")
    for name, reason in choice.reasons.items():
        if name != choice.selected:
            print(f"  {name}: {reason or 'available'}")

    eager = block(x)
    t0 = time.time()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    err = (compiled(x) - eager).abs().max().item()
    print(f"torch.compile(fullgraph=True, dynamic=True): max |compiled - eager| = {err:.2e} ({time.time() - t0:.1f}s)")

    seq = torch.export.Dim("seq", min=2, max=4096)
    exported = torch.export.export(block, (x,), dynamic_shapes={"x": {1: seq}})
    ops = sorted(
        {str(n.target) for n in exported.graph.nodes if n.op == "call_function" and "flexattn" in str(n.target)}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "block.pt2")
        torch.export.save(exported, path)
        loaded = torch.export.load(path).module()
        x2 = torch.randn(2, 53, 64, device=device)
        err = (loaded(x2) - block(x2)).abs().max().item()
        print(f"torch.export (dynamic seqlen) -> save -> load: graph calls {ops}; max error at seqlen 53 = {err:.2e}")
        if not args.no_aoti:
            t0 = time.time()
            package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tmp, "aoti.pt2"))
            runner = torch._inductor.aoti_load_package(package)
            err = (runner(x2) - block(x2)).abs().max().item()
            print(f"AOTInductor package: max error at seqlen 53 = {err:.2e} ({time.time() - t0:.1f}s)")
    print(f"done: attention ran on the {choice.selected} backend")


if __name__ == "__main__":
    main()
