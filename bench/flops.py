"""FLOP and byte counts of the attention ops: the numerators of the benchmark's TFLOP/s and GB/s.

Conventions (those of the FlashAttention benchmarks, so numbers compare across projects):

- Only unmasked work counts. One visible (query, key) pair costs 4 * d FLOPs forward per query head:
  2 * d for the dot product of QK^T and 2 * d for accumulating P @ V. Softmax, scaling and masking are
  not counted. An implementation that scores masked pairs (a dense mask) does that work for free as far
  as these numbers go, which is exactly why its TFLOP/s is low.
- causal (bottom-right aligned: query i sees keys j <= i + Sk - Sq): the exact number of visible pairs,
  e.g. Sq = Sk = 4 gives 4 + 3 + 2 + 1 = 10, not 4 * 4 / 2 = 8.
- GQA: FLOPs scale with the query heads Hq (every query head does its own two matmuls); the KV heads
  Hkv only change the bytes.
- media_cross_attention: a token with media_index m sees latents_per_media (L) keys (only_immediate)
  or (m + 1) * L keys (all previous images); a token with -1 sees none. So S tokens with an image cost
  S * L pairs per head, independent of the number of images.
- perceiver_attention: n_latents * Sk pairs (no mask).
- Backward = 2.5 x forward: five matmuls (recompute S = Q K^T, dV = P^T dO, dP = dO V^T, dQ = dS K,
  dK = dS^T Q) against the forward's two. So "fwd+bwd" = 3.5 x forward.

Bytes are the minimal traffic, every tensor read or written exactly once: forward reads q, k, v (and
media_index) and writes out and the float32 log-sum-exp; backward reads q, k, v, out, dout, lse and writes
dq, dk, dv. Arithmetic intensity = FLOPs / bytes decides whether the roofline bound is compute or memory.
"""

from __future__ import annotations

import torch

DIRECTIONS = ("fwd", "fwd+bwd")
# FLOPs of a direction in units of the forward's FLOPs (see the module docstring).
DIRECTION_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
LSE_BYTES = 4  # the log-sum-exp is float32 per (batch, query head, query row)


def _check_direction(direction: str) -> float:
    try:
        return DIRECTION_FACTOR[direction]
    except KeyError:
        raise ValueError(f"direction must be one of {sorted(DIRECTION_FACTOR)}, got {direction!r}") from None


def causal_pairs(seq_q: int, seq_k: int) -> int:
    """Visible (query, key) pairs of one head under the bottom-right aligned causal mask."""
    if seq_q < 0 or seq_k < 0:
        raise ValueError(f"seq_q and seq_k must be >= 0, got {seq_q}, {seq_k}")
    offset = seq_k - seq_q
    # Row i sees min(Sk, max(0, i + offset + 1)) keys: rows below `first` see nothing, only the last row
    # is sure to see all Sk keys, and the rows in between see first + offset + 1, first + offset + 2, ...
    first = max(0, -offset)  # first row that sees at least one key
    full = max(first, seq_q - 1)  # from here on every row sees all Sk keys
    ramp = sum_range(first + offset + 1, full + offset + 1)
    return ramp + (seq_q - full) * seq_k


def sum_range(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + (hi - 1); 0 when hi <= lo."""
    if hi <= lo:
        return 0
    return (lo + hi - 1) * (hi - lo) // 2


def attention_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    return causal_pairs(seq_q, seq_k) if causal else seq_q * seq_k


def media_pairs(media_index: torch.Tensor, latents_per_media: int, only_immediate: bool = True) -> int:
    """Visible pairs of one head summed over the batch: sum over tokens of the keys each token sees."""
    if media_index.dim() != 2 or media_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"media_index must be an int32/int64 tensor (B, S), got {media_index.dtype} {tuple(media_index.shape)}"
        )
    index = media_index.long()
    if only_immediate:
        return int((index >= 0).sum()) * latents_per_media
    return int((index + 1).clamp(min=0).sum()) * latents_per_media


def attention_flops(pairs: int, heads_q: int, head_dim: int, direction: str = "fwd") -> float:
    """FLOPs for `pairs` visible pairs per query head (already summed over the batch)."""
    return 4.0 * head_dim * pairs * heads_q * _check_direction(direction)


def attention_bytes(
    q_elems: int, kv_elems: int, lse_rows: int, elem_size: int, direction: str = "fwd", extra_bytes: int = 0
) -> float:
    """Minimal bytes moved: q_elems = elements of q (= of out), kv_elems = elements of k (= of v),
    lse_rows = B * Hq * Sq, extra_bytes = inputs read once per direction pass (e.g. media_index)."""
    _check_direction(direction)
    forward = (2 * q_elems + 2 * kv_elems) * elem_size + lse_rows * LSE_BYTES + extra_bytes
    # reads q, out, dout (3 q-sized), k, v, lse; writes dq (1 q-sized), dk, dv
    backward = (4 * q_elems + 4 * kv_elems) * elem_size + lse_rows * LSE_BYTES + extra_bytes
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[direction]
