"""Turn `Sample`s into model batches.

Two steps, so the heavy one can run in parallel pipeline workers:
- `Collator.encode(sample) -> EncodedSample`: tokenize, build labels, transform images (per sample);
- `Collator.collate(encoded) -> dict`: pad into tensors (per batch).
`Collator(samples)` does both. With packing (data/packing.py), `collate` is replaced by
`packing.collate_packed`, which puts several encoded samples in each row of exactly max_length tokens and adds
per-token `positions` / `document_ids` (layout in packing.py's docstring); this module's padded layout below
is the unpacked one (evaluation, generation, packing=False).

Batch dict (B rows, S = longest row, T = most images in a row):
    input_ids      (B, S) long, padded with tokenizer.pad_id (right padding by default)
    attention_mask (B, S) long, 1 = real token
    labels         (B, S) long = input_ids, with -100 at padding, `<image>` tokens, everything before a
                   row's first `<image>` (bos included) and, for samples with `loss_start`, every token
                   starting before that character offset (the prompt of a VQA/caption sample).
                   Labels are not shifted: position i holds token i (HF convention; the model shifts).
    media_index    (B, S) long = cumsum(input_ids == <image>) - 1 (-1 before the first image)
    images         (B, T, F, C, H, W) float32, rows with fewer images zero-padded
    num_images     (B,) long
    aspect_ratio_ids (B, T) long, only with a TileTransform (Llama 3.2 Vision): each image's tile arrangement
                   (data/tiling.py), 0 for padding slots; images then hold F = max_tiles tiles, zero past the real ones
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flamingo_fast.data.sample import BadSampleError, Sample
from flamingo_fast.data.tiling import TileTransform
from flamingo_fast.data.tokenizer import Tokenizer
from flamingo_fast.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """One tokenized sample with transformed images, ready to be padded into a batch."""

    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX where not trained on
    images: torch.Tensor  # (T, F, C, H, W) float32
    id: str | None = None
    task: str | None = None
    source: str | None = None  # the pipeline source it came from (per-source skip accounting)
    aspect_ratio_ids: torch.Tensor | None = None  # (T,) long, tiled images (TileTransform) only


class Collator:
    """Tokenizes, transforms and pads samples (see module docstring for the batch layout).

    max_length:   truncate each row to this many tokens (images whose `<image>` was cut are dropped)
    add_bos/eos:  prepend bos / append eos (eos is trained on)
    mask_prompt:  honour `Sample.loss_start` (train only on the answer of prompted samples)
    padding_side: "right" for training, "left" for batched generation
    eoc_as_eos:   write `<|endofchunk|>` as the tokenizer's eos, in ids and labels: a model whose special tokens
                  are input-only (LMConfig.special_logits=False, Llama 3.2 Vision) cannot predict it, so its
                  answers end with eos instead (where generation stops too)
    transform:    an ImageTransform, or a TileTransform (tiled images plus aspect_ratio_ids)
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        transform: ImageTransform | None = None,
        max_length: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        mask_prompt: bool = True,
        padding_side: str = "right",
        eoc_as_eos: bool = False,
    ):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a flamingo_fast.data.Tokenizer, got {type(tokenizer).__name__}")
        if transform is None:
            if image_size is None:
                raise ValueError("pass image_size (or a transform)")
            transform = ImageTransform(image_size, mean, std)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (bos + one token) or None, got {max_length}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if eoc_as_eos and tokenizer.pad_id == tokenizer.eos_id:
            raise ValueError("eoc_as_eos ends answers with eos, but this tokenizer pads with eos (it has no pad "
                             "token), so the loss would ignore every answer's end: name a pad token in its "
                             "special_tokens_map.json")
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_length = max_length
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.mask_prompt = mask_prompt
        self.padding_side = padding_side
        self.eoc_as_eos = eoc_as_eos

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    def encode(self, sample: Sample) -> EncodedSample:
        """Tokenize + label + transform one sample. Raises BadSampleError for unusable samples."""
        tok = self.tokenizer
        ids, offsets = tok.encode_with_offsets(sample.text)
        if self.eoc_as_eos:
            ids = [tok.eos_id if t == tok.eoc_token_id else t for t in ids]
        image_positions = [i for i, t in enumerate(ids) if t == tok.image_token_id]
        if len(image_positions) != len(sample.images):
            raise BadSampleError(
                "image_marker_mismatch",
                f"sample {sample.id!r} tokenizes to {len(image_positions)} <image> tokens for {len(sample.images)} images",
            )
        first_image = image_positions[0] if image_positions else len(ids)
        loss_start = sample.loss_start if self.mask_prompt and sample.loss_start is not None else -1
        labels = [
            IGNORE_INDEX if (i <= first_image or t == tok.image_token_id or offsets[i][0] < loss_start) else t
            for i, t in enumerate(ids)
        ]
        if self.add_bos:
            ids, labels = [tok.bos_id] + ids, [IGNORE_INDEX] + labels
        if self.add_eos:
            ids, labels = ids + [tok.eos_id], labels + [tok.eos_id]
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        kept_images = sum(1 for t in ids if t == tok.image_token_id)

        kept = sample.images[:kept_images]
        aspect_ratio_ids = None
        if isinstance(self.transform, TileTransform):
            tiled = [self.transform(image) for image in kept]
            frames = [tiles for tiles, _ in tiled]
            aspect_ratio_ids = torch.tensor([ratio for _, ratio in tiled], dtype=torch.long)
        else:
            frames = [self.transform(image) for image in kept]
        if len({f.shape[0] for f in frames}) > 1:
            raise BadSampleError(
                "frame_count_mismatch", f"sample {sample.id!r} mixes frame counts {[f.shape[0] for f in frames]}"
            )
        size = self.transform.image_size
        empty_frames = self.transform.max_tiles if aspect_ratio_ids is not None else 1
        images = torch.stack(frames) if frames else torch.zeros(0, empty_frames, 3, size, size)
        return EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            images=images,
            id=sample.id,
            task=sample.task,
            aspect_ratio_ids=aspect_ratio_ids,
        )

    def collate(self, items: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        return pad_batch(items, self.tokenizer.pad_id, self.tokenizer.image_token_id, self.padding_side)

    def __call__(self, batch: Sequence[Sample | EncodedSample]) -> dict[str, torch.Tensor]:
        return self.collate([item if isinstance(item, EncodedSample) else self.encode(item) for item in batch])


def pad_batch(items: Sequence[EncodedSample], pad_id: int, image_token_id: int, padding_side: str = "right",
              seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One sample per row, padded to `seq_len` (None: the longest row): the batch layout of the module
    docstring. `Collator.collate` with its tokenizer's ids; also the padded baseline of bench/packing.py."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    batch_size = len(items)
    longest = max(item.input_ids.numel() for item in items)
    if seq_len is None:
        seq_len = longest
    elif seq_len < longest:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest row ({longest} tokens)")
    max_images = max(item.images.shape[0] for item in items)
    tiled = {item.aspect_ratio_ids is not None for item in items}
    if len(tiled) > 1:
        raise ValueError("a batch mixes tiled images (with aspect_ratio_ids) and plain ones")
    frame_counts = {item.images.shape[1] for item in items if item.images.shape[0] > 0}
    if len(frame_counts) > 1:
        raise ValueError(f"all images in a batch must have the same frame count F, got {sorted(frame_counts)}")
    num_frames = frame_counts.pop() if frame_counts else 1
    channels, height, width = items[0].images.shape[2:]

    input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    images = torch.zeros(batch_size, max_images, num_frames, channels, height, width)
    num_images = torch.zeros(batch_size, dtype=torch.long)
    for row, item in enumerate(items):
        length = item.input_ids.numel()
        span = slice(0, length) if padding_side == "right" else slice(seq_len - length, seq_len)
        input_ids[row, span] = item.input_ids
        labels[row, span] = item.labels
        attention_mask[row, span] = 1
        count = item.images.shape[0]
        images[row, :count] = item.images
        num_images[row] = count
    media_index = torch.cumsum(input_ids == image_token_id, dim=1) - 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "media_index": media_index,
        "images": images,
        "num_images": num_images,
    }
    if tiled.pop():
        batch["aspect_ratio_ids"] = torch.zeros(batch_size, max_images, dtype=torch.long)
        for row, item in enumerate(items):
            batch["aspect_ratio_ids"][row, : item.aspect_ratio_ids.numel()] = item.aspect_ratio_ids
    return batch
