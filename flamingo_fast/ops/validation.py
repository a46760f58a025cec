"""Input checks for the public attention ops; messages name the argument and what was expected.

Shape, dtype and device checks are free (metadata only) and always run. The media_index *value* checks
(>= -1, non-decreasing per row, < number of images), and those of MediaSpans (ranges within the images,
key ranges within k/v), need a device->host sync, so they run:
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

from flamingo_fast.ops.media_spans import MediaSpans

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
    if _reads_values(media_index):
        check_media_index_values(media_index, k.shape[1] // latents_per_media)


def _reads_values(t: torch.Tensor) -> bool:
    """Whether the value checks run for `t`: eager, holding values, and on CPU or with the env var set."""
    if torch.compiler.is_compiling() or not holds_values(t):
        return False
    return t.device.type == "cpu" or os.environ.get(CHECK_ENV_VAR) == "1"


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


def _check_index_tensor(op: str, name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {_shape(t)}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}; it must be on q's device")


def check_media_span_attention(q, k, v, spans, scale) -> None:
    op = "media_span_attention"
    check_qkv(op, q, k, v)
    check_scale(op, scale)
    if not isinstance(spans, MediaSpans):
        raise TypeError(f"{op}: spans must be a flamingo_fast.ops.MediaSpans, got {type(spans).__name__}")
    count = spans.key_count
    if not isinstance(count, torch.Tensor):
        raise TypeError(f"{op}: spans.key_count must be a torch.Tensor, got {type(count).__name__}")
    if count.dim() != 2:
        raise ValueError(f"{op}: spans.key_count must be a (batch, images) tensor, got shape {_shape(count)}")
    images = (q.shape[0], count.shape[1])
    for name, t, shape in (("start", spans.start, _shape(q)[:2]), ("end", spans.end, _shape(q)[:2]),
                           ("key_offset", spans.key_offset, images), ("key_count", count, images)):
        _check_index_tensor(op, f"spans.{name}", t, shape, q.device)
    if _reads_values(spans.start):
        check_media_span_values(spans, k.shape[1])


def check_media_span_values(spans: MediaSpans, num_keys: int) -> None:
    """Data checks (host sync): 0 <= start <= end <= T; each image's keys within [0, num_keys), disjoint."""
    op = "media_span_attention"
    start, end, offset, count = (t.long() for t in spans.tensors())
    if start.numel() and bool((start < 0).any()):
        raise ValueError(f"{op}: spans.start must be >= 0, found {int(start.min())}")
    if start.numel() and bool((end < start).any()):
        raise ValueError(f"{op}: spans.end must be >= spans.start (start == end: no image)")
    if end.numel() and int(end.max()) > spans.num_media:
        raise ValueError(f"{op}: spans.end reaches image {int(end.max())} but key_count describes only "
                         f"{spans.num_media} images per row")
    if count.numel() == 0:
        return
    if int(count.min()) < 0 or int(offset.min()) < 0:
        raise ValueError(f"{op}: spans.key_count and spans.key_offset must be >= 0")
    if int((offset + count).max()) > num_keys:
        raise ValueError(f"{op}: spans.key_offset + spans.key_count reaches key {int((offset + count).max())} "
                         f"but k/v hold {num_keys} keys")
    # Sorted by first key (images without keys last), each image must end before the next one starts.
    first, order = torch.where(count > 0, offset, num_keys).sort(dim=1)
    last = first + count.gather(1, order)
    if bool((last[:, :-1] > first[:, 1:]).any()):
        raise ValueError(f"{op}: the key ranges of two images of one row overlap (spans.key_offset, spans.key_count)")
