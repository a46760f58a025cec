"""Token-summed next-token loss, for normalising by the tokens of the whole global batch.

`Flamingo.loss` returns the mean over one micro-batch; averaging such means over micro-batches and
ranks would weight a token in a short micro-batch more than one in a long one. The trainer instead sums
per-token losses here and divides by the label-token count of the entire global batch (all
micro-batches, all ranks). The ignore rule is the model's (flamingo.py, "Label convention"): labels
-100, the `<image>` token and the pad token are ignored; labels are aligned with input_ids and shifted
here. tests/test_train_units.py checks sum / count == Flamingo.loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_targets(labels: torch.Tensor, image_token_id: int, pad_token_id: int | None) -> torch.Tensor:
    """(B, S) labels -> (B, S-1) next-token targets with IGNORE_INDEX where no loss is taken."""
    if labels.dim() != 2 or labels.dtype != torch.long:
        raise ValueError(f"labels must be a (B, S) torch.long tensor, got {tuple(labels.shape)} {labels.dtype}")
    ignore = (labels == IGNORE_INDEX) | (labels == image_token_id)
    if pad_token_id is not None:
        ignore |= labels == pad_token_id
    return labels.masked_fill(ignore, IGNORE_INDEX)[:, 1:]


def count_label_tokens(labels: torch.Tensor, image_token_id: int, pad_token_id: int | None) -> int:
    return int((loss_targets(labels, image_token_id, pad_token_id) != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, image_token_id: int,
                   pad_token_id: int | None) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropy over the label tokens, in fp32."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be (B, S, V) matching labels {tuple(labels.shape)}, got {tuple(logits.shape)}")
    targets = loss_targets(labels, image_token_id, pad_token_id)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def micro_batch_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], image_token_id: int,
                         pad_token_id: int | None) -> torch.Tensor:
    """The trainer's forward of one micro-batch: its summed token loss. The logits go out of scope before the
    caller's backward (cross-entropy saves its own copy), so they are not live at the backward's peak; the
    planner traces this same function, so its memory model holds for what the trainer runs. Packed batches
    (flamingo_fast.data.packing: document_ids, positions, a flat image list) go through as such; batches of
    tiled images (Llama 3.2 Vision) pass their aspect_ratio_ids, and no media_index: that model finds its
    images' spans from the `<image>` tokens itself."""
    packed = "document_ids" in batch
    images = batch.get("images")
    if images is not None and images.shape[0 if packed else 1] == 0:  # no image in the whole batch / any row
        images = None
    if "aspect_ratio_ids" in batch:
        extra = {"aspect_ratio_ids": batch["aspect_ratio_ids"]} if images is not None else {}
    elif packed:
        extra = {"media_index": batch["media_index"], "document_ids": batch["document_ids"],
                 "positions": batch["positions"]}
    else:
        extra = {"media_index": batch["media_index"]}
    logits = model(batch["input_ids"], images, **extra).logits
    return token_loss_sum(logits, batch["labels"], image_token_id, pad_token_id)
