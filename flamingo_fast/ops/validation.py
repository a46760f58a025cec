"""Input checks for the public attention ops; messages name the argument and what was expected.

Shape, dtype and device checks are free (metadata only) and always run. The media_index *value* checks
(>= -1, non-decreasing per row, < number of images) need a device->host sync, so they run:
  - never while torch.compile traces (they would break the graph),
  - always for CPU tensors,
  - for CUDA tensors only when FLAMINGO_FAST_CHECK_MEDIA_INDEX=1, because a sync per cross-attention layer
    stalls the GPU pipeline. Callers that build media_index themselves (the model) can call
    `check_media_index_values` once per batch instead.
"""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
CHECK_ENV_VAR = "FLAMINGO_FAST_CHECK_MEDIA_INDEX"


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_qkv(op: str, q, k, v, *, same_heads: bool = False) -> None:
    """Common checks: q (B, Sq, Hq, d), k/v (B, Sk, Hkv, d), one float dtype, one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have rank 4 (batch, seq, heads, head_dim), got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if _shape(k) != _shape(v):
        raise ValueError(f"{op}: k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k has batch size {k.shape[0]} but q has {q.shape[0]}; they must match")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k has head_dim {k.shape[3]} but q has {q.shape[3]}; they must match")
    if same_heads:
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"{op}: k has {k.shape[2]} heads but q has {q.shape[2]}; they must be equal")
    elif q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"{op}: q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]}) for grouped-query attention"
        )


def check_scale(op: str, scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")


def check_attention(q, k, v, causal, scale) -> None:
    check_qkv("attention", q, k, v)
    if k.shape[1] == 0:
        raise ValueError("attention: k and v must hold at least one key (seq dimension 1 is 0)")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    check_scale("attention", scale)


def check_document_ids(q, k, causal, document_ids) -> None:
    """Metadata only; the non-decreasing rule is checked where the ids are read (document_torch.py)."""
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"attention: document_ids must be a torch.Tensor, got {type(document_ids).__name__}")
    if document_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"attention: document_ids must be int32 or int64, got {document_ids.dtype}")
    if _shape(document_ids) != _shape(q)[:2] or k.shape[1] != q.shape[1]:
        raise ValueError(f"attention: document_ids must be (B, S) = {_shape(q)[:2]} for self-attention with as many "
                         f"keys as queries; got document_ids {_shape(document_ids)}, {k.shape[1]} keys")
    if document_ids.device != q.device:
        raise ValueError(f"attention: document_ids is on {document_ids.device} but q is on {q.device}")
    if not causal:
        raise ValueError("attention: document_ids is supported with causal=True only (packed decoder rows)")


def check_document_order(document_ids: torch.Tensor) -> None:
    """Values (a device sync; the backends call it inside the op): documents are runs of non-decreasing ids."""
    if document_ids.shape[1] > 1 and bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        raise ValueError("attention: document_ids must be non-decreasing along each row (documents are "
                         "contiguous runs of one id)")


def check_perceiver_attention(q, k, v, scale) -> None:
    check_qkv("perceiver_attention", q, k, v, same_heads=True)
    if k.shape[1] == 0:
        raise ValueError("perceiver_attention: k and v must hold at least one key (seq dimension 1 is 0)")
    check_scale("perceiver_attention", scale)


def check_media_cross_attention(q, k, v, media_index, latents_per_media, only_immediate) -> None:
    op = "media_cross_attention"
    check_qkv(op, q, k, v)
    if isinstance(latents_per_media, bool) or not isinstance(latents_per_media, int) or latents_per_media <= 0:
        raise ValueError(f"{op}: latents_per_media must be a positive int, got {latents_per_media!r}")
    if k.shape[1] % latents_per_media != 0:
        raise ValueError(
            f"{op}: k/v seq length {k.shape[1]} must be a multiple of latents_per_media={latents_per_media} "
            "(T_img * latents_per_media keys)"
        )
    if not isinstance(only_immediate, bool):
        raise TypeError(f"{op}: only_immediate must be a bool, got {type(only_immediate).__name__}")
    if not isinstance(media_index, torch.Tensor):
        raise TypeError(f"{op}: media_index must be a torch.Tensor, got {type(media_index).__name__}")
    if media_index.dim() != 2:
        raise ValueError(f"{op}: media_index must have rank 2 (batch, seq), got shape {_shape(media_index)}")
    if _shape(media_index) != _shape(q)[:2]:
        raise ValueError(f"{op}: media_index must have shape (batch, seq) = {_shape(q)[:2]}, got {_shape(media_index)}")
    if media_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: media_index has dtype {media_index.dtype}; expected torch.int32 or torch.int64")
    if media_index.device != q.device:
        raise ValueError(
            f"{op}: media_index is on {media_index.device} but q is on {q.device}; it must be on q's device"
        )
    if torch.compiler.is_compiling() or not holds_values(media_index):
        return
    if media_index.device.type == "cpu" or os.environ.get(CHECK_ENV_VAR) == "1":
        check_media_index_values(media_index, k.shape[1] // latents_per_media)


def holds_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (shape-only runs such as the memory planner's): nothing to read."""
    return t.device.type != "meta" and not is_fake(t)


def check_media_index_values(media_index: torch.Tensor, num_media: int) -> None:
    """Data checks (host sync): values in [-1, num_media), non-decreasing along each row."""
    op = "media_cross_attention"
    if media_index.numel() == 0:
        return
    low = int(media_index.min())
    if low < -1:
        raise ValueError(f"{op}: media_index must be >= -1 (-1 = no image yet), found {low}")
    high = int(media_index.max())
    if high >= num_media:
        raise ValueError(
            f"{op}: media_index refers to image {high} but k/v hold only {num_media} images "
            "(seq length / latents_per_media)"
        )
    if media_index.shape[1] > 1 and bool((media_index[:, 1:] < media_index[:, :-1]).any()):
        row = int((media_index[:, 1:] < media_index[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"{op}: media_index must be non-decreasing along each row; row {row} decreases")
