"""Llama 3.2 Vision's image processor as a transform: an image becomes up to `max_tiles` tiles plus its aspect ratio id.

The steps are transformers' `MllamaImageProcessor` (the PIL backend, which the tests compare against pixel for
pixel), so fine-tuning sees what the released checkpoints were trained on:

    canvas   among the supported (rows, cols) tile arrangements, the one that fits the image with the smallest
             upscale (or, if it must shrink, the largest downscale); ties: the smallest area
    resize   keep the aspect ratio, no side below one tile, inside the canvas (Pillow, bilinear)
    pad      with black to the whole canvas, at the bottom and right
    pixels   / 255, then (x - mean) / std per channel (CLIP's mean/std, as Llama 3.2 Vision's processor config)
    tiles    the canvas cut into rows x cols tiles, row by row, then zero tiles up to max_tiles

The aspect ratio id is 1 + the arrangement's index in `aspect_ratios` (0 is left for padding image slots), as
`VisionConfig.aspect_ratios` numbers them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from flamingo_fast.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform


def optimal_canvas(height: int, width: int, aspect_ratios: Sequence[tuple[int, int]], tile_size: int) -> int:
    """Index into `aspect_ratios` of the canvas an image of height x width goes on (module docstring; transformers'
    `get_optimal_tiled_canvas`)."""
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in aspect_ratios]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [i for i, s in enumerate(scales) if s == chosen]
    return min(candidates, key=lambda i: aspect_ratios[i][0] * aspect_ratios[i][1])


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """(height, width) the image is resized to: aspect ratio kept, each side clamped to [tile_size, canvas side]
    first (transformers' `get_image_size_fit_to_canvas`)."""
    target_height = min(max(height, tile_size), canvas_height)
    target_width = min(max(width, tile_size), canvas_width)
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' processors convert)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


class TileTransform:
    """One image -> (tiles (max_tiles, 3, tile_size, tile_size) float32, aspect ratio id >= 1).

    Takes PIL images or uint8 pixel tensors (3, H, W). Float tensors are refused: an already transformed
    image has lost its aspect ratio id, which the tiled encoder needs."""

    def __init__(self, tile_size: int, max_tiles: int, aspect_ratios: Sequence[Sequence[int]],
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if not isinstance(tile_size, int) or tile_size <= 0 or not isinstance(max_tiles, int) or max_tiles <= 0:
            raise ValueError(f"tile_size and max_tiles must be positive ints, got {tile_size!r}, {max_tiles!r}")
        ratios = [tuple(r) for r in aspect_ratios]
        if not ratios or not all(len(r) == 2 and min(r) >= 1 and r[0] * r[1] <= max_tiles for r in ratios):
            raise ValueError(f"aspect_ratios must be (rows, cols) pairs of at most max_tiles={max_tiles} tiles, "
                             f"got {aspect_ratios!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (RGB), std > 0; got mean={mean!r} std={std!r}")
        self.image_size = tile_size  # the Collator's name for the side of what the encoder sees
        self.max_tiles = max_tiles
        self.aspect_ratios = ratios
        # float32: transformers normalises float32 pixels with float32 mean and std
        self.mean = np.array(mean, dtype=np.float32)
        self.std = np.array(std, dtype=np.float32)

    @classmethod
    def from_config(cls, vision, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> "TileTransform":
        """For a models.config.VisionConfig of kind "tiled"."""
        return cls(vision.image_size, vision.max_tiles, vision.aspect_ratios, mean, std)

    def tile(self, image: Image.Image) -> tuple[torch.Tensor, int]:
        image = to_rgb(image)
        size = self.image_size
        index = optimal_canvas(image.height, image.width, self.aspect_ratios, size)
        rows, cols = self.aspect_ratios[index]
        height, width = fit_to_canvas(image.height, image.width, rows * size, cols * size, size)
        canvas = np.zeros((rows * size, cols * size, 3), dtype=np.uint8)
        canvas[:height, :width] = np.asarray(image.resize((width, height), Image.BILINEAR))
        # transformers' arithmetic: rescale in float64, store float32, normalise in float32 (numpy: ~10x faster
        # than torch on these small arrays)
        pixels = (canvas.astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels -= self.mean
        pixels /= self.std
        out = np.zeros((self.max_tiles, 3, size, size), dtype=np.float32)
        tiles = pixels.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3)  # (rows, cols, 3, size, size)
        out[: rows * cols] = tiles.reshape(-1, 3, size, size)
        return torch.from_numpy(out), index + 1

    def __call__(self, image) -> tuple[torch.Tensor, int]:
        if isinstance(image, Image.Image):
            return self.tile(image)
        if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
            return self.tile(Image.fromarray(image.permute(1, 2, 0).numpy()))
        got = (f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
               else type(image).__name__)
        raise TypeError(f"the tiled vision encoder takes one still image per <image>: a PIL image or uint8 pixels "
                        f"(3, H, W), got {got}")


def transform_for(vision, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> ImageTransform | TileTransform:
    """The image transform a models.config.VisionConfig needs: tiles (Llama 3.2 Vision), else resize + crop."""
    if vision.kind == "tiled":
        return TileTransform.from_config(vision, mean, std)
    return ImageTransform(vision.image_size, mean, std)
