"""Step metrics: model FLOPs and MFU, and the sinks (a rich console line per log step + metrics.jsonl).

FLOPs (matmuls and attention; embeddings lookups, norms and elementwise ops are not counted):
- A weight matrix applied to n tokens costs 2 n params FLOPs forward. Backward costs another 2 n params
  for the input gradient and 2 n params for the weight gradient. So per token a TRAINABLE weight costs 6,
  a FROZEN weight whose input still needs a gradient (the LM blocks and head: the trainable xattn layers
  sit between them) costs 4, and a frozen weight with nothing trainable upstream (the vision encoder:
  images need no gradient) costs 2 (forward only).
- Attention: forward 4 * q_len * k_len * head_dims FLOPs (QK^T and PV), causal self-attention half of
  that; backward twice the forward whenever the attention's inputs need gradients (x3 in all).
  Cross-attention: every text token sees the n_latents latents of one image.
- Each weight is charged for the tokens it actually sees: vision blocks for patches (the embedding convs
  for the positions of their own output grid: a full-resolution stem conv sees every pixel), the resampler's
  key/value projections for (patches + latents), its queries/FFW for latents, xattn to_kv for the
  latents of the batch's images, everything else for text tokens.
- Llama 3.2 Vision (tiled encoder + projector): one encoder pass per image over all max_tiles tiles as one
  sequence (padding tiles are computed too; each tile's tokens_per_tile tokens padded to a multiple of 8, as
  the encoder runs them), through the local and the global layers; the projector and the xattn to_kv see
  max_tiles x tokens_per_tile tokens per image; a text token's cross-attention is charged for the valid keys
  of its latest image, real tiles x tokens_per_tile (a group of consecutive images: its last image only).
MFU = achieved model FLOP/s / peak FLOP/s of the devices (bf16 dense peak for known GPUs; on CPU an
estimate of threads x 2.5 GHz x 32 fp32 FLOP/cycle (AVX2 FMA), so treat CPU MFU as indicative).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per device.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
                   "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device (see the module docstring); 0 when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 0.0
    return torch.get_num_threads() * 2.5e9 * 32


def _linear_params(module: torch.nn.Module) -> int:
    """Parameters of the nn.Linear / Conv layers inside `module` (the ones that cost matmul FLOPs)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            total += sub.weight.numel()
    return total


def _embedding_macs(embeddings: torch.nn.Module, image_size: int) -> int:
    """Multiply-adds per image of the ViT's embedding convs (the stem's, then the patch projection), each
    charged for the positions of its own output grid: a stride-1 stem conv runs at full resolution."""
    total, size = 0, image_size
    for conv in (m for m in embeddings.modules() if isinstance(m, torch.nn.Conv2d)):  # in forward order
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        total += conv.weight.numel() * size * size
    return total


