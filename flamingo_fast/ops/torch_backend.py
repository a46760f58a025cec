"""The `torch` backend: exact attention in plain PyTorch for any device and dtype.

All three ops share one dense kernel pair (`block_forward` / `block_backward`) that runs on a batch of
small problems laid out as (N, Hkv, G*R, d) queries against (N, Hkv, K, d) keys: the G query heads that
share a KV head are stacked along the rows, so GQA never copies K or V. Forward returns the log-sum-exp;
backward is FlashAttention math on the saved output and lse (delta = rowsum(dO*O), dS = P*(dP - delta)).

- attention / perceiver_attention: query chunks sized to a memory budget; a causal chunk only visits
  keys up to its last diagonal and only masks when it straddles the diagonal.
- media_cross_attention: see media_blocks.py; each query block visits only its own image's keys.

Half-precision inputs are computed in float32 chunk by chunk; float64 stays float64 (tests compare it
to the reference at 1e-10). lse is float64 for float64 inputs, else float32; -inf for rows without keys.
"""

from __future__ import annotations

import torch

from flamingo_fast.ops.media_blocks import plan_media_blocks
from flamingo_fast.ops.reference import lse_dtype

# Elements of one (rows x keys) score matrix per chunk; backward holds about three of them at once.
SCORE_BUDGET = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(lse: torch.Tensor) -> torch.Tensor:
    # Rows without any key have lse -inf; subtracting 0 instead keeps exp(-inf - 0) = 0 and avoids NaN.
    return torch.where(torch.isneginf(lse), 0.0, lse)


def block_forward(q, k, v, scale: float, mask):
    """q (N,Hkv,R,d), k/v (N,Hkv,K,d); mask None or bool broadcastable to (N,Hkv,R,K) -> out, lse (N,Hkv,R)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    row_max = _finite(scores.amax(dim=-1, keepdim=True))
    probs = scores.sub_(row_max).exp_()  # unnormalised; exactly 0 at masked keys
    denom = probs.sum(dim=-1, keepdim=True)
    lse = (row_max + denom.log()).squeeze(-1)  # log(0) = -inf for rows without keys
    # Normalise the (R, d) output rather than the (R, K) probabilities; rows without keys stay 0.
    out = torch.matmul(probs, v).div_(denom.clamp_min(torch.finfo(denom.dtype).tiny))
    return out, lse


def block_backward(dout, q, k, v, delta, lse, scale: float, mask):
    """Gradients of block_forward from dout (N,Hkv,R,d), delta = rowsum(dout * out) and lse (N,Hkv,R)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = scores.sub_(_finite(lse)[..., None]).exp_()
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dscores = torch.matmul(dout, v.transpose(-1, -2)).sub_(delta[..., None]).mul_(probs)
    dq = torch.matmul(dscores, k).mul_(scale)
    dk = torch.matmul(dscores.transpose(-1, -2), q).mul_(scale)
    return dq, dk, dv


# ---------------------------------------------------------------- attention and perceiver_attention


def _heads_first(x: torch.Tensor, dtype) -> torch.Tensor:
    """(B, S, H, d) -> contiguous (B, H, S, d) in the compute dtype."""
    return x.transpose(1, 2).to(dtype).contiguous()


