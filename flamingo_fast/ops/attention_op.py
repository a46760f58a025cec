"""`attention`: causal (bottom-right aligned) or full self/cross attention with GQA, as custom ops; with
`document_ids`, causal attention within each document of a packed row (its own pair of custom ops)."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_fast.ops._dispatch import implementation
from flamingo_fast.ops.backends import resolve_backend
from flamingo_fast.ops.reference import lse_dtype
from flamingo_fast.ops.validation import check_attention, check_document_ids


@torch.library.custom_op("flamingo_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """-> (out (B, Sq, Hq, d), lse (B, Hq, Sq); lse is float32, or float64 for float64 inputs)."""
    return implementation(backend, "attention_fwd")(q, k, v, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    batch, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, hq, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flamingo_fast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "attention_bwd")(dout, q, k, v, out, lse, causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flamingo_fast::document_attention_fwd", mutates_args=())
def document_attention_fwd(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor, scale: float,
                           backend: str) -> tuple[Tensor, Tensor]:
    """Causal attention within each document of a packed row -> (out (B, S, Hq, d), lse (B, Hq, S))."""
    return implementation(backend, "document_attention_fwd")(q, k, v, document_ids, scale)


@document_attention_fwd.register_fake
def _(q, k, v, document_ids, scale, backend):
    batch, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, hq, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flamingo_fast::document_attention_bwd", mutates_args=())
def document_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           document_ids: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "document_attention_bwd")(dout, q, k, v, out, lse, document_ids, scale)


@document_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, document_ids, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _document_setup_context(ctx, inputs, output):
    q, k, v, document_ids, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _document_backward(ctx, dout, _dlse):
    q, k, v, out, lse, document_ids = ctx.saved_tensors
    dq, dk, dv = document_attention_bwd(dout, q, k, v, out, lse, document_ids, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


document_attention_fwd.register_autograd(_document_backward, setup_context=_document_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              backend: str | None = None, document_ids: Tensor | None = None) -> Tensor:
    """Softmax attention, BSHD layout: q (B, Sq, Hq, d), k/v (B, Sk, Hkv, d) with Hq % Hkv == 0.

    causal=True masks bottom-right aligned (query i sees keys j <= i + Sk - Sq, as with a KV cache).
    scale defaults to d ** -0.5. Returns (B, Sq, Hq, d), differentiable w.r.t. q, k and v.

    document_ids (B, S) integer, non-decreasing along each row (packed rows, Sq == Sk, causal only): a token
    attends only to earlier tokens of its own document, a run of equal ids. The work skips every
    cross-document pair (ops/document_torch.py); the Hopper kernel has no document mask yet, so the automatic
    choice is the torch backend for it.
    """
    check_attention(q, k, v, causal, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if document_ids is not None:
        check_document_ids(q, k, causal, document_ids)
        name = resolve_backend("document_attention", q, k, v, backend=backend)
        return document_attention_fwd(q, k, v, document_ids, float(scale), name)[0]
    name = resolve_backend("attention", q, k, v, backend=backend)
    return attention_fwd(q, k, v, causal, float(scale), name)[0]
