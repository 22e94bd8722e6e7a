"""The `torch.ops.flexattn.*` operators: schemas, real implementations, fakes, autograd.

Each real implementation validates, asks `dispatch` for a backend and calls it; each fake comes
from `flexattn_ops.meta`. Compiled and exported graphs contain these ops, so their schemas are
the stable contract (see `params.ATTN_SCHEMA` for the shared attention arguments).

`fwd` and `bwd`, the ops every training step calls, are registered with `torch.library` directly and
carry their own Autograd kernels. `custom_op`'s generated one rebuilds the 19 schema arguments'
defaults on every call (`fill_defaults`, quadratic in the argument count): on the H100 host (torch
2.11) that made a forward with q.requires_grad cost 368 us of host time against 186 us without grad
(benchmarks/results/host_overhead_parts_h100.log); moving bwd off custom_op cut a fwd+bwd step through
autograd from 732 to 628 us (benchmarks/results/host_overhead_parts_h100_s4{,_after}.log).
The other ops stay `custom_op`s.

The API reaches `fwd` through `attention_fwd`: under torch.compile / export it is the op; in plain eager
code, where nothing observes ops, the same implementations and derivative run without the dispatcher
(`_EagerFwdFunction`): a training step's host time on the lent H100 host went from 859 to 715 us
(benchmarks/results/host_overhead_autograd_rounds_h100_s7.log).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.library import custom_op

from flexattn_ops import dispatch
from flexattn_ops.meta import bwd_fake, combine_fake, fwd_fake, fwd_kvcache_fake, probs_fake
from flexattn_ops.params import ATTN_SCHEMA, KVCACHE_SCHEMA, AttnArgs, KVCacheArgs
from flexattn_ops.validation import check_attention, check_backward, check_combine, check_kvcache

_TENSOR_FIELDS = [
    i
    for i, f in enumerate(AttnArgs._fields)
    if f
    in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "block_table", "alibi_slopes", "attn_bias", "sinks", "rng_state")
]
_BIAS = AttnArgs._fields.index("attn_bias")
_SINKS = AttnArgs._fields.index("sinks")


# The Autograd kernels below (fwd's, bwd's) receive the arguments as the dispatcher passes them, which
# drops trailing ones equal to their schema defaults (custom_op's kernel put them back with fill_defaults):
# the shared attention arguments must keep having no defaults.
assert "=" not in ATTN_SCHEMA, "fwd's and bwd's Autograd kernels expect every AttnArgs field to be passed"
_LIB = torch.library.Library("flexattn", "FRAGMENT")


def _below_autograd(op, keys, *args):
    """Run `op` past its Autograd kernel (which received dispatch key set `keys`): the implementation."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keys & torch._C._after_autograd_keyset, *args)


_LIB.define(
    f"fwd(Tensor q, Tensor k, Tensor v, {ATTN_SCHEMA}) -> (Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,)
)
_FWD = torch.ops.flexattn.fwd.default


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    """Attention forward: returns (out, softmax_lse). Shapes in `AttnArgs`. Call `torch.ops.flexattn.fwd`,
    not this: it is the op's implementation below autograd."""
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    return dispatch.select("fwd", q, k, v, a).fwd(q, k, v, a)


_LIB.impl("fwd", _fwd_impl, "CompositeExplicitAutograd")
torch.library.register_fake("flexattn::fwd", fwd_fake, lib=_LIB)


_LIB.define(
    f"bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, {ATTN_SCHEMA}, "
    "bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)
_BWD = torch.ops.flexattn.bwd.default


def _bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *args):
    """Attention backward from any (out, softmax_lse): returns (dq, dk, dv, dbias, dsink).

    dq, dk, dv have the layouts of q, k, v (`torch.empty_like`); dbias has attn_bias's shape when
    `bias_requires_grad`, dsink the shape of sinks when given; otherwise each is an empty (0,) tensor.
    Call `torch.ops.flexattn.bwd`, not this: it is the op's implementation below autograd.
    """
    *attn, bias_requires_grad = args
    a = AttnArgs(*attn)
    check_attention(q, k, v, a)
    return _bwd_checked(dout, q, k, v, out, lse, a, bias_requires_grad)


