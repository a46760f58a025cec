"""The `reference` backend: plain float64 math with an explicit boolean mask. It is the test oracle.

Every op materialises the full (B, Hq, Sq, Sk) score matrix, so use it on small inputs only.
Backward recomputes the probabilities in float64 and applies the textbook softmax-attention gradients.
Outputs are contiguous in the input dtype; lse is float64 for float64 inputs, else float32.
"""

from __future__ import annotations

import torch

from flamingo_fast.ops.media_spans import MediaSpans, dense_mask
from flamingo_fast.ops.validation import check_document_order


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """(Sq, Sk) bool, bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def media_mask(media_index: torch.Tensor, sk: int, latents_per_media: int, only_immediate: bool) -> torch.Tensor:
    """(B, Sq, Sk) bool: token with index m sees the keys of image m (or of images 0..m); -1 sees nothing."""
    key_image = torch.arange(sk, device=media_index.device) // latents_per_media
    m = media_index.long()[:, :, None]
    if only_immediate:
        return key_image[None, None, :] == m
    return key_image[None, None, :] <= m


def _probs(q, k, mask, scale):
    """q (B,Sq,H,d), k (B,Sk,H,d) float64 -> (probs, lse); probs is 0 at masked keys and on rows without keys."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.expand(scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
    # A row without any visible key would softmax to NaN; give it finite dummy scores and zero its weights.
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(has_key, scores, 0.0), dim=-1)
    return torch.where(mask, probs, 0.0), lse


def _expand_kv(q, k, v):
    """Repeat each KV head for the Hq / Hkv query heads that share it (GQA), in float64."""
    group = q.shape[2] // k.shape[2]
    return k.double().repeat_interleave(group, dim=2), v.double().repeat_interleave(group, dim=2)


def _forward(q, k, v, mask, scale):
    k64, v64 = _expand_kv(q, k, v)
    probs, lse = _probs(q.double(), k64, mask, scale)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def _backward(dout, q, k, v, mask, scale):
    """Textbook softmax-attention gradients (out = P V, P = softmax(S), S = scale * Q K^T)."""
    q64, dout64 = q.double(), dout.double()
    k64, v64 = _expand_kv(q, k, v)
    probs, _ = _probs(q64, k64, mask, scale)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout64)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout64, v64)
    # Jacobian of softmax: dS_ij = P_ij * (dP_ij - sum_l P_il dP_il).
    dscores = probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k64) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q64) * scale
    # Sum the gradients of the repeated KV heads back onto their shared head.
    group = q.shape[2] // k.shape[2]
    dk = dk.unflatten(2, (k.shape[2], group)).sum(dim=3)
    dv = dv.unflatten(2, (k.shape[2], group)).sum(dim=3)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def attention_fwd(q, k, v, causal: bool, scale: float):
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    return _forward(q, k, v, mask, scale)


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    return _backward(dout, q, k, v, mask, scale)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, 1, S, S) bool: causal and within the same document (a run of equal ids; ids are
    non-decreasing along a row, so equal ids are one run)."""
    check_document_order(document_ids)
    same = document_ids[:, :, None] == document_ids[:, None, :]
    s = document_ids.shape[1]
    return (same & causal_mask(s, s, document_ids.device))[:, None]


def document_attention_fwd(q, k, v, document_ids, scale: float):
    return _forward(q, k, v, document_mask(document_ids), scale)


def document_attention_bwd(dout, q, k, v, out, lse, document_ids, scale: float):
    return _backward(dout, q, k, v, document_mask(document_ids), scale)


def media_cross_attention_fwd(q, k, v, media_index, latents_per_media: int, only_immediate: bool, scale: float):
    mask = media_mask(media_index, k.shape[1], latents_per_media, only_immediate)[:, None]
    return _forward(q, k, v, mask, scale)


def media_cross_attention_bwd(
    dout, q, k, v, out, lse, media_index, latents_per_media: int, only_immediate: bool, scale: float
):
    mask = media_mask(media_index, k.shape[1], latents_per_media, only_immediate)[:, None]
    return _backward(dout, q, k, v, mask, scale)


def media_span_attention_fwd(q, k, v, start, end, key_offset, key_count, scale: float):
    mask = dense_mask(MediaSpans(start, end, key_offset, key_count), k.shape[1])[:, None]
    return _forward(q, k, v, mask, scale)


def media_span_attention_bwd(dout, q, k, v, out, lse, start, end, key_offset, key_count, scale: float):
    mask = dense_mask(MediaSpans(start, end, key_offset, key_count), k.shape[1])[:, None]
    return _backward(dout, q, k, v, mask, scale)


def perceiver_attention_fwd(q, k, v, scale: float):
    return _forward(q, k, v, None, scale)


def perceiver_attention_bwd(dout, q, k, v, out, lse, scale: float):
    return _backward(dout, q, k, v, None, scale)
