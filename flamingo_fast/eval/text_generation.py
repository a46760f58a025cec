"""Strings and images in, strings out: prompt tokenisation, left padding, image stacking, decoding.

    texts = generate_text(model, tokenizer, ["<image>Output:"], [[pil_image]], num_beams=3)

Prompts are tokenised like the training data (bos + text, `<image>` markers as their own ids) and
left-padded; each prompt's images (PIL images, frame lists or tensors, as in `flamingo_fast.data.Sample`)
go through the model's transform (`flamingo_fast.data.transform_for`: the CLIP-normalising `ImageTransform`
at the model's image size, or Llama 3.2 Vision's `TileTransform`, which adds each image's aspect ratio id),
rows with fewer images are zero-padded (those slots are never attended: a row's media spans only reach its
own images; their aspect ratio id is 0).
Generation stops at `<|endofchunk|>` or the tokenizer's eos and never produces its pad or bos token.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from flamingo_fast.data.sample import IMAGE_TOKEN
from flamingo_fast.data.tiling import TileTransform, transform_for
from flamingo_fast.data.tokenizer import Tokenizer
from flamingo_fast.data.transforms import ImageTransform
from flamingo_fast.models.flamingo import Flamingo
from flamingo_fast.models.generate import generate


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, S) long, left-padded with tokenizer.pad_id."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of str")
    rows = [[tokenizer.bos_id] + tokenizer.encode(text) for text in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    return ids, mask


def media_inputs(images: Sequence[Sequence[Any]], transform: ImageTransform | TileTransform) -> dict[str, torch.Tensor]:
    """Per-row image lists -> the model's media keyword arguments: {} when no row has an image, else "images"
    (B, T_max, F, C, H, W) float32 (zero where a row has fewer), and with a TileTransform "aspect_ratio_ids"
    (B, T_max) long (0 there)."""
    tiled = isinstance(transform, TileTransform)
    per_row = [[transform(image) for image in row] for row in images]
    t_max = max((len(row) for row in per_row), default=0)
    if t_max == 0:
        return {}
    frames = {(x[0] if tiled else x).shape[0] for row in per_row for x in row}
    if len(frames) != 1:
        raise ValueError(f"all images of a batch need the same number of frames, got {sorted(frames)}")
    example = next(x[0] if tiled else x for row in per_row for x in row)
    out = torch.zeros(len(per_row), t_max, *example.shape)
    ratios = torch.zeros(len(per_row), t_max, dtype=torch.long)
    for r, row in enumerate(per_row):
        for t, item in enumerate(row):
            out[r, t] = item[0] if tiled else item
            if tiled:
                ratios[r, t] = item[1]
    return {"images": out, "aspect_ratio_ids": ratios} if tiled else {"images": out}


def prompt_batch(tokenizer: Tokenizer, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                 transform: ImageTransform | TileTransform
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(input_ids, attention_mask, media keyword arguments: `media_inputs`) of prompts with their images,
    checked: `images[i]` holds prompt i's images, one per `<image>` marker, in order."""
    if len(images) != len(prompts):
        raise ValueError(f"images must hold one list per prompt: {len(prompts)} prompts, {len(images)} image lists")
    for i, (text, row) in enumerate(zip(prompts, images)):
        if text.count(IMAGE_TOKEN) != len(row):
            raise ValueError(f"prompt {i} has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers but {len(row)} images")
    ids, mask = encode_prompts(tokenizer, prompts)
    return ids, mask, media_inputs(images, transform)


def never_generated(tokenizer: Tokenizer, stop_ids: Sequence[int]) -> list[int]:
    """Padding and bos mean nothing inside generated text (and decode to ""): never generate them, unless
    one doubles as a stop token (Llama tokenizers without a pad token pad with eos)."""
    return sorted({tokenizer.pad_id, tokenizer.bos_id} - set(stop_ids))


@torch.no_grad()
def generate_text(model: Flamingo, tokenizer: Tokenizer, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                  transform: Optional[ImageTransform | TileTransform] = None, **generate_kwargs: Any) -> list[str]:
    """Continuation text of each prompt (see flamingo_fast.models.generate.generate for generate_kwargs).
    `images[i]` holds prompt i's images, one per `<image>` marker, in order."""
    transform = transform or transform_for(model.cfg.vision)
    ids, mask, media = prompt_batch(tokenizer, prompts, images, transform)
    device = model.lm.embed_tokens.weight.device
    pixel_dtype = next(model.vision.parameters()).dtype
    media = {name: x.to(device=device, dtype=pixel_dtype if x.is_floating_point() else x.dtype)
             for name, x in media.items()}
    generate_kwargs.setdefault("eos_token_ids", [tokenizer.eoc_token_id, tokenizer.eos_id])
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_id)
    generate_kwargs.setdefault("suppress_token_ids", never_generated(tokenizer, generate_kwargs["eos_token_ids"]))
    out = generate(model, ids.to(device), attention_mask=mask.to(device), **media, **generate_kwargs)
    return [tokenizer.decode(tokens).strip() for tokens in out.tokens]
