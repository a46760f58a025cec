"""`perceiver_kv_input`: the Perceiver resampler's key/value input in one fused pass, as a custom op.

    kv = concat(LayerNorm_media(media + time_emb[row // tokens_per_frame]), LayerNorm_latents(latents), dim=1)

media (N, m, D), latents (N, l, D) (may be an expanded view of one (l, D) parameter), time_emb (frames, D) or
None. Backends: "cuda" (flamingo_fast._C.perceiver_kv_input_fwd/bwd: one read of each input, one write of kv)
and "torch" (plain PyTorch ops, any device and dtype). The latents' LayerNorm output kv[:, m:] is also the query
input of the attention, so callers take it from kv instead of normalising twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flamingo_fast import native

_C = native.load()


BACKENDS = ("cuda", "torch", "reference")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_unsupported_reason(media: Tensor, latents: Tensor, time_emb: Tensor | None, *params: Tensor) -> str | None:
    """None when the fused kernel can run these inputs; else why not (the "torch" backend runs anything)."""
    if _C is None or not hasattr(_C, "perceiver_kv_input_fwd"):
        return "flamingo_fast._C has no perceiver_kv_input kernels"
    if media.device.type != "cuda":
        return f"media is on {media.device}, not on a CUDA device"
    if media.dtype not in _KERNEL_DTYPES:
        return f"the kernel supports float32/bfloat16/float16, not {media.dtype}"
    others = [latents, *params] + ([time_emb] if time_emb is not None else [])
    if any(t.dtype != media.dtype or t.device != media.device for t in others):
        return "media, latents, time_emb and the LayerNorm parameters must share dtype and device"
    dim = media.shape[-1]
    if dim % 8 != 0 or dim > 2048:
        return f"the kernel needs dim to be a multiple of 8 and at most 2048, got {dim}"
    return None


def _rows_contiguous(t: Tensor) -> Tensor:
    """Rows of the kernel's inputs must be contiguous (the batch stride may be 0: shared latents)."""
    if t.stride(-1) == 1 and (t.shape[1] <= 1 or t.stride(1) == t.shape[-1]) and t.data_ptr() % 16 == 0:
        return t
    return t.contiguous()


def _torch_forward(media, latents, time_emb, tokens_per_frame, mw, mb, lw, lb, eps):
    x = media
    if time_emb is not None:
        frames = torch.arange(media.shape[1], device=media.device) // tokens_per_frame
        x = x + time_emb[frames]
    dim = media.shape[-1]
    return torch.cat([F.layer_norm(x, (dim,), mw, mb, eps), F.layer_norm(latents, (dim,), lw, lb, eps)], dim=1)


@torch.library.custom_op("flamingo_fast::perceiver_kv_input_fwd", mutates_args=())
def perceiver_kv_input_fwd(media: Tensor, latents: Tensor, time_emb: Tensor | None, tokens_per_frame: int,
                           media_weight: Tensor, media_bias: Tensor, latents_weight: Tensor, latents_bias: Tensor,
                           eps: float, backend: str) -> Tensor:
    args = (media, latents, time_emb, tokens_per_frame, media_weight, media_bias, latents_weight, latents_bias, eps)
    if backend == "cuda":
        return _C.perceiver_kv_input_fwd(_rows_contiguous(media), _rows_contiguous(latents),
                                         None if time_emb is None else time_emb.contiguous(), tokens_per_frame,
                                         *(p.contiguous() for p in args[4:8]), eps)
    return _torch_forward(*args).contiguous()


@perceiver_kv_input_fwd.register_fake
def _(media, latents, time_emb, tokens_per_frame, mw, mb, lw, lb, eps, backend):
    n, m, d = media.shape
    return media.new_empty((n, m + latents.shape[1], d))


