"""The one sample type every source yields, and Flamingo's prompt formats.

A `Sample` is text with one `<image>` marker per image, plus those images in order. Images may be
PIL images (one frame), lists of PIL images (video frames, F > 1), or tensors:
uint8 tensors are raw pixels (C,H,W) / (F,C,H,W) and go through the image transform like PIL images;
float tensors are taken as already transformed (normalised, at the configured size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"

TASKS = ("caption", "vqa", "interleaved")

# Prompt styles of the Flamingo paper's evaluation protocol (also used by OpenFlamingo).
CAPTION_PROMPT = "Output:"
VQA_PROMPT = "Question:{question} Short answer:"


class BadSampleError(ValueError):
    """A record that cannot become a usable sample. `reason` is a short counter key, e.g. "corrupt_image"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _is_image(value: Any) -> bool:
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() in (3, 4)
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(isinstance(frame, Image.Image) for frame in value)
    return False


@dataclass
class Sample:
    """Text with `<image>` markers plus its images.

    text:       e.g. "<image>Output:a red circle<|endofchunk|>"
    images:     one entry per `<image>` marker, in order (see module docstring for accepted types)
    id:         any stable identifier (for evaluation / debugging)
    task:       "caption" | "vqa" | "interleaved" or None
    answers:    VQA ground-truth answers (VQAv2 style: the 10 human answers)
    references: reference captions for captioning metrics
    loss_start: character offset into `text`; tokens that start before it get label -100. Used to
                train only on the answer of a prompt ("...Short answer:" -> "red<|endofchunk|>").
                None: train on everything after the first image.
    meta:       free-form extra fields from the source
    """

    text: str
    images: list = field(default_factory=list)
    id: str | None = None
    task: str | None = None
    answers: list[str] | None = None
    references: list[str] | None = None
    loss_start: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Sample.text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.images, list):
            raise TypeError(f"Sample.images must be a list, got {type(self.images).__name__}")
        for i, image in enumerate(self.images):
            if not _is_image(image):
                raise TypeError(
                    f"Sample.images[{i}] must be a PIL image, a non-empty list of PIL frames, or a tensor "
                    f"(C,H,W)/(F,C,H,W); got {type(image).__name__}"
                )
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Sample.task must be one of {TASKS} or None, got {self.task!r}")
        if self.loss_start is not None and not 0 <= self.loss_start <= len(self.text):
            raise ValueError(f"Sample.loss_start must be in [0, len(text)={len(self.text)}], got {self.loss_start}")
        markers = self.num_markers
        if markers != len(self.images):
            # Bad data rather than a programming error in most pipelines (e.g. a caption that itself
            # contains "<image>"), so the reason doubles as the skip-counter key.
            raise BadSampleError(
                "image_marker_mismatch",
                f"sample {self.id!r} has {markers} {IMAGE_TOKEN} markers but {len(self.images)} images",
            )

    @property
    def num_markers(self) -> int:
        return self.text.count(IMAGE_TOKEN)

    @property
    def prompt(self) -> str:
        """The text a model is given at evaluation time: everything before `loss_start`."""
        return self.text if self.loss_start is None else self.text[: self.loss_start]


def caption_text(caption: str | None) -> tuple[str, int]:
    """Flamingo caption format `<image>Output:{caption}<|endofchunk|>`; returns (text, loss_start).

    caption=None gives the evaluation prompt alone (`<image>Output:`), loss_start at its end.
    """
    prompt = IMAGE_TOKEN + CAPTION_PROMPT
    if caption is None:
        return prompt, len(prompt)
    return f"{prompt}{caption.strip()}{EOC_TOKEN}", len(prompt)


def vqa_text(question: str, answer: str | None) -> tuple[str, int]:
    """Flamingo VQA format `<image>Question:{q} Short answer:{a}<|endofchunk|>`; returns (text, loss_start)."""
    prompt = IMAGE_TOKEN + VQA_PROMPT.format(question=question.strip())
    if answer is None:
        return prompt, len(prompt)
    return f"{prompt}{answer.strip()}{EOC_TOKEN}", len(prompt)
