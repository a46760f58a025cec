"""The `torch` backend: exact attention in PyTorch for any device and dtype.

- attention / perceiver_attention: PyTorch's fused flash kernel on CPU (cpu_flash.py); elsewhere, or
  when USE_CPU_FLASH is False, blockwise matmul + softmax in query chunks (blockwise.py).
- document_attention (packed rows): each document gathered into its own row, one dense causal call
  (document_torch.py), so no cross-document pair is computed.
- media_cross_attention: query blocks that each visit only their own image's keys (media_torch.py).
- media_span_attention: each run of tokens with one image range against its images' valid keys, gathered,
  batched into dense unmasked calls (media_span_torch.py).
All return (out, lse) forward and (dq, dk, dv) backward, contiguous, as the custom ops expect.
"""

from __future__ import annotations

import torch

from flamingo_fast.ops import blockwise, cpu_flash, document_torch, media_span_torch
from flamingo_fast.ops.media_torch import media_cross_attention_bwd, media_cross_attention_fwd

__all__ = [
    "attention_bwd",
    "attention_fwd",
    "document_attention_bwd",
    "document_attention_fwd",
    "media_cross_attention_bwd",
    "media_cross_attention_fwd",
    "media_span_attention_bwd",
    "media_span_attention_fwd",
    "perceiver_attention_bwd",
    "perceiver_attention_fwd",
]

# Tests switch this off to exercise the blockwise path on CPU too.
USE_CPU_FLASH = True


def _dense(q):
    """The module (same forward/backward signatures) that runs full attention for these tensors."""
    return cpu_flash if USE_CPU_FLASH and cpu_flash.supports(q) else blockwise


def _no_queries(q) -> bool:
    # Nothing attends: answered here, because ATen's CPU flash kernel dies with SIGFPE on zero queries.
    return q.shape[0] == 0 or q.shape[1] == 0


def attention_fwd(q, k, v, causal: bool, scale: float):
    if _no_queries(q):
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=blockwise.lse_dtype(q.dtype),
                         device=q.device)
        return q.new_zeros(q.shape), lse
    return _dense(q).forward(q, k, v, causal, scale)


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    if _no_queries(q):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return _dense(q).backward(dout, q, k, v, out, lse, causal, scale)


def document_attention_fwd(q, k, v, document_ids, scale: float):
    if _no_queries(q):
        return attention_fwd(q, k, v, True, scale)
    return document_torch.forward(_dense(q), q, k, v, document_ids, scale)


def document_attention_bwd(dout, q, k, v, out, lse, document_ids, scale: float):
    if _no_queries(q):
        return attention_bwd(dout, q, k, v, out, lse, True, scale)
    return document_torch.backward(_dense(q), dout, q, k, v, out, lse, document_ids, scale)


def media_span_attention_fwd(q, k, v, start, end, key_offset, key_count, scale: float):
    return media_span_torch.forward(_dense(q), q, k, v, start, end, key_offset, key_count, scale)


def media_span_attention_bwd(dout, q, k, v, out, lse, start, end, key_offset, key_count, scale: float):
    return media_span_torch.backward(_dense(q), dout, q, k, v, out, lse, start, end, key_offset, key_count, scale)


def perceiver_attention_fwd(q, k, v, scale: float):
    return attention_fwd(q, k, v, False, scale)


def perceiver_attention_bwd(dout, q, k, v, out, lse, scale: float):
    return attention_bwd(dout, q, k, v, out, lse, False, scale)
