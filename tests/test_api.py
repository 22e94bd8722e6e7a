"""Drop-in compatibility: flash-attn 2.8's public functions with the same parameter names, order
and defaults (our extensions come after them, keyword-only), so code written for flash-attn runs
by changing only the import."""

from __future__ import annotations

import inspect

import pytest

import flexattn_ops

_COMMON = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_REQ = inspect.Parameter.empty
# flash_attn/flash_attn_interface.py of flash-attn 2.8: (name, default) in order.
FLASH_ATTN_2_8 = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), *_COMMON],
    "flash_attn_qkvpacked_func": [("qkv", _REQ), *_COMMON],
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ), *_COMMON],
    "flash_attn_varlen_func": [
        ("q", _REQ),
        ("k", _REQ),
        ("v", _REQ),
        ("cu_seqlens_q", _REQ),
        ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ),
        ("max_seqlen_k", _REQ),
        *_COMMON,
        ("block_table", None),
    ],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ), *_COMMON],
    "flash_attn_varlen_kvpacked_func": [
        ("q", _REQ),
        ("kv", _REQ),
        ("cu_seqlens_q", _REQ),
        ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ),
        ("max_seqlen_k", _REQ),
        *_COMMON,
    ],
    "flash_attn_with_kvcache": [
        ("q", _REQ),
        ("k_cache", _REQ),
        ("v_cache", _REQ),
        ("k", None),
        ("v", None),
        ("rotary_cos", None),
        ("rotary_sin", None),
        ("cache_seqlens", None),
        ("cache_batch_idx", None),
        ("cache_leftpad", None),
        ("block_table", None),
        ("softmax_scale", None),
        ("causal", False),
        ("window_size", (-1, -1)),
        ("softcap", 0.0),
        ("rotary_interleaved", True),
        ("alibi_slopes", None),
        ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("name", list(FLASH_ATTN_2_8))
def test_signature_matches_flash_attn_2_8(name):
    params = list(inspect.signature(getattr(flexattn_ops, name)).parameters.values())
    expected = FLASH_ATTN_2_8[name]
    got = [(p.name, p.default) for p in params[: len(expected)]]
    assert got == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[: len(expected)])
    extras = params[len(expected) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras), [p.name for p in extras]


def test_public_names():
    assert set(FLASH_ATTN_2_8) <= set(flexattn_ops.__all__)
