"""Plan a training run before renting the GPUs: per-rank memory by category, traffic and time per step, and
the whole schedule's wall time and GPU-hours, for any trainer config at any world size.

How each figure is obtained (nothing is materialised: the model lives on fake tensors, shapes only):
- memory: the real model, sharded by the real FSDP2 code (`train.parallel.parallelize`, the trainer's own
  plan) over a fake process group of the planned world size, runs one micro-batch forward + backward under
  torch's `FSDPMemTracker`, which sorts every live tensor into sharded/unsharded parameters and gradients,
  activations, all-gather / reduce-scatter buffers and temporaries, and records the peak. The AdamW state
  (two float32 moments per trainable element of this rank's shard) is added from the real shard sizes: it
  lives through every later step. The data pipeline's prefetched batches (host memory) are estimated apart.
- traffic: the bytes of every collective FSDP issues in that step, counted as issued (all-gather output,
  reduce-scatter input, all-reduce buffer), per rank.
- compute: the model's FLOP counter (train/metrics.py) per micro-batch, at the GPU profile's peak times an
  efficiency measured on that GPU (gpu_profiles.py says which run).
- time per micro-batch: FSDP2 prefetches the next unit's all-gather while the current one computes, so the
  exposed communication is max(0, comm - compute) plus the first unit's all-gather; a step is `accumulation`
  micro-batches (train.global_batch_tokens / (world x micro-batch x seq len)) plus the optimizer.

Validated on CPU by tests/test_train_planner.py: shard bytes equal to a real run's tensors, traffic equal to
what a 2-process gloo run sends, peak memory against a real run's allocator peak.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.config import TrainConfig
from train.gpu_profiles import GpuProfile

GROWS_WITH_BATCH = ("Activation", "Temp", "Inputs")
# What the Flamingo paper (Alayrac et al. 2022, training infrastructure) reports for the run a preset reproduces: the
# 80B model trained on 1,536 TPUv4 chips for 15 days. It gives no such figure for the 3B and 9B models.
PAPER_RUNS = {"xl": {"model": "Flamingo-80B", "chips": 1536, "chip": "TPUv4", "days": 15.0}}


@dataclass
class MemoryPlan:
    """Bytes per rank at the peak of a steady-state step (categories of torch's FSDPMemTracker)."""

    by_category: dict[str, int]  # at the peak of forward + backward
    optimizer_state: int  # AdamW moments of this rank's shard, alive across steps
    host_prefetch: int  # the data pipeline's prefetched batches (host memory)

    @property
    def peak(self) -> int:
        return sum(self.by_category.values()) + self.optimizer_state


@dataclass
class TrafficPlan:
    """Collective bytes per rank for one micro-batch (forward + backward)."""

    all_gather: int
    reduce_scatter: int
    all_reduce: int
    first_unit_all_gather: int  # not hidden behind compute: nothing runs before it

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter + self.all_reduce


@dataclass
class Plan:
    config: str
    preset: str
    world_size: int
    gpu: str
    micro_batch: int
    seq_len: int
    images_per_row: int
    accumulation: int
    parameters: dict[str, int]
    sharded_bytes: dict[str, int]  # this rank's parameter / gradient / optimizer bytes (exact)
    memory: MemoryPlan
    traffic: TrafficPlan
    flops_per_micro_batch: float
    compute_s: float  # per micro-batch
    comm_s: float  # per micro-batch
    step_s: float
    tokens_per_s: float  # per GPU
    mfu: float  # over the profile's peak
    schedule_steps: int
    schedule_hours: float
    gpu_hours: float
    fits: bool
    largest_micro_batch: int | None
    planning_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    paper: dict[str, Any] | None = None  # PAPER_RUNS' entry for the preset, with its chip-hours

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory"]["peak"] = self.memory.peak
        out["traffic"]["total"] = self.traffic.total
        return out


# -- counting collectives ----------------------------------------------------------------------------------
class CollectiveCounter:
    """Bytes of the collectives issued while active, per kind (FSDP2 calls these through `torch.distributed`)."""

    NAMES = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
             "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
             "all_reduce": "all_reduce"}

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []  # (kind, bytes) in issue order
        self._saved: dict[str, Any] = {}
        self._depth = 0

    @property
    def bytes(self) -> dict[str, int]:
        totals = dict.fromkeys(("all_gather", "reduce_scatter", "all_reduce"), 0)
        for kind, size in self.calls:
            totals[kind] += size
        return totals

    def __enter__(self) -> "CollectiveCounter":
        for name, kind in self.NAMES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(original, kind))
        return self

    def __exit__(self, *exc_info) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, original, kind: str):
        # The big buffer: the gathered output, the scattered input, the reduced tensor (positional or named).
        position, names = {"all_gather": (0, ("output_tensor",)), "reduce_scatter": (1, ("input", "input_tensor")),
                           "all_reduce": (0, ("tensor",))}[kind]

        def counted(*args, **kwargs):
            if self._depth == 0:  # the _single variants call the _tensor ones: count the outer call only
                tensor = args[position] if len(args) > position else next(kwargs[n] for n in names if n in kwargs)
                self.calls.append((kind, tensor.numel() * tensor.element_size()))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


