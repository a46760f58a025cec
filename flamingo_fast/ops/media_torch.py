"""media_cross_attention for the torch backend: each query block visits only its own image's keys.

The blocks come from media_blocks.plan_media_blocks; the math is blockwise.block_forward/backward on
gathered (block, head) problems without any mask, so the cost scales with S * L, not S * T_img * L.
"""

from __future__ import annotations

import torch

from flamingo_fast.ops.blockwise import block_backward, block_forward, compute_dtype
from flamingo_fast.ops.media_blocks import plan_media_blocks
from flamingo_fast.ops.reference import lse_dtype


# Elements of one chunk's score matrix. On CPU small chunks stay in cache and reuse freed memory
# (large fresh buffers cost page faults); on accelerators large chunks mean fewer kernel launches.
CPU_SCORE_BUDGET = 1 << 19
DEVICE_SCORE_BUDGET = 1 << 23


def _budget(x: torch.Tensor) -> int:
    return CPU_SCORE_BUDGET if x.device.type == "cpu" else DEVICE_SCORE_BUDGET


def _gather_blocks(x_flat, chunk, hkv, cdt, zero_padding=False):
    """The chunk's token rows from x_flat (B*S, Hq, e) -> (n, Hkv, G*R, e) in the compute dtype."""
    n, r = chunk.rows.shape
    xb = x_flat.index_select(0, chunk.rows.reshape(-1)).to(cdt)
    if zero_padding:
        xb.mul_(chunk.valid.reshape(-1, 1, 1))
    hq, e = xb.shape[1], xb.shape[2]
    return xb.view(n, r, hkv, hq // hkv, e).permute(0, 2, 3, 1, 4).reshape(n, hkv, -1, e)


def _scatter_blocks(tokens, chunk, xb):
    """Write block results xb (n, Hkv, G*R, e) to their tokens in `tokens` (B*S + 1, Hq, e).

    Padding slots all land on the extra last row, which the caller drops; tokens with media_index -1
    are never written, so the caller's zero initialisation is their exact result.
    """
    (n, r), hkv, e = chunk.rows.shape, xb.shape[1], xb.shape[3]
    dest = torch.where(chunk.valid, chunk.rows, tokens.shape[0] - 1).reshape(-1)
    src = xb.view(n, hkv, -1, r, e).permute(0, 3, 1, 2, 4).reshape(n * r, -1, e)
    tokens.index_copy_(0, dest, src.to(tokens.dtype))


def _key_sources(k, v, plan):
    """Views of K/V (no copy) whose dim 0 is indexed by MediaChunk.key_index."""
    batch, sk, hkv, d = k.shape
    if plan.only_immediate:  # (B*T_img, L, Hkv, d): one entry per image
        shape = (batch * plan.num_media, plan.latents_per_media, hkv, d)
        return k.reshape(shape), v.reshape(shape)
    return k, v  # (B, Sk, Hkv, d): one entry per batch row, sliced to the key prefix


def _chunk_keys(source, chunk, cdt):
    """(n, Hkv, K, d) keys of the chunk's blocks; gathering per chunk keeps the copies small and cached."""
    keys = source[:, : chunk.num_keys].index_select(0, chunk.key_index)
    return keys.to(cdt).transpose(1, 2).contiguous()


def media_cross_attention_fwd(q, k, v, media_index, latents_per_media: int, only_immediate: bool, scale: float):
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    cdt = compute_dtype(q.dtype)
    plan = plan_media_blocks(media_index, k.shape[1] // latents_per_media, latents_per_media, only_immediate)
    q_flat = q.reshape(batch * sq, hq, d)
    k_src, v_src = _key_sources(k, v, plan)
    out = q.new_zeros(batch * sq + 1, hq, d)  # rows with media_index -1 stay exactly 0
    lse = torch.full((batch * sq + 1, hq, 1), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for chunk in plan.chunks(_budget(q) // hq):
        ob, lb = block_forward(
            _gather_blocks(q_flat, chunk, hkv, cdt),
            _chunk_keys(k_src, chunk, cdt), _chunk_keys(v_src, chunk, cdt), scale, None,
        )
        _scatter_blocks(out, chunk, ob)
        _scatter_blocks(lse, chunk, lb.unsqueeze(-1))
    lse = lse[:-1].view(batch, sq, hq).permute(0, 2, 1).contiguous()
    return out[:-1].view(batch, sq, hq, d), lse


def media_cross_attention_bwd(
    dout, q, k, v, out, lse, media_index, latents_per_media: int, only_immediate: bool, scale: float
):
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    cdt = compute_dtype(q.dtype)
    plan = plan_media_blocks(media_index, k.shape[1] // latents_per_media, latents_per_media, only_immediate)
    q_flat, dout_flat, out_flat = (x.reshape(batch * sq, hq, d) for x in (q, dout, out))
    lse_flat = lse.permute(0, 2, 1).reshape(batch * sq, hq, 1)
    k_src, v_src = _key_sources(k, v, plan)
    dk = torch.zeros(k_src.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v_src.shape, dtype=cdt, device=v.device)
    dq = q.new_zeros(batch * sq + 1, hq, d)
    for chunk in plan.chunks(_budget(q) // hq):
        # Padding slots get dout = 0, hence delta = rowsum(dout * out) = 0, so dS = P * (dP - delta) and
        # P^T dO vanish there: they add nothing to dk/dv.
        dout_b = _gather_blocks(dout_flat, chunk, hkv, cdt, zero_padding=True)
        delta_b = (dout_b * _gather_blocks(out_flat, chunk, hkv, cdt)).sum(dim=-1)
        dqb, dkb, dvb = block_backward(
            dout_b, _gather_blocks(q_flat, chunk, hkv, cdt),
            _chunk_keys(k_src, chunk, cdt), _chunk_keys(v_src, chunk, cdt),
            delta_b, _gather_blocks(lse_flat, chunk, hkv, cdt).squeeze(-1), scale, None,
        )
        _scatter_blocks(dq, chunk, dqb)
        dk[:, : chunk.num_keys].index_add_(0, chunk.key_index, dkb.transpose(1, 2))
        dv[:, : chunk.num_keys].index_add_(0, chunk.key_index, dvb.transpose(1, 2))
    return dq[:-1].view(q.shape), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)
