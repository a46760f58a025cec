"""What a data source is to the pipeline: a stream of cheap records plus a `decode(record) -> Sample`.

Records are what the pipeline state tracks (an index, a tar member group), so they must be cheap and
reproducible; `decode` does the expensive part (image decoding) in parallel workers and may raise
`BadSampleError` for a broken record. Sharding for data parallelism happens at the record level:
rank r of w sees a disjoint part of the stream.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler
from torchdata.nodes import BaseNode, SamplerWrapper

from flamingo_fast.data.sample import BadSampleError, Sample
from flamingo_fast.data.skipping import Skipped

logger = logging.getLogger("flamingo_fast.data")


def check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


class Source(ABC):
    """A data source: `records(rank, world_size, seed)` is a torchdata node of records (or `Skipped`
    markers), `decode(record)` turns one record into a Sample (raising BadSampleError if it cannot)."""

    name: str = "source"

    @abstractmethod
    def records(self, rank: int = 0, world_size: int = 1, seed: int = 0) -> BaseNode: ...

    @abstractmethod
    def decode(self, record: Any) -> Sample: ...


def read_annotation_json(path: str | os.PathLike) -> Any:
    """An annotation file's JSON. Not JSON (or not UTF-8) is a ValueError naming the file; a missing file stays a
    FileNotFoundError, which names it too."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON annotation file: {error}") from None


class ShardedIndexSampler(Sampler[int]):
    """Indices 0..size-1, reshuffled every epoch with (seed, epoch), strided over ranks (disjoint)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        check_rank(rank, world_size)
        if size < 1:
            raise ValueError(f"a source needs at least one sample, got size {size}")
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class MapSource(Source):
    """A source over an indexable dataset (`__len__`, `__getitem__(i) -> Sample`): records are indices."""

    def __init__(self, dataset: Sequence[Sample], name: str = "map", shuffle: bool = True):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must support len() and indexing, got {type(dataset).__name__}")
        self.dataset, self.name, self.shuffle = dataset, name, shuffle

    def records(self, rank: int = 0, world_size: int = 1, seed: int = 0) -> BaseNode:
        return SamplerWrapper(ShardedIndexSampler(len(self.dataset), rank, world_size, self.shuffle, seed))

    def decode(self, record: int) -> Sample:
        return self.dataset[record]


def iter_samples(source: Source, skipped: dict[str, int] | None = None, rank: int = 0, world_size: int = 1):
    """Decoded samples of one pass over `source` in record order (e.g. for evaluation).

    Broken records are skipped, logged, and counted into `skipped` (reason -> count) when given.
    """
    node = source.records(rank, world_size, seed=0)
    for record in node:
        if not isinstance(record, Skipped):
            try:
                yield source.decode(record)
                continue
            except BadSampleError as error:
                record = Skipped(error.reason, error.detail, source.name)
        if skipped is not None:
            skipped[record.reason] = skipped.get(record.reason, 0) + 1
        logger.warning("skipped a record in source %r (%s): %s", source.name, record.reason, record.detail)
