"""Blockwise exact attention in plain PyTorch (any device, any float dtype).

One dense kernel pair (`block_forward` / `block_backward`) runs a batch of small problems laid out as
(N, Hkv, G*R, d) queries against (N, Hkv, K, d) keys: the G query heads that share a KV head are stacked
along the rows, so GQA never copies K or V. Forward returns the log-sum-exp; backward is FlashAttention
math on the saved output and lse (delta = rowsum(dO*O), dS = P*(dP - delta)).

`forward` / `backward` apply it to full attention in query chunks sized to a memory budget;
a causal chunk only visits keys up to its last diagonal and only masks when it straddles the diagonal.

Half-precision inputs are computed in float32 chunk by chunk; float64 stays float64. lse is float64
for float64 inputs, else float32; -inf for rows without keys (their output is exactly 0).
"""

from __future__ import annotations

import torch

from flamingo_fast.ops.reference import lse_dtype

# Elements of one (rows x keys) score matrix per chunk; backward holds about three of them at once.
SCORE_BUDGET = 1 << 23


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
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


def row_delta(dout, out):
    """rowsum(dout * out) in the compute dtype: (B, S, H, d) -> (B, S, H)."""
    cdt = compute_dtype(out.dtype)
    return (dout.to(cdt) * out.to(cdt)).sum(dim=-1)


def forward(q, k, v, causal: bool, scale: float):
    """Full attention, BSHD, GQA, bottom-right causal -> (out (B,Sq,Hq,d), lse (B,Hq,Sq))."""
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = compute_dtype(q.dtype)
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


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of forward -> (dq, dk, dv); dk/dv sum over the query heads of each KV head."""
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = compute_dtype(q.dtype)
    kh, vh = _heads_first(k, cdt), _heads_first(v, cdt)
    dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
    dq = torch.empty(batch, sq, hkv, group, d, dtype=q.dtype, device=q.device)
    lse_g = lse.view(batch, hkv, group, sq)
    delta = row_delta(dout, out).permute(0, 2, 1).reshape(batch, hkv, group, sq)

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
