"""Full attention on CPU through PyTorch's fused flash kernel, the one F.scaled_dot_product_attention uses.

The public SDPA does not return the log-sum-exp our ops save for backward, so this calls the aten entry
points behind it, `_scaled_dot_product_flash_attention_for_cpu` (-> out, lse) and its `_backward`. They
take BHSD views of our BSHD tensors without copies, support GQA natively (backward gets K/V repeated per
query head all the same, see `backward`) and every float dtype (lse float32, float64 for float64 inputs).
Being private, they are looked up defensively: where they are missing the torch backend uses blockwise.py
instead.

Causal masking: aten's is_causal is top-left aligned, ours bottom-right. Sq == Sk is the same thing;
Sq > Sk leaves the first Sq - Sk rows without keys (out 0, lse -inf) and the rest is a top-left causal
square; Sq < Sk passes an explicit additive (Sq, Sk) mask.
"""

from __future__ import annotations

import torch

_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def supports(q: torch.Tensor) -> bool:
    return _FORWARD is not None and _BACKWARD is not None and q.device.type == "cpu"


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _causal_plan(q, k, causal: bool):
    """-> (first row that sees any key, aten is_causal flag, additive mask or None)."""
    sq, sk = q.shape[1], k.shape[1]
    if not causal or sq == sk:
        return 0, causal, None
    if sq > sk:
        return sq - sk, True, None
    rows = torch.arange(sq, device=q.device)[:, None]
    cols = torch.arange(sk, device=q.device)[None, :]
    mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
    return 0, False, mask.masked_fill_(cols > rows + (sk - sq), float("-inf"))


def forward(q, k, v, causal: bool, scale: float):
    first, is_causal, mask = _causal_plan(q, k, causal)
    out, lse = _FORWARD(_bhsd(q[:, first:]), _bhsd(k), _bhsd(v), 0.0, is_causal, attn_mask=mask, scale=scale)
    out, lse = _bhsd(out), lse.contiguous()
    if first == 0:
        return out.contiguous(), lse
    full_out = q.new_zeros(q.shape)
    full_out[:, first:] = out
    full_lse = lse.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
    full_lse[..., first:] = lse
    return full_out, full_lse


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    first, is_causal, mask = _causal_plan(q, k, causal)
    # K/V repeated per query head instead of ATen's GQA backward (Hkv < Hq), which is slower and degrades badly
    # when another process shares the cores: 1.33x alone, 2.0x / 2.8x with a 1- / 2-thread competitor (2 threads,
    # 2-core machine; `python -m bench.cpu_gqa_backward`, bench/results/2026-12-05-cpu-2core-gqa-backward.json).
    group = q.shape[2] // k.shape[2]
    k_heads, v_heads = (x.repeat_interleave(group, dim=2) for x in (k, v)) if group > 1 else (k, v)
    dq, dk, dv = _BACKWARD(
        _bhsd(dout[:, first:]), _bhsd(q[:, first:]), _bhsd(k_heads), _bhsd(v_heads), _bhsd(out[:, first:]),
        lse[..., first:], 0.0, is_causal, attn_mask=mask, scale=scale,
    )
    dq, dk, dv = (_bhsd(g).contiguous() for g in (dq, dk, dv))
    if group > 1:  # sum the repeated heads' gradients back onto their KV head
        dk, dv = (g.unflatten(2, (k.shape[2], group)).sum(dim=3) for g in (dk, dv))
    if first:
        dq = torch.cat([dq.new_zeros(q.shape[0], first, *q.shape[2:]), dq], dim=1)
    return dq, dk, dv
