"""media_span_attention for the torch backend: each run of tokens attends to its own images' valid keys only.

A run is a stretch of consecutive tokens of one row with one span [start, end) (media_blocks.token_runs). Its
keys are the valid keys of images start..end-1, gathered one image after another: padding keys (tiles) are
never read and no masked pair is ever scored, so a run is a plain unmasked attention problem. Runs with the
same key count and a similar length (half-octave classes, as in document_torch.py) are padded into one batch
(runs, longest, ...) for one call of the dense full-attention module (`dense`: PyTorch's CPU flash kernel or
blockwise.py, as for document attention); a batch gathers at most GATHER_BUDGET key elements.

The work is the visible pairs only, and each run gathers its keys once, so the plan is cheapest when runs are
long, as they are (Mllama: one run per image group; Flamingo: one per image). Spans need not be monotone: an
unsorted row just makes more, shorter runs. Planning reads the spans (one host sync per call).

Padding slots repeat their run's first token (finite q, out and lse) and backward zeroes their dout, so they
add nothing to dk/dv (dS = P (dP - delta) = 0 and P^T dO = 0). Tokens in no run keep out 0, lse -inf, dq 0;
keys of no image keep dk = dv = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flamingo_fast.ops.blockwise import compute_dtype
from flamingo_fast.ops.media_blocks import token_runs
from flamingo_fast.ops.reference import lse_dtype

# Elements of gathered K (and as many of V) per dense call: bounds the copies, not the attention's own memory.
GATHER_BUDGET = 1 << 24


@dataclass
class SpanBatch:
    """Runs with `num_keys` keys each, padded to one length."""

    rows: torch.Tensor  # (n, R) flat token indices into (B*S); padding slots repeat the run's first token
    valid: torch.Tensor  # (n, R) bool: the slot holds a real token of the run
    keys: torch.Tensor  # (n * num_keys,) flat key indices into (B*Sk), run after run
    num_keys: int

    def destination(self, dummy: int) -> torch.Tensor:
        """Where each slot's result goes: its token, or the `dummy` row for padding slots."""
        return torch.where(self.valid, self.rows, dummy).reshape(-1)


def _segments(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ranges of `counts` elements -> (range of each element, its position in the range)."""
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = counts.cumsum(0) - counts
    return segment, torch.arange(segment.numel(), device=counts.device) - first[segment]


def plan_spans(start, end, key_offset, key_count, num_keys: int, keys_per_batch: int) -> list[SpanBatch]:
    """Batches of runs that see at least one key; keys_per_batch caps n * num_keys (one run at least)."""
    seq = start.shape[1]
    _, run_first, run_length = token_runs(start, end)
    row = run_first // seq
    first_image, end_image = start.reshape(-1)[run_first].long(), end.reshape(-1)[run_first].long()
    keys_before = F.pad(key_count.long().cumsum(1), (1, 0))  # (B, T + 1): keys of images 0..j-1
    run_keys = keys_before[row, end_image] - keys_before[row, first_image]
    live = (run_keys > 0).nonzero().squeeze(1)
    if live.numel() == 0:
        return []
    length_class = torch.ceil(2 * torch.log2(run_length[live].double())).long()
    batches = []
    for keys, cls in torch.stack([run_keys[live], length_class], dim=1).unique(dim=0).tolist():
        members = live[(run_keys[live] == keys) & (length_class == cls)]
        for runs in members.split(max(1, keys_per_batch // keys)):
            longest = int(run_length[runs].max())
            slot = torch.arange(longest, device=start.device)
            valid = slot < run_length[runs, None]
            rows = torch.where(valid, run_first[runs, None] + slot, run_first[runs, None])
            image_run, image_pos = _segments(end_image[runs] - first_image[runs])  # the runs' images, in order
            b, j = row[runs][image_run], first_image[runs][image_run] + image_pos
            key_image, key_pos = _segments(key_count[b, j].long())
            flat_keys = (b * num_keys + key_offset[b, j].long())[key_image] + key_pos
            batches.append(SpanBatch(rows, valid, flat_keys, keys))
    return batches


def _plan(q, k, start, end, key_offset, key_count) -> list[SpanBatch]:
    return plan_spans(start, end, key_offset, key_count, k.shape[1], GATHER_BUDGET // (k.shape[2] * k.shape[3]))


def _gather_keys(part: SpanBatch, *flat: torch.Tensor) -> list[torch.Tensor]:
    """(B*Sk, Hkv, d) tensors -> (n, num_keys, Hkv, d) each."""
    n = part.rows.shape[0]
    return [x.index_select(0, part.keys).view(n, part.num_keys, *x.shape[1:]) for x in flat]


def forward(dense, q, k, v, start, end, key_offset, key_count, scale: float):
    """dense: the module (forward/backward) of full attention -> (out (B,S,Hq,d), lse (B,Hq,S))."""
    batch, sq, hq, d = q.shape
    tokens = batch * sq
    q_flat = q.reshape(tokens, hq, d)
    k_flat, v_flat = (x.reshape(-1, *x.shape[2:]) for x in (k, v))
    out = q.new_zeros(tokens + 1, hq, d)  # the extra last row takes the padding slots
    lse = torch.full((tokens + 1, hq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for part in _plan(q, k, start, end, key_offset, key_count):
        ob, lb = dense.forward(q_flat[part.rows], *_gather_keys(part, k_flat, v_flat), False, scale)
        dest = part.destination(tokens)
        out.index_copy_(0, dest, ob.flatten(0, 1))
        lse.index_copy_(0, dest, lb.transpose(1, 2).flatten(0, 1))
    return out[:-1].view(q.shape), lse[:-1].view(batch, sq, hq).transpose(1, 2).contiguous()


def backward(dense, dout, q, k, v, out, lse, start, end, key_offset, key_count, scale: float):
    batch, sq, hq, d = q.shape
    tokens = batch * sq
    q_flat, dout_flat, out_flat = (x.reshape(tokens, hq, d) for x in (q, dout, out))
    lse_flat = lse.transpose(1, 2).reshape(tokens, hq)
    k_flat, v_flat = (x.reshape(-1, *x.shape[2:]) for x in (k, v))
    cdt = compute_dtype(q.dtype)
    dq = q.new_zeros(tokens + 1, hq, d)
    dk = torch.zeros(k_flat.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v_flat.shape, dtype=cdt, device=v.device)
    for part in _plan(q, k, start, end, key_offset, key_count):
        rows = part.rows
        dout_b = dout_flat[rows].mul_(part.valid[..., None, None])
        lse_b = lse_flat[rows].transpose(1, 2).contiguous()
        dqb, dkb, dvb = dense.backward(
            dout_b, q_flat[rows], *_gather_keys(part, k_flat, v_flat), out_flat[rows], lse_b, False, scale
        )
        dq.index_copy_(0, part.destination(tokens), dqb.flatten(0, 1))
        dk.index_add_(0, part.keys, dkb.flatten(0, 1).to(cdt))
        dv.index_add_(0, part.keys, dvb.flatten(0, 1).to(cdt))
    return dq[:-1].view(q.shape), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)
