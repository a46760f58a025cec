"""The trainer's view of flamingo_fast.data: tokenizer, the model's collator, the per-rank training pipeline,
held-out samples."""

from __future__ import annotations

import math
from typing import Any

from flamingo_fast.data.collate import Collator
from flamingo_fast.data.pipeline import DataLoader, build_loader, make_source
from flamingo_fast.data.sample import Sample
from flamingo_fast.data.shapes import shapes_tokenizer
from flamingo_fast.data.source import MapSource, iter_samples
from flamingo_fast.data.tiling import transform_for
from flamingo_fast.data.tokenizer import Tokenizer, load_tokenizer
from flamingo_fast.models.config import FlamingoConfig

from train.config import DataSection, TrainConfig


def build_tokenizer(cfg: DataSection) -> Tokenizer:
    """"shapes": the embedded shapes word tokenizer; anything else: a tokenizer.json file or folder."""
    return shapes_tokenizer() if cfg.tokenizer == "shapes" else load_tokenizer(cfg.tokenizer)


def model_collator(model_cfg: FlamingoConfig, tokenizer: Tokenizer, max_length: int | None = None) -> Collator:
    """The Collator a model needs: its vision encoder's image transform (tiles and aspect ratio ids for Llama 3.2
    Vision), and answers ending in eos for a model that cannot predict `<|endofchunk|>` (input-only special
    tokens, LMConfig.special_logits=False)."""
    return Collator(tokenizer, transform=transform_for(model_cfg.vision), max_length=max_length,
                    eoc_as_eos=not model_cfg.lm.special_logits)


def build_train_loader(cfg: TrainConfig, tokenizer: Tokenizer, image_size: int, rank: int, world_size: int,
                       collator: Collator | None = None) -> DataLoader:
    """collator: `model_collator(...)` for the trained model (None: CLIP-normalised images at image_size)."""
    data = cfg.data
    return build_loader(
        data.sources, tokenizer, data.micro_batch_size, image_size, rank=rank, world_size=world_size,
        seed=cfg.train.seed, num_workers=data.num_workers, prefetch_factor=data.prefetch, max_length=data.max_length,
        cycle=True, drop_last=True, max_consecutive_skips=data.max_consecutive_skips,
        packing=data.packing, packing_buffer=data.packing_buffer, collator=collator,
    )


def source_sizes(cfg: DataSection, image_size: int) -> list[int | None]:
    """Records per source (None when a source cannot tell, e.g. tar shards)."""
    sizes = []
    for spec in cfg.sources:
        source, _ = make_source(spec, image_size)
        sizes.append(len(source.dataset) if isinstance(source, MapSource) else None)
    return sizes


def steps_per_epoch(cfg: TrainConfig, image_size: int, rows_per_step: int) -> int:
    """Optimizer steps for one pass over the training sources (train.steps_per_epoch if set)."""
    if cfg.train.steps_per_epoch > 0:
        return cfg.train.steps_per_epoch
    sizes = source_sizes(cfg.data, image_size)
    if any(size is None for size in sizes):
        raise ValueError("train.epochs needs train.steps_per_epoch for sources of unknown size (e.g. webdataset)")
    return max(1, math.ceil(sum(sizes) / rows_per_step))


def eval_samples(specs: list[dict[str, Any]], image_size: int) -> list[Sample]:
    """All samples of the held-out sources, in order (broken records are skipped and logged)."""
    samples: list[Sample] = []
    for spec in specs:
        source, _ = make_source(spec, image_size)
        if isinstance(source, MapSource):
            source.shuffle = False  # evaluation reads in a fixed order
        samples.extend(iter_samples(source))
    return samples