# -- one fake step ------------------------------------------------------------------------------------------
class _LazyChunks:
    """What `torch.chunk` + empty padding gives FSDP2 (`_chunk_with_empty`), made on demand: FSDP2 reads only
    this rank's chunk and chunk 0, but chunking every parameter into world-size fake tensors costs ~2 minutes
    for xl at 1024 ranks."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        self.size = math.ceil(tensor.size(dim) / num_chunks)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index: int) -> torch.Tensor:
        length, start = self.tensor.size(self.dim), index * self.size
        if start < length or index == 0:
            return self.tensor.narrow(self.dim, start, max(min(self.size, length - start), 0))
        return self[0].new_empty(0)


@contextlib.contextmanager
def _lazy_fsdp_chunks():
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:  # another torch version: plan at its own speed
        yield
        return
    _fsdp_param._chunk_with_empty = _LazyChunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


@dataclass
class StepTrace:
    memory_by_category: dict[str, int]
    sharded_bytes: dict[str, int]  # parameters / gradients / optimizer (AdamW state) of this rank
    traffic: TrafficPlan


def _image_positions(seq_len: int, images: int) -> list[int]:
    """Where a planned row's <image> tokens sit: spread evenly, the first at position 0."""
    return [i * seq_len // images for i in range(images)]


def _largest_aspect_ratio(vision) -> int:
    """The aspect ratio id with the most tiles (the first such): planned tiled images fill their canvas."""
    tiles = vision.tiles_per_aspect_ratio  # indexed by aspect ratio id, 0 tiles for id 0
    return tiles.index(max(tiles))


def fake_batch(model: nn.Module, micro_batch: int, seq_len: int, images: int) -> dict[str, torch.Tensor]:
    """A micro-batch of the given shape: each row's <image> tokens at `_image_positions`. Tiled images (Llama 3.2
    Vision): max_tiles tiles each, with the aspect ratio id of the most real tiles."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.lm.vocab_size, (micro_batch, seq_len))
    media_index = torch.full((micro_batch, seq_len), -1, dtype=torch.long)
    for number, start in enumerate(_image_positions(seq_len, images)):
        ids[:, start] = cfg.image_token_id
        media_index[:, start:] = number
    size, tiled = cfg.vision.image_size, cfg.vision.kind == "tiled"
    frames = cfg.vision.max_tiles if tiled else 1
    batch = {"input_ids": ids, "labels": ids.clone(), "media_index": media_index,
             "images": torch.randn(micro_batch, images, frames, 3, size, size)}
    if tiled:
        batch["aspect_ratio_ids"] = torch.full((micro_batch, images), _largest_aspect_ratio(cfg.vision))
    return batch


def _model_config(cfg: TrainConfig):
    from flamingo_fast.models.config import FlamingoConfig

    return FlamingoConfig.from_preset(cfg.model.preset, **cfg.model.overrides)


def trace_step(cfg: TrainConfig, world_size: int, micro_batch: int, seq_len: int, images: int) -> StepTrace:
    """One micro-batch forward + backward of the configured model, FSDP2-sharded over a fake world of
    `world_size`, on fake tensors (nothing is materialised). Must run without a process group."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from flamingo_fast.models.flamingo import Flamingo
    from train.loss import micro_batch_loss_sum
    from train.parallel import parallelize

    if dist.is_initialized():
        raise RuntimeError("trace_step needs a process without a process group (it makes a fake one)")
    if images < 1:  # the vision and resampler units would not run, and torch's memory tracker fails on those
        raise ValueError(f"plan at least one image per row, got images={images}")
    mcfg = _model_config(cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
        parallel = cfg.parallel
        if not parallel.fsdp:
            raise ValueError("the planner models FSDP runs: set parallel.fsdp = true")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = Flamingo(mcfg)
            model.set_trainable(cfg.model.trainable)
            # The trainer's plan without compilation (it does not change what is stored or sent).
            with _lazy_fsdp_chunks():
                parallelize(model, type(parallel)(**{**asdict(parallel), "compile": False, "float8": False}), mesh)
            sharded = _sharded_bytes(model)
            batch = fake_batch(model, micro_batch, seq_len, images)

            def step() -> None:
                micro_batch_loss_sum(model, batch, mcfg.image_token_id, mcfg.pad_token_id).backward()
                model.zero_grad(set_to_none=True)

            # Two passes: the memory tracker's own hooks issue extra all-gathers, so traffic is counted
            # in a pass without it (that pass matches a real run's collectives call for call).
            with CollectiveCounter() as counter:
                step()
            tracker = FSDPMemTracker(model)
            tracker.track_inputs(tuple(batch.values()))
            with tracker:
                step()
            peak = tracker.get_tracker_snapshot("peak")
    finally:
        dist.destroy_process_group()
    by_category: dict[str, int] = {}
    for device_stats in peak.values():
        for key, value in device_stats.items():
            name = getattr(key, "value", str(key))
            if name != "Total":
                by_category[name] = by_category.get(name, 0) + int(value)
    totals = counter.bytes
    gathers = [size for kind, size in counter.calls if kind == "all_gather"]
    traffic = TrafficPlan(totals["all_gather"], totals["reduce_scatter"], totals["all_reduce"],
                          gathers[0] if gathers else 0)
    return StepTrace(by_category, sharded, traffic)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _sharded_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's parameter shard bytes, its gradient shard bytes (trainable, in the parameter's dtype, as
    FSDP2 keeps them) and its AdamW state (exp_avg + exp_avg_sq in float32 per trainable element)."""
    params = grads = optimizer = 0
    for param in model.parameters():
        local = _local(param)
        size = local.numel() * local.element_size()
        params += size
        if param.requires_grad:
            grads += size
            optimizer += 2 * local.numel() * 4
    return {"parameters": params, "gradients": grads, "optimizer": optimizer}


# -- the plan ---------------------------------------------------------------------------------------------------
def _flops_per_micro_batch(model: nn.Module, micro_batch: int, seq_len: int, images: int) -> float:
    from train.metrics import BatchShape, FlopCounter

    positions = _image_positions(seq_len, images)
    media_tokens = micro_batch * (seq_len - positions[0]) if positions else 0  # tokens at or after the first image
    counter = FlopCounter(model)
    vision = model.cfg.vision
    frames = vision.max_tiles if counter.tiled else 1
    tiles = counter.tiles_of[_largest_aspect_ratio(vision)] if counter.tiled else 0  # per image, as fake_batch's
    shape = BatchShape(micro_batch * seq_len, micro_batch * seq_len**2, media_tokens, micro_batch * images * frames,
                       micro_batch * images, micro_batch * images * tiles, media_tokens * tiles)
    return counter.flops(shape)


def _link(world_size: int, gpu: GpuProfile) -> tuple[str, float]:
    """The slowest link of the ring (name, GB/s per GPU): NVLink within a node, the network beyond."""
    return ("NVLink", gpu.nvlink_gbps) if world_size <= gpu.gpus_per_node else ("the network", gpu.network_gbps)


def _comm_seconds(traffic: TrafficPlan, world_size: int, gpu: GpuProfile) -> tuple[float, float]:
    """(seconds of all collectives, seconds of the first all-gather) per micro-batch. A ring collective moves
    (world-1)/world of its buffer over the ring's slowest link."""
    if world_size == 1:
        return 0.0, 0.0
    factor = (world_size - 1) / world_size / (_link(world_size, gpu)[1] * 1e9)
    return traffic.total * factor, traffic.first_unit_all_gather * factor


def make_plan(cfg: TrainConfig, world_size: int, gpu: GpuProfile, micro_batch: int | None = None,
              seq_len: int | None = None, images: int = 5, config_name: str = "") -> Plan:
    """Plan `cfg` on `world_size` GPUs of profile `gpu` (see the module docstring)."""
    from train.optim import accumulation_steps

    from flamingo_fast.models.flamingo import Flamingo

    start = time.perf_counter()
    mcfg = _model_config(cfg)
    with torch.device("meta"):  # for the FLOP counter and the parameter counts
        model = Flamingo(mcfg)
    model.set_trainable(cfg.model.trainable)
    micro_batch = micro_batch or cfg.data.micro_batch_size
    seq_len = seq_len or cfg.data.max_length
    accumulation = accumulation_steps(cfg.train.global_batch_tokens, world_size, micro_batch, seq_len)
    trace = trace_step(cfg, world_size, micro_batch, seq_len, images)
    frames = mcfg.vision.max_tiles if mcfg.vision.kind == "tiled" else 1
    host = cfg.data.prefetch * micro_batch * (seq_len * 8 * 3 + images * frames * 3 * mcfg.vision.image_size**2 * 4)
    memory = MemoryPlan(trace.memory_by_category, trace.sharded_bytes["optimizer"], host)
    # Activations, temporaries and inputs grow with the micro-batch, the rest does not.
    per_row = max(sum(trace.memory_by_category.get(k, 0) for k in GROWS_WITH_BATCH) / micro_batch, 1)
    largest = max(micro_batch + math.floor((gpu.hbm_bytes - memory.peak) / per_row), 0)
    flops = _flops_per_micro_batch(model, micro_batch, seq_len, images)
    compute = flops / (gpu.peak_tflops * 1e12 * gpu.efficiency)
    comm, first = _comm_seconds(trace.traffic, world_size, gpu)
    micro_seconds = max(compute, comm) + first
    step = accumulation * micro_seconds
    tokens_per_step = world_size * accumulation * micro_batch * seq_len
    link, gbps = _link(world_size, gpu)
    hours = cfg.train.steps * step / 3600
    paper = PAPER_RUNS.get(cfg.model.preset)
    if paper is not None:
        paper = {**paper, "chip_hours": paper["chips"] * paper["days"] * 24}
    return Plan(
        config=config_name, preset=cfg.model.preset, world_size=world_size, gpu=gpu.name, micro_batch=micro_batch,
        seq_len=seq_len, images_per_row=images, accumulation=accumulation, parameters=model.parameter_counts(),
        sharded_bytes=trace.sharded_bytes, memory=memory, traffic=trace.traffic, flops_per_micro_batch=flops,
        compute_s=compute, comm_s=comm, step_s=step, tokens_per_s=tokens_per_step / step / world_size,
        mfu=accumulation * flops / step / (gpu.peak_tflops * 1e12), schedule_steps=cfg.train.steps,
        schedule_hours=hours, gpu_hours=hours * world_size, fits=memory.peak <= gpu.hbm_bytes,
        largest_micro_batch=largest, planning_s=time.perf_counter() - start,
        notes=[f"compute at {gpu.efficiency:.0%} of {gpu.peak_tflops:g} TFLOP/s ({gpu.efficiency_source})",
               f"collectives over {link} at {gbps:g} GB/s per GPU"], paper=paper)