def _bwd_checked(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs, bias_grad: bool):
    """`_bwd_impl` past check_attention: for callers that checked (q, k, v, a) already (fwd, for its derivative)."""
    check_backward(dout, q, v, out, lse, a)
    dq, dk, dv, dbias, dsink = dispatch.select("bwd", q, k, v, a).bwd(dout, q, k, v, out, lse, a, bias_grad)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias, q.new_empty(0) if dsink is None else dsink


_NO_DOUBLE_BACKWARD = "flexattn bwd has no derivative: double backward is not supported"


class _BwdFunction(torch.autograd.Function):
    """bwd's outputs when its inputs need gradients (a backward with create_graph=True, or a direct call on
    tensors that require grad): they carry a node that raises if differentiated, as custom_op's did."""

    @staticmethod
    def forward(ctx, *args_and_keys):
        *args, keys = args_and_keys
        return _below_autograd(_BWD, keys, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)


def _bwd_autograd(keys, *args):
    """bwd's Autograd kernel: straight to the implementation unless some input needs a gradient."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return _BwdFunction.apply(*args, keys)
    return _below_autograd(_BWD, keys, *args)


_LIB.impl("bwd", _bwd_impl, "CompositeExplicitAutograd")
_LIB.impl("bwd", _bwd_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("flexattn::bwd", bwd_fake, lib=_LIB)


@custom_op("flexattn::probs", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {ATTN_SCHEMA}) -> Tensor")
def probs(q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
    """Softmax probabilities (b, hq, sq, sk) float32, entries dropped by dropout negated (testing aid)."""
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    if a.is_varlen:
        raise NotImplementedError("return_attn_probs: only dense (not varlen) inputs are supported")
    return dispatch.select("probs", q, k, v, a).probs(q, k, v, a)


probs.register_fake(probs_fake)


# fwd's derivative, shared by the three autograd.Functions below. Each takes (q, k, v, attn_bias, sinks, a):
# the AttnArgs tuple rides as one opaque input (apply's per-input checks cost ~0.5 us each on this host, for 16
# fields), and the two fields with gradients come again as inputs so autograd tracks them.
_BIAS_INPUT, _SINKS_INPUT = 3, 4


def _fwd_setup_context(ctx, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs, output) -> None:
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.attn = [None if i in _TENSOR_FIELDS else x for i, x in enumerate(a)]
    ctx.save_for_backward(q, k, v, out, lse, *(a[i] for i in _TENSOR_FIELDS))


def _fwd_backward(ctx, dout: Tensor, bwd) -> tuple:
    """Gradients of (q, k, v, attn_bias, sinks, a) from `bwd(dout, q, k, v, out, lse, a, bias_requires_grad)`."""
    q, k, v, out, lse, *tensor_args = ctx.saved_tensors
    args = list(ctx.attn)
    for i, t in zip(_TENSOR_FIELDS, tensor_args, strict=True):
        args[i] = t
    bias_requires_grad = ctx.needs_input_grad[_BIAS_INPUT]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv, dbias, dsink = bwd(dout, q, k, v, out, lse, AttnArgs(*args), bias_requires_grad)
    dsink = dsink if ctx.needs_input_grad[_SINKS_INPUT] else None
    return dq, dk, dv, dbias if bias_requires_grad else None, dsink, None


def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs, bias_grad: bool):
    return _BWD(dout, q, k, v, out, lse, *a, bias_grad)


class _FwdFunction(torch.autograd.Function):
    """fwd's derivative inside its Autograd kernel: the dispatch key set rides last among the inputs."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_bias, sinks, a: AttnArgs, keys):
        output = _below_autograd(_FWD, keys, q, k, v, *a)
        _fwd_setup_context(ctx, q, k, v, a, output)
        return output

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        return (*_fwd_backward(ctx, dout, _bwd_op), None)


def _fwd_autograd(keys, q: Tensor, k: Tensor, v: Tensor, *args):
    """fwd's Autograd kernel: records the backward only when some input needs a gradient. Forward-mode
    AD (dual tensors) has no formula here and would silently get a zero tangent: it raises instead."""
    if forward_ad._current_level >= 0 and any(
        isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v, *args)
    ):
        raise NotImplementedError("flexattn attention has no forward-mode derivative (jvp); use reverse mode")
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, *args)):
        a = AttnArgs(*args)
        return _FwdFunction.apply(q, k, v, a.attn_bias, a.sinks, a, keys)
    return _below_autograd(_FWD, keys, q, k, v, *args)


