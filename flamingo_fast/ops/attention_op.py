"""`attention`: causal (bottom-right aligned) or full self/cross attention with GQA, as custom ops."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_fast.ops._dispatch import implementation
from flamingo_fast.ops.backends import resolve_backend
from flamingo_fast.ops.reference import lse_dtype
from flamingo_fast.ops.validation import check_attention


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


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              backend: str | None = None) -> Tensor:
    """Softmax attention, BSHD layout: q (B, Sq, Hq, d), k/v (B, Sk, Hkv, d) with Hq % Hkv == 0.

    causal=True masks bottom-right aligned (query i sees keys j <= i + Sk - Sq, as with a KV cache).
    scale defaults to d ** -0.5. Returns (B, Sq, Hq, d), differentiable w.r.t. q, k and v.
    """
    check_attention(q, k, v, causal, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend("attention", q, k, v, backend=backend)
    return attention_fwd(q, k, v, causal, float(scale), name)[0]
