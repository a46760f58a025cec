"""`perceiver_attention`: unmasked attention of the resampler's latents over media + latents, as custom ops."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_fast.ops._dispatch import implementation
from flamingo_fast.ops.backends import resolve_backend
from flamingo_fast.ops.reference import lse_dtype
from flamingo_fast.ops.validation import check_perceiver_attention


@torch.library.custom_op("flamingo_fast::perceiver_attention_fwd", mutates_args=())
def perceiver_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """-> (out (B, Sq, H, d), lse (B, H, Sq); lse is float32, or float64 for float64 inputs)."""
    return implementation(backend, "perceiver_attention_fwd")(q, k, v, scale)


@perceiver_attention_fwd.register_fake
def _(q, k, v, scale, backend):
    batch, sq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flamingo_fast::perceiver_attention_bwd", mutates_args=())
def perceiver_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "perceiver_attention_bwd")(dout, q, k, v, out, lse, scale)


@perceiver_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = perceiver_attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


perceiver_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def perceiver_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                        backend: str | None = None) -> Tensor:
    """Unmasked attention, BSHD: q (B, n_latents, H, d), k/v (B, Sk, H, d) (same heads). Scale d ** -0.5.

    Returns (B, n_latents, H, d), differentiable w.r.t. q, k and v.
    """
    check_perceiver_attention(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend("perceiver_attention", q, k, v, backend=backend)
    return perceiver_attention_fwd(q, k, v, float(scale), name)[0]
