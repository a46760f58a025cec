"""Query-block planning for the torch backend of media_cross_attention.

Because media_index is non-decreasing along a row, the tokens that look at one image form a single
run. Each run is cut into blocks of R rows (R in 16..256, chosen to waste little padding); a block then
visits only the keys of its own image (only_immediate) or of images 0..m (all previous), so the work
scales with S * L instead of S * T_img * L as with a dense mask. Tokens with index -1 are in no block.
(Correctness does not depend on monotonicity: an unsorted row just yields more, shorter runs.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZES = (16, 32, 64, 128, 256)
# Fixed cost of one block (gathering its keys, one more batch entry), in units of one query row.
_BLOCK_OVERHEAD_ROWS = 32


@dataclass
class MediaChunk:
    blocks: torch.Tensor  # (n,) ids of the blocks in this chunk
    key_index: torch.Tensor  # (n,) immediate: b * T_img + m (one image's keys); all previous: b
    num_keys: int  # keys per block: L, or (m + 1) * L for all previous images


@dataclass
class MediaPlan:
    rows: torch.Tensor  # (nblk, R) flat token indices into (B*S); padding slots repeat the block's first token
    valid: torch.Tensor  # (nblk, R) bool: the slot holds a real token of the block
    batch: torch.Tensor  # (nblk,) batch row of each block
    image: torch.Tensor  # (nblk,) media index of each block
    num_media: int
    latents_per_media: int
    only_immediate: bool

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]

    @property
    def block_size(self) -> int:
        return self.rows.shape[1]

    def chunks(self, rows_times_keys_budget: int):
        """Yield MediaChunks whose blocks hold at most the budget of (query rows x keys) per head."""
        if self.num_blocks == 0:
            return
        length = self.latents_per_media
        if self.only_immediate:
            groups = [(torch.arange(self.num_blocks, device=self.rows.device), length)]
        else:  # all previous images: blocks of one image share a key prefix length
            groups = [
                ((self.image == m).nonzero().squeeze(1), (m + 1) * length) for m in torch.unique(self.image).tolist()
            ]
        per_chunk_of = lambda keys: max(1, rows_times_keys_budget // (self.block_size * keys))  # noqa: E731
        for blocks, num_keys in groups:
            step = per_chunk_of(num_keys)
            for i in range(0, blocks.shape[0], step):
                ids = blocks[i : i + step]
                key_index = self.batch[ids] * self.num_media + self.image[ids] if self.only_immediate else self.batch[ids]
                yield MediaChunk(ids, key_index, num_keys)


def plan_media_blocks(media_index: torch.Tensor, num_media: int, latents_per_media: int, only_immediate: bool) -> MediaPlan:
    batch, seq = media_index.shape
    device = media_index.device
    mi = media_index.long()
    pos = torch.arange(seq, device=device)
    new_run = torch.ones_like(mi, dtype=torch.bool)
    new_run[:, 1:] = mi[:, 1:] != mi[:, :-1]
    offset = pos - torch.where(new_run, pos, 0).cummax(dim=1).values  # position inside its run
    valid = mi >= 0

    # Pick the block size with the least padded rows plus per-block overhead (one host sync).
    counts = torch.stack([(valid & (offset % r == 0)).sum() for r in BLOCK_SIZES]).tolist()
    r = min(zip(BLOCK_SIZES, counts), key=lambda rc: rc[1] * (rc[0] + _BLOCK_OVERHEAD_ROWS))[0]

    valid = valid.reshape(-1)
    new_block = valid & (offset.reshape(-1) % r == 0)
    starts = new_block.nonzero().squeeze(1)  # flat index of each block's first token
    num_blocks = starts.shape[0]
    block_id = torch.cumsum(new_block, 0) - 1
    total = batch * seq
    rows = starts[:, None] + torch.arange(r, device=device)
    clamped = rows.clamp(max=max(total - 1, 0))
    ids = torch.arange(num_blocks, device=device)[:, None]
    slot_valid = (rows < total) & (block_id[clamped] == ids) & valid[clamped]
    return MediaPlan(
        rows=torch.where(slot_valid, rows, starts[:, None]),
        valid=slot_valid,
        batch=starts // seq,
        image=mi.reshape(-1)[starts],
        num_media=num_media,
        latents_per_media=latents_per_media,
        only_immediate=only_immediate,
    )
