"""Process group, FSDP2 wrapping, per-block activation checkpointing and per-block torch.compile.

Order (as in torchtitan): float8 conversion (optional), activation checkpointing, then compile, then FSDP.
All three work per block (regional compilation: identical blocks share one compiled graph; with
`parallel.compile_mode = "whole"` the root is compiled after FSDP instead), using `Flamingo.shard_units()`:
each vision block, the resampler, each LM block together with the
gated xattn layer that runs right before it; then the root (embeddings, norms, heads, vision stem) gets
its own `fully_shard`. Frozen and trainable parameters share units: FSDP2 reduce-scatters gradients only
for parameters that require them.

Activation checkpointing and compile change no parameter names: checkpointing replaces the instance's
`forward` (not the module), `Module.compile()` compiles in place, so checkpoints stay portable.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from flamingo_fast.models.compile import compile_model
from flamingo_fast.models.float8 import convert_frozen_lm_to_float8
from train.config import ParallelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ENV_SET_HERE: list[str] = []  # rendezvous variables init_distributed set for a 1-rank group of its own


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: ParallelSection) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE set), else run alone.

    nccl with CUDA, gloo on CPU; a 1-D device mesh over all ranks for FSDP. Without torchrun and with
    `parallel.fsdp`, a 1-rank gloo/nccl group is created on a free local port so that the same FSDP code
    runs everywhere."""
    use_cuda = torch.cuda.is_available()
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("parallel.dist_backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
    launched = "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not launched and not cfg.fsdp:
        return DistInfo(0, 1, 0, device, None)
    if not dist.is_initialized():
        if not launched:
            # A 1-rank group of our own: the rendezvous variables it needs are removed again by
            # shutdown_distributed, so later code in this process (and its subprocesses) is not "launched".
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                               ("WORLD_SIZE", "1")):
                if key not in os.environ:
                    os.environ[key] = value
                    _ENV_SET_HERE.append(key)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if backend == "nccl" else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size > 1 and not cfg.fsdp:
        raise ValueError(f"parallel.fsdp=false runs only on one rank, but WORLD_SIZE={world_size}")
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",)) if cfg.fsdp else None
    return DistInfo(rank, world_size, local_rank, device, mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_distributed(synchronize: bool = False) -> None:
    """Destroy the process group. `synchronize=True` (every rank finished cleanly) first waits for all
    ranks, so rank 0, which hosts the rendezvous store, never tears it down under a rank still exiting.
    Not after an error: a rank that failed may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    while _ENV_SET_HERE:
        os.environ.pop(_ENV_SET_HERE.pop(), None)


# -- activation checkpointing -------------------------------------------------------------------------------
def _save_matmuls_policy():
    """Selective AC: keep the outputs of matmuls and attention kernels, recompute the cheap rest (norms,
    activations, rotary, residual adds) in backward."""
    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default}
    for name in ("attention_fwd", "media_cross_attention_fwd", "media_span_attention_fwd", "perceiver_attention_fwd"):
        op = getattr(getattr(torch.ops, "flamingo_fast", None), name, None)
        if op is not None:
            save.add(op.default)

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(module: nn.Module, mode: str) -> None:
    """Wrap `module.forward` in non-reentrant checkpointing ("full": recompute everything in backward,
    "selective": save matmul/attention outputs). Parameter names are unchanged."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpoint mode must be 'none', 'selective' or 'full', got {mode!r}")
    inner = module.forward
    if mode == "full":
        context_fn = None
    else:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy())

    def forward(*args, **kwargs):
        extra = {} if context_fn is None else {"context_fn": context_fn}
        return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = forward


# -- the whole plan -----------------------------------------------------------------------------------------
def mixed_precision(cfg: ParallelSection) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])


def shard_units(model: nn.Module) -> list[list[nn.Module]]:
    if not hasattr(model, "shard_units"):
        raise TypeError(f"{type(model).__name__} has no shard_units(); expected a flamingo_fast Flamingo model")
    return model.shard_units()


def parallelize(model: nn.Module, cfg: ParallelSection, mesh: DeviceMesh | None,
                device: torch.device | None = None) -> nn.Module:
    """Apply float8, AC, compile and FSDP2 to `model` in place (see the module docstring); returns it.
    `device`: where the model will run (the model may still be on the meta device)."""
    if cfg.float8:
        convert_frozen_lm_to_float8(model, device or next(model.parameters()).device)
    units = shard_units(model)
    for unit in units:
        for module in unit:
            apply_activation_checkpointing(module, cfg.activation_checkpoint)
    whole = cfg.compile and cfg.compile_mode == "whole"
    if cfg.compile and not whole:
        compile_model(model, "regional")  # the same shard units, each compiled in place
    if mesh is None:
        if whole:
            compile_model(model, "whole")
        return model
    policy = mixed_precision(cfg)
    for unit in units:
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root's parameters (embeddings, heads, final norms) are used last in forward and first in backward:
    # keep them gathered between the two.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if whole:
        compile_model(model, "whole")
    return model


def compute_dtype(cfg: ParallelSection, sharded: bool) -> torch.dtype:
    """The dtype activations run in: FSDP's param_dtype when sharded, else the weights' own dtype (fp32)."""
    return DTYPES[cfg.param_dtype] if sharded else torch.float32
