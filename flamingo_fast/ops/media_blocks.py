"""Query-block planning for the torch backend of media_cross_attention.

Because media_index is non-decreasing along a row, the tokens that look at one image form one run of
consecutive positions. Each run is cut into blocks of MAX_BLOCK rows plus one last block rounded up to a
multiple of QUANTUM rows, so a run wastes fewer than QUANTUM padding rows and needs the fewest blocks
(each block gathers its own copy of the keys). Blocks of equal size are batched together. A block visits
only the keys of its own image (only_immediate) or of images 0..m (all previous), so the work scales
with S * L instead of S * T_img * L as with a dense mask. Tokens with index -1 are in no block.
(Correctness does not depend on monotonicity: an unsorted row just yields more, shorter runs.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BLOCK = 256
QUANTUM = 16


@dataclass
class BlockSet:
    """Blocks of one size R."""

    rows: torch.Tensor  # (n, R) flat token indices into (B*S); padding slots repeat the block's first token
    valid: torch.Tensor  # (n, R) bool: the slot holds a real token of the block
    batch: torch.Tensor  # (n,) batch row of each block
    image: torch.Tensor  # (n,) media index of each block


@dataclass
class MediaChunk:
    rows: torch.Tensor  # (n, R) as in BlockSet
    valid: torch.Tensor  # (n, R)
    key_index: torch.Tensor  # (n,) immediate: b * T_img + m (one image's keys); all previous: b
    num_keys: int  # keys per block: L, or (m + 1) * L for all previous images


@dataclass
class MediaPlan:
    block_sets: list[BlockSet]
    num_media: int
    latents_per_media: int
    only_immediate: bool

    def chunks(self, rows_times_keys_budget: int):
        """Yield MediaChunks holding at most the budget of (query rows x keys) per head."""
        length = self.latents_per_media
        for bs in self.block_sets:
            if self.only_immediate:
                groups = [(None, length)]
            else:  # all previous images: blocks of one image share a key prefix length
                groups = [((bs.image == m).nonzero().squeeze(1), (m + 1) * length) for m in bs.image.unique().tolist()]
            step_rows = bs.rows.shape[1]
            for ids, num_keys in groups:
                rows, valid, batch, image = (
                    (bs.rows, bs.valid, bs.batch, bs.image) if ids is None
                    else (bs.rows[ids], bs.valid[ids], bs.batch[ids], bs.image[ids])
                )
                key_index = batch * self.num_media + image if self.only_immediate else batch
                step = max(1, rows_times_keys_budget // (step_rows * num_keys))
                for i in range(0, rows.shape[0], step):
                    yield MediaChunk(rows[i : i + step], valid[i : i + step], key_index[i : i + step], num_keys)


def token_runs(*index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of consecutive tokens of one row on which every (B, S) tensor in `index` is constant, over the
    flattened B*S tokens -> (run of each token, first token of each run, length of each run)."""
    new_run = torch.ones(index[0].shape, dtype=torch.bool, device=index[0].device)  # each row starts a new run
    new_run[:, 1:] = torch.stack([x[:, 1:] != x[:, :-1] for x in index]).any(dim=0)
    new_run = new_run.reshape(-1)
    run_id = torch.cumsum(new_run, 0) - 1
    run_first = new_run.nonzero().squeeze(1)
    return run_id, run_first, torch.bincount(run_id, minlength=run_first.shape[0])


def _block_start_offset(offset, run_length):
    """Offset (inside its run) of the first token of each token's block, and that block's size."""
    full = run_length // MAX_BLOCK * MAX_BLOCK
    in_full = offset < full
    last_size = (run_length - full + QUANTUM - 1) // QUANTUM * QUANTUM
    start = torch.where(in_full, offset // MAX_BLOCK * MAX_BLOCK, full)
    return start, torch.where(in_full, MAX_BLOCK, last_size)


def plan_media_blocks(
    media_index: torch.Tensor, num_media: int, latents_per_media: int, only_immediate: bool
) -> MediaPlan:
    """Blocks of consecutive tokens that share one image, grouped by block size."""
    batch, seq = media_index.shape
    device = media_index.device
    run_id, run_first, run_lengths = token_runs(media_index)
    mi = media_index.long().reshape(-1)
    run_length = run_lengths[run_id]
    offset = torch.arange(batch * seq, device=device) - run_first[run_id]
    block_offset, size = _block_start_offset(offset, run_length)
    starts_block = (offset == block_offset) & (mi >= 0)

    block_sets = []
    for r in size[starts_block].unique().tolist():
        starts = (starts_block & (size == r)).nonzero().squeeze(1)
        length = torch.clamp(run_length[starts] - offset[starts], max=r)  # real tokens in each block
        slot = torch.arange(r, device=device)
        valid = slot < length[:, None]
        rows = torch.where(valid, starts[:, None] + slot, starts[:, None])
        block_sets.append(BlockSet(rows, valid, starts // seq, mi[starts]))
    return MediaPlan(block_sets, num_media, latents_per_media, only_immediate)
