"""`MediaSpans`: which images each text token sees and which keys each image has.

One descriptor for the model, the ops and (later) the kernels. Token (b, t) attends to images
[start, end) of row b (row-local indices j < T), and image j's valid keys are
k[b, key_offset[b, j] : key_offset[b, j] + key_count[b, j]]; keys of no image (padding tiles) are never
attended. start == end: the token sees nothing (output 0, lse -inf, gradient 0). Image key ranges of one
row must not overlap.

Special cases: Flamingo's media_index (`from_media_index`: range [m, m + 1), or [0, m + 1) for all previous
images, L keys per image) and Llama 3.2 Vision's image groups (`from_image_groups`: ranges from the
`<|image|>` tokens, key counts = valid tiles x tokens per tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import register_dataclass


@dataclass
class MediaSpans:
    start: Tensor  # (B, S) int32/int64: first image token (b, t) sees
    end: Tensor  # (B, S): one past its last image; start == end: no image
    key_offset: Tensor  # (B, T) int: first key of image j along k/v's sequence dim
    key_count: Tensor  # (B, T) int >= 0: number of valid keys of image j

    @property
    def num_media(self) -> int:
        return self.key_count.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.start, self.end, self.key_offset, self.key_count

    @staticmethod
    def from_media_index(media_index: Tensor, num_media: int, latents_per_media: int,
                         only_immediate: bool = True) -> MediaSpans:
        """Flamingo's rule: index m sees [m, m + 1) (only_immediate) or [0, m + 1); -1 gives [0, 0).
        Image j's keys are [j * L, (j + 1) * L)."""
        start = media_index.clamp_min(0) if only_immediate else torch.zeros_like(media_index)
        offset = torch.arange(num_media, dtype=media_index.dtype, device=media_index.device) * latents_per_media
        offset = offset.repeat(media_index.shape[0], 1)
        return MediaSpans(start, media_index + 1, offset, torch.full_like(offset, latents_per_media))

    @staticmethod
    def from_image_groups(image_token_mask: Tensor, key_count: Tensor, keys_per_media: int) -> MediaSpans:
        """Llama 3.2 Vision's rule (transformers' `get_cross_attention_token_mask`); see `continue_image_groups`.

        image_token_mask (B, S) bool marks `<|image|>` tokens, the j-th of a row standing for image j; key_count
        (B, T) the valid keys of each image (0 for padding images); image j's keys start at j * keys_per_media
        (images at a fixed stride, padding tiles included).
        """
        start, end, _ = continue_image_groups(image_token_mask, ImageGroupState.initial(image_token_mask))
        return MediaSpans.strided(start, end, key_count, keys_per_media)

    @staticmethod
    def strided(start: Tensor, end: Tensor, key_count: Tensor, keys_per_media: int) -> MediaSpans:
        """Spans over images stored at a fixed stride: image j's keys start at j * keys_per_media."""
        offset = torch.arange(key_count.shape[1], dtype=key_count.dtype, device=key_count.device) * keys_per_media
        return MediaSpans(start, end, offset.repeat(key_count.shape[0], 1), key_count)


register_dataclass(MediaSpans)


class ImageGroupState(NamedTuple):
    """Per row, what `continue_image_groups` needs to extend the spans by more tokens (e.g. decoding)."""

    seen: Tensor  # (B,) int64: image tokens so far
    group_start: Tensor  # (B,) int64: index of the first image of the current group (0 before any image)
    after_image: Tensor  # (B,) bool: the last token was an image token

    @staticmethod
    def initial(like: Tensor) -> ImageGroupState:
        """The state before a row's first token, for a (B, ...) tensor `like`."""
        zeros = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        return ImageGroupState(zeros, zeros.clone(), torch.zeros_like(zeros, dtype=torch.bool))


def continue_image_groups(image_token_mask: Tensor, state: ImageGroupState) -> tuple[Tensor, Tensor, ImageGroupState]:
    """Spans (start, end) (B, n) of n more tokens after `state`, and the state after them.

    Image j is seen from its own token on; consecutive image tokens form a group whose images all stay visible
    until the next group starts. So token t sees [first image of the latest group, number of image tokens <= t),
    and tokens before a row's first image token see [0, 0).
    """
    mask = image_token_mask.bool()
    end = state.seen[:, None] + mask.long().cumsum(1)
    if mask.shape[1] == 0:
        return end, end, state
    previous = torch.cat([state.after_image[:, None], mask[:, :-1]], dim=1)
    # Group starts only grow along a row, so carrying the latest one forward is a running maximum.
    start = torch.where(mask & ~previous, end - 1, state.group_start[:, None]).cummax(dim=1).values
    return start, end, ImageGroupState(end[:, -1], start[:, -1], mask[:, -1])


def dense_mask(spans: MediaSpans, num_keys: int) -> Tensor:
    """(B, S, num_keys) bool: token (b, t) sees key i (reference backend and tests; materialises S x Sk)."""
    key = torch.arange(num_keys, device=spans.start.device)
    offset, count = spans.key_offset.long()[:, :, None], spans.key_count.long()[:, :, None]
    image_has_key = (key >= offset) & (key < offset + count)  # (B, T, Sk)
    image = torch.arange(spans.num_media, device=spans.start.device)
    sees_image = (image >= spans.start.long()[:, :, None]) & (image < spans.end.long()[:, :, None])  # (B, S, T)
    return torch.einsum("bst,btk->bsk", sees_image.double(), image_has_key.double()) > 0
