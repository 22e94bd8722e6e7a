"""torch 2 integration: torch.compile (fullgraph, dynamic, no recompiles), torch.export with a
dynamic sequence dimension, save/load in a fresh process, and AOTInductor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import expecttest
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from flexattn_ops.demo import Block
from flexattn_ops.testing import assert_rel_close


def _export(block: Block, x: torch.Tensor) -> torch.export.ExportedProgram:
    seq = torch.export.Dim("seq", min=2, max=4096)
    return torch.export.export(block, (x,), dynamic_shapes={"x": {1: seq}})


def test_compile_fullgraph_matches_eager_with_grads(inductor_cache):
    block = Block()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 29, 64, requires_grad=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), [x, *block.parameters()])
    out_e = block(x)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, *block.parameters()])
    assert_rel_close("out", out_c, out_e.double())
    names = ["x"] + [n for n, _ in block.named_parameters()]
    for name, gc, ge in zip(names, grads_c, grads_e, strict=True):
        assert_rel_close(f"d{name}", gc, ge.double(), 1e-5, atol=1e-5)
    assert block.sinks.requires_grad and grads_c[names.index("sinks")].abs().sum() > 0


def test_compiled_autograd_records_bwd_after_an_eager_forward(inductor_cache):
    """An eager forward (flash_attn_func's path without the dispatcher) followed by a backward under compiled
    autograd: one graph, holding the flexattn.bwd op, with eager's gradients."""
    import torch._dynamo.compiled_autograd as compiled_autograd

    from flexattn_ops import flash_attn_func

    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        out.backward(dout)
    assert len(graphs) == 1
    assert any(str(n.target) == "flexattn.bwd.default" for n in graphs[0].graph.nodes)
    for got, w in zip((q.grad, k.grad, v.grad), want, strict=True):
        assert torch.equal(got, w)


def test_dynamic_seqlen_no_recompile_no_graph_break(inductor_cache):
    counters.clear()
    block = Block()
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=True)
    frames = []
    for seqlen in (16, 23, 31, 64):
        x = torch.randn(2, seqlen, 64, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert_rel_close("out", out, block(x).double())
        frames.append(backend.frame_count)
    assert frames[0] >= 1 and len(set(frames)) == 1, f"recompiled as the sequence length changed: {frames}"
    assert not counters["graph_break"], dict(counters["graph_break"])


class ExportedGraph(expecttest.TestCase):
    def test_exported_graph_op_list(self):
        exported = _export(Block(), torch.randn(2, 17, 64))
        targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
        self.assertExpectedInline(
            "\n".join(targets),
            """\
aten.sym_size.int
aten.layer_norm.default
aten.linear.default
aten.split_with_sizes.default
<built-in function getitem>
<built-in function getitem>
<built-in function getitem>
aten.view.default
aten.view.default
aten.view.default
flexattn.fwd.default
<built-in function getitem>
<built-in function getitem>
aten.flatten.using_ints
aten.linear.default
aten.add.Tensor""",
        )


def test_export_save_load_in_fresh_process(tmp_path):
    block = Block()
    exported = _export(block, torch.randn(2, 17, 64))
    assert any(n.target is torch.ops.flexattn.fwd.default for n in exported.graph.nodes)
    x = torch.randn(2, 45, 64)  # another sequence length than the one exported with
    torch.export.save(exported, tmp_path / "block.pt2")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, flexattn_ops
        m = torch.export.load({str(tmp_path / "block.pt2")!r}).module()
        torch.save(m(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    y = torch.load(tmp_path / "y.pt")
    assert torch.equal(y, block(x))


@pytest.mark.slow
def test_aoti_compile_and_package_cpu(inductor_cache):
    block = Block()
    exported = _export(block, torch.randn(2, 17, 64))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(inductor_cache / "block_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for seqlen in (9, 61):
        x = torch.randn(2, seqlen, 64)
        assert_rel_close("aoti", runner(x), block(x).double())


def test_compiled_dropout_is_reproducible_and_backward_replays_the_mask(inductor_cache):
    """The seed/offset are a tensor argument drawn in the graph: the same generator state gives
    the same mask, and backward's gradients are those of the forward's mask."""
    from flexattn_ops import flash_attn_func
    from flexattn_ops.testing import attention_ref
    from tests.helpers import rand_qkv

    q, k, v = rand_qkv(2, 19, 23, 4, 2, 2, 16, 16, torch.float32, requires_grad=True)

    def attend(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.25, causal=True, return_attn_probs=True)

    compiled = torch.compile(attend, fullgraph=True)
    torch.manual_seed(7)
    out1, _, probs1 = compiled(q, k, v)
    torch.manual_seed(7)
    out2, _, probs2 = compiled(q, k, v)
    assert torch.equal(out1, out2) and torch.equal(probs1, probs2)
    keep = probs1 >= 0
    ref, _ = attention_ref(q, k, v, causal=True, dropout_p=0.25, dropout_keep=keep)
    assert_rel_close("out", out1, ref)
    dout = torch.randn_like(out1)
    grads = torch.autograd.grad(out1, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_rel_close(f"d{name}", g, rg, 1e-5, atol=1e-5)