_LIB.impl("fwd", _fwd_autograd, "Autograd", with_keyset=True)


class _TransformFwdFunction(torch.autograd.Function):
    """fwd's derivative for torch.func's grad and vjp. functorch sees an autograd.Function only when it is applied
    from Python: applied inside the op's Autograd kernel (_FwdFunction) it fails ("could not find kernel for
    HigherOrderOperator custom_function_call"). It needs forward and setup_context apart, and forward calls the
    op itself, which then runs below autograd. No vmap rule: jacrev / jacfwd / vmap are not supported."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, attn_bias, sinks, a: AttnArgs):
        with torch.no_grad():  # under grad, forward's inputs can still require grad: skip fwd's own derivative
            return _FWD(q, k, v, *a)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, _, _, a = inputs
        _fwd_setup_context(ctx, q, k, v, a, output)

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        return _fwd_backward(ctx, dout, _transform_bwd)


class _TransformBwdFunction(torch.autograd.Function):
    """bwd inside _TransformFwdFunction's backward, applied from Python for the same reason: torch.func.grad
    differentiates with create_graph, and a nested grad of grad must raise, not see constants."""

    @staticmethod
    def forward(*args):
        with torch.no_grad():
            return _BWD(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)


def _transform_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs, bias_grad: bool
):
    return _TransformBwdFunction.apply(dout, q, k, v, out, lse, *a, bias_grad)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _unobserved(*tensors: Optional[Tensor]) -> bool:
    """Whether nothing but the ops' own kernels could see a call here, so skipping the dispatcher changes
    nothing: not compiling (Dynamo, compiled autograd), no torch.func transform, no dispatch or torch-function
    mode (FakeTensorMode, FlopCounterMode, export's tracing), no profiler (its trace names the ops), no jit
    tracer, no forward-mode AD level (fwd's Autograd kernel raises for dual inputs), and plain tensors only: no
    subclass, no legacy vmap batched tensor (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)),
    whose per-item fallback is the dispatcher's. Not detectable, so not honoured: an ExecutionTraceObserver
    (its eager traces lack flexattn::fwd / bwd) and kernels or autocast rules registered for the ops."""
    return (
        not torch.compiler.is_compiling()  # first: Dynamo cannot trace the torch._C queries below
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._autograd._profiler_enabled()
        and torch._C._get_tracing_state() is None
        and forward_ad._current_level < 0
        and all(t is None or (type(t) in _PLAIN_TENSORS and not _is_legacy_batched(t)) for t in tensors)
    )


def _eager_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs, bias_grad: bool):
    """bwd from _EagerFwdFunction's backward: the implementation directly (fwd checked q, k, v, a), unless the
    gradients themselves are differentiated (create_graph: the op's Autograd kernel makes that raise), compiled
    autograd traces the backward (its graph must hold the op), or someone is watching (_unobserved)."""
    if torch.is_grad_enabled() or not _unobserved(dout):
        return _bwd_op(dout, q, k, v, out, lse, a, bias_grad)
    return _bwd_checked(dout, q, k, v, out, lse, a, bias_grad)


class _EagerFwdFunction(torch.autograd.Function):
    """fwd's derivative for eager calls on plain tensors, applied from Python straight to the implementations.
    Going through the dispatcher costs Python kernels on both sides of a redispatch: on the H100 host (torch
    2.11) the fwd op took 272 us of host time with q requiring grad against 100 us for its Triton launch, and
    the bwd op 333 us against 180 us for its implementation (benchmarks/results/host_overhead_parts_h100_s7.log),
    which left a seqlen-512 training step host-bound."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_bias, sinks, a: AttnArgs):
        output = _fwd_impl(q, k, v, *a)
        _fwd_setup_context(ctx, q, k, v, a, output)
        return output

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        return _fwd_backward(ctx, dout, _eager_bwd)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor]:
    """`torch.ops.flexattn.fwd`, which compiled and exported graphs record. Where no graph is being traced, the
    same implementation and derivative are applied from Python: under torch.func transforms so that they see
    the derivative, and for unobserved eager calls to save the dispatcher's host time (_EagerFwdFunction)."""
    if torch.compiler.is_compiling():
        return _FWD(q, k, v, *a)
    if torch._C._are_functorch_transforms_active():
        return _TransformFwdFunction.apply(q, k, v, a.attn_bias, a.sinks, a)
    tensors = (q, k, v, *(a[i] for i in _TENSOR_FIELDS))
    if not _unobserved(*tensors):
        return _FWD(q, k, v, *a)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return _fwd_impl(q, k, v, *a)  # nothing to record (entering no_grad costs ~1.5 us of host time)
    differentiable = (q, k, v, a.attn_bias, a.sinks)
    if not torch.is_inference_mode_enabled() and any(  # inference mode turns the op's Autograd kernel off
        t is not None and t.requires_grad for t in differentiable
    ):
        return _EagerFwdFunction.apply(q, k, v, a.attn_bias, a.sinks, a)
    with torch.no_grad():  # as below the op's Autograd kernel: no graph for what fwd has no gradient of (alibi)
        return _fwd_impl(q, k, v, *a)


@custom_op(
    "flexattn::fwd_kvcache",
    mutates_args=("k_cache", "v_cache"),
    schema=f"(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, {KVCACHE_SCHEMA}) -> (Tensor, Tensor)",
)
def fwd_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, *args) -> tuple[Tensor, Tensor]:
    """Decode/append attention against a (paged) KV cache: appends k/v to the caches in place and
    returns (out (b, sq, hq, dv), softmax_lse (b, hq, sq) float32). Shapes in `KVCacheArgs`. No autograd."""
    c = KVCacheArgs(*args)
    check_kvcache(q, k_cache, v_cache, c)
    return dispatch.select("fwd_kvcache", q, k_cache, v_cache, c.attn_args()).fwd_kvcache(q, k_cache, v_cache, c)


