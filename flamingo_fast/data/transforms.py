"""Pillow-based image decoding and the resize + normalise transform feeding the vision encoder.

Decoding problems surface as `BadSampleError("corrupt_image" | "missing_image")` so that pipelines can
skip and count them instead of crashing.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from flamingo_fast.data.sample import BadSampleError

# CLIP's normalisation: the default because the vision encoder loads CLIP weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes (jpg/png/webp...) into a fully loaded RGB PIL image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() forces the full decode now: truncated files fail here, not later in a worker.
            image.load()
            return image.convert("RGB")
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, struct.error...) for bad bytes
        raise BadSampleError("corrupt_image", f"{name}: {type(error).__name__}: {error}") from None


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read and decode an image file; a missing file is `missing_image`, bad bytes are `corrupt_image`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise BadSampleError("missing_image", f"{path}: {error.strerror or error}") from None
    return decode_image(data, str(path))


class ImageTransform:
    """Resize (shortest side, bicubic) + centre crop to `image_size`, scale to [0,1], normalise.

    __call__ returns float32 (F, C, H, W): F = 1 for a single image, F = len(frames) for video.
    Float tensors are treated as already transformed and only checked; uint8 tensors are raw pixels.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 entries (RGB), got mean={mean!r} std={std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std entries must be positive, got {std!r}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        size = self.image_size
        width, height = image.size
        if (width, height) == (size, size):
            return image
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def frame(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> normalised float32 (C, H, W)."""
        pixels = np.asarray(self.resize(image), dtype=np.uint8)  # (H, W, 3)
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self._mean) / self._std

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.frame(image).unsqueeze(0)
        if isinstance(image, (list, tuple)):
            return torch.stack([self.frame(f) for f in image])
        if isinstance(image, torch.Tensor):
            frames = image if image.dim() == 4 else image.unsqueeze(0) if image.dim() == 3 else None
            if frames is None or frames.shape[1] != 3:
                raise ValueError(f"image tensor must be (3,H,W) or (F,3,H,W), got shape {tuple(image.shape)}")
            if frames.dtype == torch.uint8:
                return torch.stack([self.frame(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in frames])
            if not frames.is_floating_point():
                raise TypeError(f"image tensor must be uint8 (raw pixels) or float (transformed), got {frames.dtype}")
            if frames.shape[-2:] != (self.image_size, self.image_size):
                raise ValueError(
                    f"float image tensors are used as already transformed and must be "
                    f"{self.image_size}x{self.image_size}, got shape {tuple(image.shape)}"
                )
            return frames.float()
        raise TypeError(f"image must be a PIL image, a list of PIL frames or a tensor, got {type(image).__name__}")
