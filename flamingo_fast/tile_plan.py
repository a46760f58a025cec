"""Tile plan of the media cross-attention mask (see csrc/include/flamingo_fast/media_tile_plan.h).

For each query block of `block_q` text tokens: the [begin, end) range of keys it must visit; for each key
block of `block_k` latents: the [begin, end) range of query rows that visit it. The attention kernels skip
every other tile. Computed by `_C` on the tensor's device (on CUDA without a host sync).
"""

from __future__ import annotations

import torch

from flamingo_fast import native


def plan_media_tiles(media_index: torch.Tensor, num_keys: int, latents_per_media: int = 64, block_q: int = 128,
                     block_k: int = 128, only_immediate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q_plan (B, ceil(S/block_q), 2), k_plan (B, ceil(num_keys/block_k), 2)) int32 ranges."""
    module = native.load()
    if module is None:
        raise RuntimeError(f"flamingo_fast._C is not built ({native.import_error()}); run `make build`")
    return module.plan_media_tiles(media_index, num_keys, latents_per_media, block_q, block_k, only_immediate)
