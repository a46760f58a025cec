"""Training/eval input pipelines as `torchdata.nodes` graphs.

    per source: records (indices / tar member groups, sharded by rank) -> tag with the source name
    -> MultiNodeWeightedSampler (weighted mixture, as Flamingo mixes M3W/ALIGN/LTIP/VTP)
    -> ParallelMapper: decode + tokenize + transform (threads or processes, order preserved)
    -> SkipFilter (drops, counts and logs broken records) -> Batcher -> Mapper(collate) -> Prefetcher
    with packing=True:  ... -> SkipFilter -> Packer (whole samples into rows of max_length tokens, one source
    per row: data/packing.py) -> Batcher(rows) -> Mapper(collate_packed) -> Prefetcher

`build_loader(...)` returns a `DataLoader` (a `torchdata.nodes.Loader`): iterate it for batch dicts
(padded layout in collate.py, packed layout in packing.py), checkpoint it with `state_dict()` /
`load_state_dict()` (resuming yields exactly the batches not yet seen), read its skip counters from `.skipped`.

Source specs (plain dicts, e.g. from a TOML config): {"kind": ..., "weight": float, "name": str, ...},
where the remaining keys go to the source's constructor:
    shapes      split="train", n=10000, seed=0, task="mixed"   (image_size comes from build_loader)
    webdataset  shards=<path | dir | glob | "a-{000..009}.tar" | list>, shuffle=True
    coco, flickr30k  annotations=<Karpathy json>, image_root=<dir>, split="train", per_caption=None
    vqav2       questions=<json>, image_root=<dir>, annotations=<json> | None, image_subtype=None
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from torchdata.nodes import (
    BaseNode,
    Batcher,
    Loader,
    Mapper,
    MultiNodeWeightedSampler,
    ParallelMapper,
    Prefetcher,
    StopCriteria,
)
from torchdata.nodes.loader import LoaderIterator

from flamingo_fast.data.captions import CaptionSource
from flamingo_fast.data.collate import Collator, EncodedSample
from flamingo_fast.data.packing import DEFAULT_PACKING_BUFFER, PackedCollate, Packer, check_packing_buffer
from flamingo_fast.data.sample import BadSampleError
from flamingo_fast.data.shapes import ShapesDataset, shapes_tokenizer
from flamingo_fast.data.skipping import MAX_CONSECUTIVE_SKIPS, SkipFilter, Skipped
from flamingo_fast.data.source import MapSource, Source, check_rank
from flamingo_fast.data.tiling import TileTransform
from flamingo_fast.data.tokenizer import Tokenizer, load_tokenizer
from flamingo_fast.data.transforms import CLIP_MEAN, CLIP_STD
from flamingo_fast.data.vqav2 import VQAv2Source
from flamingo_fast.data.webdataset import TarShardSource

SOURCE_KINDS = ("shapes", "webdataset", "coco", "flickr30k", "vqav2")


def check_source_spec(spec: Any, where: str = "a source spec") -> None:
    """A spec's own fields, before any file is read: a table with a known kind and a weight > 0."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in SOURCE_KINDS:
        raise ValueError(f"{where} is not a table or has an unknown kind: expected kind one of {SOURCE_KINDS}, "
                         f"got {spec!r}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}.weight must be a number > 0, got {weight!r}")


def make_source(spec: Mapping[str, Any], image_size: int) -> tuple[Source, float]:
    """Build one source from its spec dict; returns (source, weight)."""
    check_source_spec(spec)
    options = dict(spec)
    kind = options.pop("kind")
    weight = options.pop("weight", 1.0)
    name = options.pop("name", kind)
    try:
        if kind == "shapes":
            source = MapSource(ShapesDataset(image_size=image_size, **options), name=name)
        elif kind == "webdataset":
            source = TarShardSource(name=name, **options)
        elif kind in ("coco", "flickr30k"):
            source = CaptionSource(name=name, **options)
        else:  # "vqav2": check_source_spec admits only the kinds above
            source = VQAv2Source(name=name, **options)
    except TypeError as error:  # unexpected / missing constructor options
        raise ValueError(f"source {name!r} ({kind}): bad options {sorted(options)}: {error}") from None
    return source, float(weight)