@custom_op("flexattn::combine", mutates_args=(), schema="(Tensor out_partial, Tensor lse_partial) -> (Tensor, Tensor)")
def combine(out_partial: Tensor, lse_partial: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial attention results over disjoint key sets (split-KV, ring attention), in float32.

    out_partial (num_splits, ..., dv), lse_partial (num_splits, ...) float32 -> out (..., dv) and
    lse (...) float32. Splits with lse -inf count for nothing; a row with no key anywhere gets
    out 0, lse -inf.
    """
    check_combine(out_partial, lse_partial)
    # dispatch takes (q, k, v, AttnArgs); combine has no attention arguments.
    backend = dispatch.select("combine", out_partial, lse_partial, lse_partial, AttnArgs())
    return backend.combine(out_partial, lse_partial)


fwd_kvcache.register_fake(fwd_kvcache_fake)
combine.register_fake(combine_fake)


def _outputs_non_differentiable(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


# fwd_kvcache has no backward (as flash-attn's): its outputs are non-differentiable, so graphs
# traced with requires_grad inputs (opcheck, a decode step compiled in training mode) stay valid.
# register_autograd refuses mutating ops, so the hook that custom_op's own Autograd kernel calls
# is set directly (an attribute of CustomOpDef since torch 2.4; overriding the Autograd kernel
# instead fails on torch 2.11, which refuses a second Python kernel for the same key).
fwd_kvcache._setup_context_fn = _outputs_non_differentiable


def _combine_setup_context(ctx, inputs, output) -> None:
    out_partial, lse_partial = inputs
    out, lse = output
    ctx.save_for_backward(out_partial, lse_partial, out, lse)


def _combine_backward(ctx, dout: Tensor, dlse: Tensor):
    """With w_s = exp(lse_s - lse): d out_s = w_s dout, d lse_s = w_s (dout . (out_s - out) + dlse)."""
    out_partial, lse_partial, out, lse = ctx.saved_tensors
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse)
    w = torch.exp(lse_partial.float() - lse_safe)
    live = (w > 0)[..., None]
    d_out = torch.where(live, w[..., None] * dout.float(), 0.0) if dout is not None else None
    d_lse = torch.zeros_like(w)
    if dout is not None:
        diff = torch.where(live, out_partial.float() - out, 0.0)
        d_lse = d_lse + w * (dout.float() * diff).sum(-1)
    if dlse is not None:
        d_lse = d_lse + w * dlse
    return (None if d_out is None else d_out.to(out_partial.dtype)), d_lse


combine.register_autograd(_combine_backward, setup_context=_combine_setup_context)