def _trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass
class BatchShape:
    """What the FLOP count needs from one micro-batch (real tokens only, padding excluded)."""

    text_tokens: int  # sum of row lengths
    text_tokens_sq: int  # sum of squared row lengths (causal self-attention)
    media_tokens: int  # text tokens that see an image (media_index >= 0)
    frames: int  # images x frames actually present
    media_items: int  # images present (each gives n_latents latents)
    # Tiled images (batches with aspect_ratio_ids: Llama 3.2 Vision): real tiles of the images present, and over
    # the text tokens that see an image, the real tiles of the image each one sees.
    tiles: int = 0
    media_token_tiles: int = 0

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], tiles_of: Sequence[int] | None = None) -> "BatchShape":
        """Padded rows (one document per row) or packed rows (document_ids; images the batch's flat list).
        tiles_of: real tiles of each aspect ratio id (`FlopCounter.tiles_of`), for tiled images."""
        lengths = batch["attention_mask"].sum(dim=1) if "attention_mask" in batch else \
            torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])
        media = batch.get("media_index")
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
        media_tokens = int(((media >= 0) & real).sum()) if media is not None else 0
        images = batch.get("images")
        num_images = batch.get("num_images")
        packed = "document_ids" in batch
        frame_dim = 1 if packed else 2
        frames_per = images.shape[frame_dim] if images is not None and images.dim() == 4 + frame_dim else 0
        if num_images is not None:
            items = int(num_images.sum())
        else:
            items = (images.shape[0] if packed else images.shape[0] * images.shape[1]) if frames_per else 0
        if packed:  # causal self-attention is per document: the squares of the real documents' lengths
            documents = batch["document_ids"].long()
            keys = (documents + torch.arange(documents.shape[0], device=documents.device)[:, None]
                    * (documents.shape[1] + 1))[real]
            squares = int((torch.bincount(keys) ** 2).sum())
        else:
            squares = int((lengths.long() ** 2).sum())
        tiles = media_token_tiles = 0
        ratios = batch.get("aspect_ratio_ids")
        if tiles_of is not None and ratios is not None and ratios.shape[1] > 0:  # (tiled rows are never packed)
            num_tiles = torch.as_tensor(tiles_of, device=ratios.device)[ratios]  # (B, T)
            seen = torch.gather(num_tiles, 1, media.clamp(min=0)) * ((media >= 0) & real)
            tiles, media_token_tiles = int(num_tiles.sum()), int(seen.sum())
        return cls(int(lengths.sum()), squares, media_tokens, items * frames_per, items, tiles, media_token_tiles)

    def __add__(self, other: "BatchShape") -> "BatchShape":
        return BatchShape(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


class FlopCounter:
    """Training FLOPs of a Flamingo model per micro-batch (rules in the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.cfg
        self.cfg = cfg
        v = cfg.vision

        def rate(module: torch.nn.Module, needs_input_grad: bool = True) -> int:
            # FLOPs per token per parameter for this module's weights.
            if _trainable(module):
                return 6
            return 4 if needs_input_grad else 2

        vision_upstream_trainable = _trainable(model.vision)
        self.vision_rate = rate(model.vision, needs_input_grad=vision_upstream_trainable)
        # One encoder pass: an image (tiled: every tile in one sequence) or a frame (CLIP).
        self.tiled = v.kind == "tiled"
        # Real tiles of each aspect ratio id (0: a padding image), for BatchShape.from_batch; None: untiled.
        self.tiles_of = list(v.tiles_per_aspect_ratio) if self.tiled else None
        if self.tiled:
            encoders = (model.vision.transformer, model.vision.global_transformer)
            self.vision_block_params = sum(_linear_params(encoder) for encoder in encoders)
            self.vision_layers = v.layers + v.global_layers
            self.vision_tokens = v.max_tiles * (v.tokens_per_tile + (-v.tokens_per_tile) % 8)
            self.embedding_macs = v.max_tiles * _embedding_macs(model.vision.patch_embedding, v.image_size)
            self.features_per_pass = v.max_tiles * v.tokens_per_tile
        else:
            self.vision_block_params = _linear_params(model.vision.encoder)
            self.vision_layers = v.layers
            self.vision_tokens = v.num_patches + int(v.class_token)
            self.embedding_macs = _embedding_macs(model.vision.embeddings, v.image_size)
            self.features_per_pass = v.num_features

        rs = model.resampler
        if rs is not None:
            self.connector_rate = rate(rs, needs_input_grad=vision_upstream_trainable)
            self.media_proj_params = _linear_params(rs.media_proj)
            self.resampler_q_out_ffw = sum(_linear_params(layer.attn.to_q) + _linear_params(layer.attn.to_out)
                                           + _linear_params(layer.ffw) for layer in rs.layers)
            self.resampler_kv = sum(_linear_params(layer.attn.to_kv) for layer in rs.layers)
            self.resampler_inner = cfg.resampler.heads * cfg.resampler.head_dim
            self.n_latents = cfg.resampler.n_latents
        else:
            self.connector_rate = rate(model.projector, needs_input_grad=vision_upstream_trainable)
            self.projector_params = _linear_params(model.projector)

        xattn = list(model.xattn_layers.values())
        self.xattn_rate = rate(model.xattn_layers) if xattn else 0
        self.xattn_text_params = sum(_linear_params(x.attn.to_q) + _linear_params(x.attn.to_out)
                                     + _linear_params(x.ffw) for x in xattn)
        self.xattn_kv_params = sum(_linear_params(x.attn.to_kv) for x in xattn)
        self.xattn_inner = cfg.xattn.heads * cfg.xattn.head_dim
        self.num_xattn = len(xattn)

        lm = model.lm
        heads = [head for head in (lm.lm_head, lm.special_head) if head is not None]  # Mllama: no special_head
        self.lm_block_rate = rate(lm.layers)
        self.lm_block_params = _linear_params(lm.layers)
        self.head_flops_per_token = sum(rate(head) * head.weight.numel() for head in heads)
        self.head_params = sum(head.weight.numel() for head in heads)
        self.lm_inner = cfg.lm.heads * cfg.lm.head_dim
        self.lm_layers = cfg.lm.layers

    def flops(self, shape: BatchShape, backward: bool = True) -> float:
        """FLOPs of one micro-batch: forward + backward, or the forward alone (backward=False: every
        weight costs 2 per token it sees, every attention its forward once)."""
        if backward:
            attn_mult = 3  # forward + backward for attention whose inputs need gradients
            vision_rate, connector_rate, xattn_rate = self.vision_rate, self.connector_rate, self.xattn_rate
            lm_rate, head_per_token = self.lm_block_rate, self.head_flops_per_token
        else:
            attn_mult, vision_rate, connector_rate, xattn_rate, lm_rate = 1, 2, 2, 2, 2
            head_per_token = 2 * self.head_params
        total = 0.0
        # Vision encoder, per pass (a frame; tiled: an image).
        passes = shape.media_items if self.tiled else shape.frames
        vision_attn = 4 * self.vision_tokens**2 * self.cfg.vision.width * self.vision_layers
        total += passes * (vision_rate * (self.vision_block_params * self.vision_tokens + self.embedding_macs)
                           + (attn_mult if vision_rate > 2 else 1) * vision_attn)
        if self.cfg.connector == "resampler":
            # Perceiver Resampler, per media item (its F frames are flattened into one key sequence).
            connector_mult = attn_mult if connector_rate > 2 else 1
            frames_per_item = shape.frames / max(shape.media_items, 1)
            kv_len = frames_per_item * self.features_per_pass + self.n_latents
            total += shape.media_items * (
                connector_rate * (self.media_proj_params * frames_per_item * self.features_per_pass
                                  + self.resampler_q_out_ffw * self.n_latents + self.resampler_kv * kv_len)
                + connector_mult * 4 * self.n_latents * kv_len * self.resampler_inner * self.cfg.resampler.depth)
            media_keys, keys_seen = shape.media_items * self.n_latents, shape.media_tokens * self.n_latents
        else:
            # Projector: every feature of every pass becomes a key; a token sees its image's valid keys.
            media_keys = passes * self.features_per_pass
            total += connector_rate * self.projector_params * media_keys
            if self.tiled:
                keys_seen = shape.media_token_tiles * self.cfg.vision.tokens_per_tile
            else:
                keys_seen = shape.media_tokens * shape.frames / max(shape.media_items, 1) * self.features_per_pass
        # Gated xattn-dense layers.
        total += xattn_rate * (self.xattn_text_params * shape.text_tokens + self.xattn_kv_params * media_keys)
        total += attn_mult * 4 * keys_seen * self.xattn_inner * self.num_xattn
        # LM blocks (causal self-attention: half of the full score matrix) and the output head.
        total += lm_rate * self.lm_block_params * shape.text_tokens
        total += attn_mult * 2 * shape.text_tokens_sq * self.lm_inner * self.lm_layers
        total += head_per_token * shape.text_tokens
        return total


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (GiB) since the last call, or the process RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"mem_gib": round(peak, 3), "mem_reserved_gib": round(reserved, 3)}
    try:
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return {"mem_gib": round(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 3)}
    except (OSError, ValueError):
        return {}


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        return f"{value:.3e}" if (abs(value) < 1e-3 and value != 0) or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and prints a console line (rank 0)."""

    CONSOLE_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_ms", "mem_gib", "skipped")

    def __init__(self, out_dir: str | Path, enabled: bool, console=None, resume_step: int | None = None):
        """resume_step: continue an existing file, dropping records after that step (logged by the run
        being resumed after its last checkpoint, and about to be logged again)."""
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.console = console
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.is_file():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self._file = self.path.open("w")
            for record in kept:
                self._file.write(json.dumps(record) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.console is not None:
            parts = [f"step {record['step']}"] + [f"{key} {_format(record[key])}" for key in self.CONSOLE_KEYS
                                                  if key in record]
            self.console.print("  ".join(parts))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (the process was killed mid-write) is dropped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records