class _Tag:
    """Pairs each record with its source's name, so one worker pool can decode every source."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, record: Any) -> tuple[str, Any]:
        return self.name, record


class _Encode:
    """Worker function: (source name, record) -> EncodedSample, or a Skipped marker. Picklable."""

    def __init__(self, sources: Mapping[str, Source], collator: Collator):
        self.sources = dict(sources)
        self.collator = collator

    def __call__(self, tagged: tuple[str, Any]) -> EncodedSample | Skipped:
        name, record = tagged
        if isinstance(record, Skipped):
            return record
        try:
            encoded = self.collator.encode(self.sources[name].decode(record))
            encoded.source = name
            return encoded
        except BadSampleError as error:
            return Skipped(error.reason, error.detail, name)


class DataLoader(Loader):
    """A torchdata Loader over collated batches, plus the pipeline's parts.

    skipped:  reason -> count of broken records dropped since this iteration started (restored with the
              state; with workers/prefetch it includes records decoded ahead of the last batch)
    collator: the Collator used (also useful for evaluation batches)
    sources:  name -> Source; weights: name -> mixture weight
    source_names: the source names in the order the sources were given (a packed batch's `source_index`
              indexes this list)
    packing:  whether batches have the packed layout (packing.py) rather than the padded one (collate.py)
    """

    def __init__(self, root: BaseNode, skip_filter: SkipFilter, collator: Collator, sources: dict, weights: dict,
                 packing: bool = False):
        super().__init__(root)
        self._skip_filter = skip_filter
        self.collator = collator
        self.sources = sources
        self.weights = weights
        self.source_names = list(sources)
        self.packing = packing

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skip_filter.skipped)

    def __iter__(self):
        state = self._next_iter_state_dict
        if state is None:
            return super().__iter__()
        # torchdata 0.11 resumes a state saved after the epoch ended into the *first* epoch's order again:
        # nodes restored from a state count as not started, so the restart does not advance their epoch.
        # Restore, mark every epoch-counting node started, and restart: the next epoch, as without the resume.
        self._next_iter_state_dict, self._iter_for_state_dict = None, False
        if self._it is None:
            self._it = LoaderIterator(self)
        self._it.reset(initial_state=state)
        if self.restart_on_stop_iteration and not self._it.has_next():
            for node in self._graph():
                if hasattr(node, "_started"):
                    node._started = True
            self._it.reset(None)
        return self._it

    def _graph(self):
        """Every node and node iterator of the pipeline (torchdata has no public graph walk)."""
        stack, seen = [self.root], set()
        while stack:
            node = stack.pop(0)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            stack += [getattr(node, "_it", None), getattr(node, "source", None)]
            stack += list(getattr(node, "source_nodes", {}).values())

    def close(self) -> None:
        """Stop the background threads / worker processes of the current iteration.

        torchdata 0.11 has no public shutdown: this walks the graph and calls the iterators' `_shutdown`.
        Without it, daemon threads die at interpreter exit (process workers may then print tracebacks).
        A later `iter(loader)` starts them again.
        """
        for node in self._graph():
            if callable(getattr(node, "_shutdown", None)):
                node._shutdown()

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def build_loader(
    sources: Sequence[Mapping[str, Any] | Source],
    tokenizer: Tokenizer,
    batch_size: int,
    image_size: int,
    *,
    weights: Mapping[str, float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    worker_method: str = "thread",
    multiprocessing_context: str | None = None,
    prefetch_factor: int = 2,
    max_length: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    collator: Collator | None = None,
    cycle: bool = True,
    drop_last: bool = True,
    max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
    packing: bool = False,
    packing_buffer: int = DEFAULT_PACKING_BUFFER,
) -> DataLoader:
    """Build the batch pipeline for this rank.

    sources:        spec dicts (see module docstring) and/or Source objects (their weight from `weights`
                    by name, default 1.0); names must be unique
    batch_size:     per-rank batch size; image_size: side of the transformed images (and of shapes renders)
    rank/world_size: data-parallel sharding, every rank sees a disjoint stream
    seed:           shuffling and mixture seed (same on all ranks)
    num_workers:    parallel decode workers (0 = decode inline); worker_method "thread" | "process"
    prefetch_factor: batches prepared ahead in a background thread (0 = none)
    cycle:          True: endless (exhausted sources restart with a new shuffle: count steps, not epochs);
                    False: stop once every source has been read once (one epoch, e.g. evaluation)
    max_consecutive_skips: that many broken records in a row stop the stream with NoUsableDataError
                    (data/skipping.py) instead of spinning forever on unreadable data
    packing:        pack whole samples into rows of exactly max_length tokens, one source per row (needs
                    max_length; batch_size then counts rows): the packed batch layout of data/packing.py
    packing_buffer: samples buffered per source for packing (more: fuller rows, longer replay on resume)
    """
    check_rank(rank, world_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if worker_method not in ("thread", "process"):
        raise ValueError(f"worker_method must be 'thread' or 'process', got {worker_method!r}")
    if num_workers < 0 or prefetch_factor < 0:
        raise ValueError(f"num_workers and prefetch_factor must be >= 0, got {num_workers}, {prefetch_factor}")
    if not sources:
        raise ValueError("build_loader needs at least one source")
    if not isinstance(packing, bool):
        raise ValueError(f"packing must be True or False, got {packing!r}")
    check_packing_buffer(packing_buffer)
    if packing:
        if max_length is None:
            raise ValueError("packing=True needs max_length (the packed row length), got max_length=None")
        if collator is not None and (collator.max_length is None or collator.max_length > max_length):
            raise ValueError(f"packing: the collator truncates to max_length={collator.max_length}, "
                             f"which must be <= max_length={max_length}")
    if collator is None:
        collator = Collator(tokenizer, image_size, mean=mean, std=std, max_length=max_length)
    elif collator.image_size != image_size:
        raise ValueError(f"collator.image_size={collator.image_size} differs from image_size={image_size}")
    if packing and isinstance(collator.transform, TileTransform):
        raise ValueError("packing=True cannot carry tiled images (TileTransform: Llama 3.2 Vision, whose image "
                         "groups are not defined across packed documents); use packing=False")

    built: dict[str, Source] = {}
    mixture: dict[str, float] = {}
    for item in sources:
        if isinstance(item, Source):
            source, weight = item, float((weights or {}).get(item.name, 1.0))
        else:
            source, weight = make_source(item, image_size)
        if source.name in built:
            raise ValueError(f"two sources are named {source.name!r}; give each spec a unique 'name'")
        built[source.name], mixture[source.name] = source, weight

    tagged = {name: Mapper(source.records(rank, world_size, seed), _Tag(name)) for name, source in built.items()}
    stop = StopCriteria.CYCLE_FOREVER if cycle else StopCriteria.ALL_DATASETS_EXHAUSTED
    node: BaseNode = MultiNodeWeightedSampler(tagged, mixture, stop_criteria=stop, rank=rank, world_size=world_size, seed=seed)
    encode = _Encode(built, collator)
    if num_workers > 0:
        node = ParallelMapper(
            node,
            encode,
            num_workers=num_workers,
            in_order=True,  # deterministic batches, required for exact resume
            method=worker_method,
            multiprocessing_context=multiprocessing_context,
        )
    else:
        node = Mapper(node, encode)
    skip_filter = SkipFilter(node, max_consecutive=max_consecutive_skips)
    if packing:
        packer = Packer(skip_filter, max_length=max_length, buffer_size=packing_buffer)
        collate = PackedCollate(max_length, collator.tokenizer.pad_id, collator.tokenizer.image_token_id, list(built))
        node = Mapper(Batcher(packer, batch_size=batch_size, drop_last=drop_last), collate)
    else:
        node = Mapper(Batcher(skip_filter, batch_size=batch_size, drop_last=drop_last), collator.collate)
    if prefetch_factor > 0:
        node = Prefetcher(node, prefetch_factor=prefetch_factor)
    return DataLoader(node, skip_filter, collator, built, mixture, packing=packing)


def make_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a config value: "shapes" (the embedded word-level one) or a tokenizer.json path/folder."""
    if str(spec) == "shapes":
        return shapes_tokenizer()
    return load_tokenizer(spec)


def shapes_eval_split(n: int = 200, seed: int = 0, image_size: int = 64, task: str = "caption") -> ShapesDataset:
    """The held-out shapes split (split "val": a different seed stream than "train") for evaluation."""
    return ShapesDataset(split="val", n=n, seed=seed, image_size=image_size, task=task)