def _query_chunks(q, k, causal: bool):
    """Yield (row_start, row_end, key_end, needs_mask) covering all queries."""
    batch, sq, hq, _ = q.shape
    sk = k.shape[1]
    rows = max(16, min(sq, SCORE_BUDGET // max(1, batch * hq * sk)))
    offset = sk - sq  # bottom-right causal alignment
    for start in range(0, sq, rows):
        end = min(sq, start + rows)
        if not causal:
            yield start, end, sk, False
            continue
        key_end = max(0, min(sk, end + offset))
        yield start, end, key_end, start + offset < key_end - 1


def _chunk_mask(start, end, key_end, offset, group, device):
    rows = torch.arange(start, end, device=device)[:, None]
    cols = torch.arange(key_end, device=device)[None, :]
    return (cols <= rows + offset).repeat(group, 1)  # rows of all G heads of a KV head are stacked


def _delta(dout, out):
    """rowsum(dout * out) in the compute dtype: (B, S, H, d) -> (B, S, H)."""
    cdt = _compute_dtype(out.dtype)
    return (dout.to(cdt) * out.to(cdt)).sum(dim=-1)


def _dense_forward(q, k, v, causal: bool, scale: float):
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = _compute_dtype(q.dtype)
    kh, vh = _heads_first(k, cdt), _heads_first(v, cdt)
    qg = q.unflatten(2, (hkv, group))  # (B, Sq, Hkv, G, d)
    out = q.new_empty(batch, sq, hkv, group, d)
    lse = torch.empty(batch, hkv, group, sq, dtype=lse_dtype(q.dtype), device=q.device)
    for start, end, key_end, needs_mask in _query_chunks(q, k, causal):
        rows = end - start
        qc = qg[:, start:end].permute(0, 2, 3, 1, 4).to(cdt).reshape(batch, hkv, group * rows, d)
        mask = _chunk_mask(start, end, key_end, sk - sq, group, q.device) if needs_mask else None
        oc, lc = block_forward(qc, kh[:, :, :key_end], vh[:, :, :key_end], scale, mask)
        out[:, start:end] = oc.view(batch, hkv, group, rows, d).permute(0, 3, 1, 2, 4)
        lse[..., start:end] = lc.view(batch, hkv, group, rows)
    return out.view(batch, sq, hq, d), lse.view(batch, hq, sq)


def _dense_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = _compute_dtype(q.dtype)
    kh, vh = _heads_first(k, cdt), _heads_first(v, cdt)
    dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
    dq = torch.empty(batch, sq, hkv, group, d, dtype=q.dtype, device=q.device)
    lse_g = lse.view(batch, hkv, group, sq)
    delta = _delta(dout, out).permute(0, 2, 1).reshape(batch, hkv, group, sq)

    def rows_of(x, start, end):  # (B, Sq, Hq, d) -> (B, Hkv, G*rows, d)
        return x[:, start:end].unflatten(2, (hkv, group)).permute(0, 2, 3, 1, 4).to(cdt).reshape(batch, hkv, -1, d)

    for start, end, key_end, needs_mask in _query_chunks(q, k, causal):
        rows = end - start
        mask = _chunk_mask(start, end, key_end, sk - sq, group, q.device) if needs_mask else None
        lc = lse_g[..., start:end].to(cdt).reshape(batch, hkv, group * rows)
        dqc, dkc, dvc = block_backward(
            rows_of(dout, start, end), rows_of(q, start, end), kh[:, :, :key_end], vh[:, :, :key_end],
            delta[..., start:end].reshape(batch, hkv, group * rows), lc, scale, mask,
        )
        dq[:, start:end] = dqc.view(batch, hkv, group, rows, d).permute(0, 3, 1, 2, 4)
        dk[:, :, :key_end] += dkc
        dv[:, :, :key_end] += dvc
    return (
        dq.view(batch, sq, hq, d),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
    )


def attention_fwd(q, k, v, causal: bool, scale: float):
    return _dense_forward(q, k, v, causal, scale)


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    return _dense_backward(dout, q, k, v, out, lse, causal, scale)


def perceiver_attention_fwd(q, k, v, scale: float):
    return _dense_forward(q, k, v, False, scale)


def perceiver_attention_bwd(dout, q, k, v, out, lse, scale: float):
    return _dense_backward(dout, q, k, v, out, lse, False, scale)


# ---------------------------------------------------------------- media_cross_attention


def _gather_blocks(x_flat, plan, blocks, hkv, cdt, zero_padding=False):
    """Token rows of `blocks` from x_flat (B*S, Hq, e) -> (n, Hkv, G*R, e) in the compute dtype."""
    n, r = blocks.shape[0], plan.block_size
    xb = x_flat.index_select(0, plan.rows[blocks].reshape(-1)).to(cdt)
    if zero_padding:
        xb.mul_(plan.valid[blocks].reshape(-1, 1, 1))
    hq, e = xb.shape[1], xb.shape[2]
    return xb.view(n, r, hkv, hq // hkv, e).permute(0, 2, 3, 1, 4).reshape(n, hkv, -1, e)


def _scatter_blocks(tokens, plan, blocks, xb):
    """Write block results xb (n, Hkv, G*R, e) to their tokens in `tokens` (B*S + 1, Hq, e).

    Padding slots all land on the extra last row, which the caller drops; tokens with media_index -1
    are never written, so the caller's zero initialisation is their exact result.
    """
    n, hkv = xb.shape[:2]
    r, e = plan.block_size, xb.shape[3]
    dest = torch.where(plan.valid[blocks], plan.rows[blocks], tokens.shape[0] - 1).reshape(-1)
    src = xb.view(n, hkv, -1, r, e).permute(0, 3, 1, 2, 4).reshape(n * r, -1, e)
    tokens.index_copy_(0, dest, src.to(tokens.dtype))


def _key_sources(k, v, plan, cdt):
    """K/V laid out so that one index_select by MediaChunk.key_index gives (n, Hkv, K, d) blocks."""
    batch, sk, hkv, d = k.shape
    if plan.only_immediate:  # (B*T_img, Hkv, L, d): one entry per image
        shape = (batch * plan.num_media, plan.latents_per_media, hkv, d)
        return tuple(x.to(cdt).reshape(shape).transpose(1, 2).contiguous() for x in (k, v))
    return tuple(x.to(cdt).transpose(1, 2).contiguous() for x in (k, v))  # (B, Hkv, Sk, d)


def _chunk_keys(source, chunk):
    return source.index_select(0, chunk.key_index)[:, :, : chunk.num_keys]


def media_cross_attention_fwd(q, k, v, media_index, latents_per_media: int, only_immediate: bool, scale: float):
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    plan = plan_media_blocks(media_index, k.shape[1] // latents_per_media, latents_per_media, only_immediate)
    q_flat = q.reshape(batch * sq, hq, d)
    k_src, v_src = _key_sources(k, v, plan, cdt)
    out = q.new_zeros(batch * sq + 1, hq, d)  # rows with media_index -1 stay exactly 0
    lse = torch.full((batch * sq + 1, hq, 1), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for chunk in plan.chunks(SCORE_BUDGET // hq):
        ob, lb = block_forward(
            _gather_blocks(q_flat, plan, chunk.blocks, hkv, cdt),
            _chunk_keys(k_src, chunk), _chunk_keys(v_src, chunk), scale, None,
        )
        _scatter_blocks(out, plan, chunk.blocks, ob)
        _scatter_blocks(lse, plan, chunk.blocks, lb.unsqueeze(-1))
    lse = lse[:-1].view(batch, sq, hq).permute(0, 2, 1).contiguous()
    return out[:-1].view(batch, sq, hq, d), lse


def media_cross_attention_bwd(
    dout, q, k, v, out, lse, media_index, latents_per_media: int, only_immediate: bool, scale: float
):
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    plan = plan_media_blocks(media_index, k.shape[1] // latents_per_media, latents_per_media, only_immediate)
    q_flat, dout_flat = q.reshape(batch * sq, hq, d), dout.reshape(batch * sq, hq, d)
    delta = _delta(dout, out).reshape(batch * sq, hq, 1)
    lse_flat = lse.permute(0, 2, 1).reshape(batch * sq, hq, 1)
    k_src, v_src = _key_sources(k, v, plan, cdt)
    dk, dv = torch.zeros_like(k_src), torch.zeros_like(v_src)
    dq = q.new_zeros(batch * sq + 1, hq, d)
    for chunk in plan.chunks(SCORE_BUDGET // hq):
        # Padding slots get dout = 0 and delta = 0, so dS = P * (dP - delta) and P^T dO vanish there:
        # they add nothing to dk/dv.
        dqb, dkb, dvb = block_backward(
            _gather_blocks(dout_flat, plan, chunk.blocks, hkv, cdt, zero_padding=True),
            _gather_blocks(q_flat, plan, chunk.blocks, hkv, cdt),
            _chunk_keys(k_src, chunk), _chunk_keys(v_src, chunk),
            _gather_blocks(delta, plan, chunk.blocks, hkv, cdt, zero_padding=True).squeeze(-1),
            _gather_blocks(lse_flat, plan, chunk.blocks, hkv, cdt).squeeze(-1), scale, None,
        )
        _scatter_blocks(dq, plan, chunk.blocks, dqb)
        dk[:, :, : chunk.num_keys].index_add_(0, chunk.key_index, dkb)
        dv[:, :, : chunk.num_keys].index_add_(0, chunk.key_index, dvb)

    def keys_first(grad, like):  # back from _key_sources' layout to (B, Sk, Hkv, d)
        return grad.transpose(1, 2).reshape(like.shape).to(like.dtype).contiguous()

    return dq[:-1].view(q.shape), keys_first(dk, k), keys_first(dv, v)