@torch.library.custom_op("flamingo_fast::perceiver_kv_input_bwd", mutates_args=())
def perceiver_kv_input_bwd(d_kv: Tensor, media: Tensor, latents: Tensor, time_emb: Tensor | None,
                           tokens_per_frame: int, media_weight: Tensor, media_bias: Tensor, latents_weight: Tensor,
                           latents_bias: Tensor, eps: float, backend: str) -> list[Tensor]:
    """-> [d_media, d_latents, d_media_weight, d_media_bias, d_latents_weight, d_latents_bias]."""
    params = (media_weight, media_bias, latents_weight, latents_bias)
    if backend == "cuda":
        return list(_C.perceiver_kv_input_bwd(
            d_kv.contiguous(), _rows_contiguous(media), _rows_contiguous(latents),
            None if time_emb is None else time_emb.contiguous(), tokens_per_frame, *(p.contiguous() for p in params),
            eps))
    # Custom-op bodies run below autograd, so the LayerNorm backward is called directly.
    dim = media.shape[-1]
    x = media
    if time_emb is not None:
        x = x + time_emb[torch.arange(media.shape[1], device=media.device) // tokens_per_frame]
    m = media.shape[1]
    grads = []
    for inp, dy, w, b in ((x, d_kv[:, :m], media_weight, media_bias), (latents, d_kv[:, m:], latents_weight,
                                                                        latents_bias)):
        _, mean, rstd = torch.native_layer_norm(inp, (dim,), w, b, eps)
        grads.append(torch.ops.aten.native_layer_norm_backward(dy.contiguous(), inp, (dim,), mean, rstd, w, b,
                                                               [True, True, True]))
    (d_media, d_mw, d_mb), (d_latents, d_lw, d_lb) = grads
    return [t.contiguous() for t in (d_media, d_latents, d_mw, d_mb, d_lw, d_lb)]


@perceiver_kv_input_bwd.register_fake
def _(d_kv, media, latents, time_emb, tokens_per_frame, mw, mb, lw, lb, eps, backend):
    return [media.new_empty(media.shape), latents.new_empty(latents.shape)] + [p.new_empty(p.shape) for p in
                                                                              (mw, mb, lw, lb)]


def _setup_context(ctx, inputs, output):
    media, latents, time_emb, tokens_per_frame, mw, mb, lw, lb, eps, backend = inputs
    ctx.save_for_backward(media, latents, time_emb, mw, mb, lw, lb)
    ctx.tokens_per_frame, ctx.eps, ctx.backend = tokens_per_frame, eps, backend
    ctx.has_time_emb = time_emb is not None


def _backward(ctx, d_kv):
    media, latents, time_emb, mw, mb, lw, lb = ctx.saved_tensors
    d_media, d_latents, d_mw, d_mb, d_lw, d_lb = perceiver_kv_input_bwd(
        d_kv, media, latents, time_emb, ctx.tokens_per_frame, mw, mb, lw, lb, ctx.eps, ctx.backend)
    d_time = None
    if ctx.has_time_emb:
        # d(media + time_emb[row // tokens_per_frame]) = d_media; sum the rows of each frame.
        n, m, d = d_media.shape
        frames = torch.arange(m, device=d_media.device) // ctx.tokens_per_frame
        acc = torch.promote_types(time_emb.dtype, torch.float32)  # at least fp32 for the row sums
        d_time = torch.zeros(time_emb.shape, dtype=acc, device=time_emb.device)
        d_time = d_time.index_add_(0, frames, d_media.to(acc).sum(0)).to(time_emb.dtype)
    return d_media, d_latents, d_time, None, d_mw, d_mb, d_lw, d_lb, None, None


perceiver_kv_input_fwd.register_autograd(_backward, setup_context=_setup_context)


def perceiver_kv_input(media: Tensor, latents: Tensor, media_norm: torch.nn.LayerNorm,
                       latents_norm: torch.nn.LayerNorm, time_emb: Tensor | None = None, tokens_per_frame: int = 1,
                       backend: str | None = None) -> Tensor:
    """concat(media_norm(media + time_emb[row // tokens_per_frame]), latents_norm(latents)) -> (N, m + l, D).

    media (N, m, D); latents (N, l, D), e.g. `latents_param.expand(N, -1, -1)`; time_emb (frames, D) with
    frames * tokens_per_frame >= m. backend None picks "cuda" where the fused kernel runs these inputs, else
    "torch"; "reference" is the same plain PyTorch math (exact in float64). Differentiable w.r.t. media,
    latents, time_emb and both LayerNorms' weight and bias.
    """
    if media.dim() != 3 or latents.dim() != 3:
        raise ValueError(f"media and latents must be (batch, rows, dim), got {tuple(media.shape)} and "
                         f"{tuple(latents.shape)}")
    if latents.shape[0] != media.shape[0] or latents.shape[2] != media.shape[2]:
        raise ValueError(f"latents {tuple(latents.shape)} must match media {tuple(media.shape)} in batch and dim")
    if time_emb is not None:
        if time_emb.dim() != 2 or time_emb.shape[1] != media.shape[2]:
            raise ValueError(f"time_emb must be (frames, {media.shape[2]}), got {tuple(time_emb.shape)}")
        if tokens_per_frame <= 0 or time_emb.shape[0] * tokens_per_frame < media.shape[1]:
            raise ValueError(f"time_emb has {time_emb.shape[0]} frames of {tokens_per_frame} tokens, but media has "
                             f"{media.shape[1]} rows")
    if media_norm.eps != latents_norm.eps:
        raise ValueError("media_norm and latents_norm must share eps")
    if media_norm.weight is None or latents_norm.weight is None or media_norm.bias is None or latents_norm.bias is None:
        raise ValueError("media_norm and latents_norm must have elementwise affine weight and bias")
    # One dtype inside the op (the casts stay outside it, so autograd returns each gradient in its own dtype).
    params = tuple(p.to(media.dtype) for p in (media_norm.weight, media_norm.bias, latents_norm.weight,
                                                 latents_norm.bias))
    latents = latents.to(media.dtype)
    time_emb = None if time_emb is None else time_emb.to(media.dtype)
    if backend is None:
        backend = "cuda" if cuda_unsupported_reason(media, latents, time_emb, *params) is None else "torch"
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    elif backend == "cuda":
        reason = cuda_unsupported_reason(media, latents, time_emb, *params)
        if reason is not None:
            raise RuntimeError(f"perceiver_kv_input: the 'cuda' backend is unavailable: {reason}")
    return perceiver_kv_input_fwd(media, latents, time_emb, tokens_per_frame, *params, float(media_norm.eps), backend)
