"""`media_cross_attention`: text tokens attend to the latents of their image (Flamingo's masked xattn)."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_fast.ops._dispatch import implementation
from flamingo_fast.ops.backends import resolve_backend
from flamingo_fast.ops.media_span_op import media_span_attention
from flamingo_fast.ops.media_spans import MediaSpans
from flamingo_fast.ops.reference import lse_dtype
from flamingo_fast.ops.validation import check_media_cross_attention


@torch.library.custom_op("flamingo_fast::media_cross_attention_fwd", mutates_args=())
def media_cross_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, media_index: Tensor, latents_per_media: int, only_immediate: bool,
    scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """-> (out (B, S, Hq, d), lse (B, Hq, S)); rows with media_index -1 give out 0 and lse -inf."""
    return implementation(backend, "media_cross_attention_fwd")(
        q, k, v, media_index, latents_per_media, only_immediate, scale
    )


@media_cross_attention_fwd.register_fake
def _(q, k, v, media_index, latents_per_media, only_immediate, scale, backend):
    batch, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, hq, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flamingo_fast::media_cross_attention_bwd", mutates_args=())
def media_cross_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, media_index: Tensor,
    latents_per_media: int, only_immediate: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "media_cross_attention_bwd")(
        dout, q, k, v, out, lse, media_index, latents_per_media, only_immediate, scale
    )


@media_cross_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, media_index, latents_per_media, only_immediate, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, media_index, latents_per_media, only_immediate, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, media_index)
    ctx.latents_per_media, ctx.only_immediate = latents_per_media, only_immediate
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, media_index = ctx.saved_tensors
    dq, dk, dv = media_cross_attention_bwd(
        dout, q, k, v, out, lse, media_index, ctx.latents_per_media, ctx.only_immediate, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None


media_cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def media_cross_attention(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor | MediaSpans,
                          latents_per_media: int = 64, only_immediate: bool = True,
                          backend: str | None = None) -> Tensor:
    """Flamingo's masked cross-attention, BSHD: q (B, S, Hq, d), k/v (B, T_img * latents_per_media, Hkv, d).

    media_index (B, S) int32/int64, non-decreasing per row, -1 = no image yet. A token with index m attends
    to keys [m * L, (m + 1) * L) (only_immediate) or [0, (m + 1) * L) (all previous images); a token with
    -1 gets exactly 0 output and 0 gradient. Scale d ** -0.5. Returns (B, S, Hq, d).

    media_index may also be a MediaSpans (image ranges, ragged key counts: an index is a range of one image);
    the call is then media_span_attention(q, k, v, media_index, backend=backend), and latents_per_media and
    only_immediate are not used (the spans say it all).
    """
    if isinstance(media_index, MediaSpans):
        return media_span_attention(q, k, v, media_index, backend=backend)
    check_media_cross_attention(q, k, v, media_index, latents_per_media, only_immediate)
    name = resolve_backend("media_cross_attention", q, k, v, media_index, backend=backend)
    return media_cross_attention_fwd(
        q, k, v, media_index, latents_per_media, only_immediate, float(q.shape[-1] ** -0.5), name
    )[0]
