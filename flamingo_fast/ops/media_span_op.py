"""`media_span_attention`: text tokens attend to the valid keys of a range of images (Llama 3.2 Vision's
cross-attention; Flamingo's media_index is the special case of one image per range, see media_spans.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_fast.ops._dispatch import implementation
from flamingo_fast.ops.backends import resolve_backend
from flamingo_fast.ops.media_spans import MediaSpans
from flamingo_fast.ops.reference import lse_dtype
from flamingo_fast.ops.validation import check_media_span_attention


@torch.library.custom_op("flamingo_fast::media_span_attention_fwd", mutates_args=())
def media_span_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, start: Tensor, end: Tensor, key_offset: Tensor, key_count: Tensor,
    scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """-> (out (B, S, Hq, d), lse (B, Hq, S)); tokens with start == end (or no valid key) give out 0, lse -inf."""
    return implementation(backend, "media_span_attention_fwd")(q, k, v, start, end, key_offset, key_count, scale)


@media_span_attention_fwd.register_fake
def _(q, k, v, start, end, key_offset, key_count, scale, backend):
    batch, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, hq, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flamingo_fast::media_span_attention_bwd", mutates_args=())
def media_span_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, start: Tensor, end: Tensor,
    key_offset: Tensor, key_count: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "media_span_attention_bwd")(
        dout, q, k, v, out, lse, start, end, key_offset, key_count, scale
    )


@media_span_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, start, end, key_offset, key_count, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, start, end, key_offset, key_count, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, start, end, key_offset, key_count)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *spans = ctx.saved_tensors
    dq, dk, dv = media_span_attention_bwd(dout, q, k, v, out, lse, *spans, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


media_span_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def media_span_attention(q: Tensor, k: Tensor, v: Tensor, spans: MediaSpans, scale: float | None = None,
                         backend: str | None = None) -> Tensor:
    """Cross-attention of text tokens to image ranges, BSHD: q (B, S, Hq, d), k/v (B, Sk, Hkv, d), Hq % Hkv == 0.

    Token (b, t) attends to the valid keys of images spans.start[b, t] .. spans.end[b, t] - 1 of row b (image j's
    keys: k[b, key_offset[b, j] : key_offset[b, j] + key_count[b, j]]); a token that sees no key gets exactly 0
    output and 0 gradient, and keys of no image get 0 gradient. scale defaults to d ** -0.5. The Hopper kernels
    do not take ranges yet, so the automatic backend is torch. Returns (B, S, Hq, d).
    """
    check_media_span_attention(q, k, v, spans, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend("media_span_attention", q, k, v, backend=backend)
    return media_span_attention_fwd(q, k, v, *spans.tensors(), float(scale), name)[0]
