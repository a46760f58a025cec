"""AdamW over the trainable parameters, the warm-up + cosine schedule, and the accumulation arithmetic.

Parameter groups (Flamingo paper, appendix B.1.2; OpenFlamingo does the same):
    decay      trainable matrices/embeddings outside the resampler    weight_decay
    resampler  trainable matrices of the Perceiver Resampler           resampler_weight_decay (paper: 0)
    no_decay   biases, norm weights (every tensor with < 2 dims)             0
    gates      the scalar tanh gates of the xattn layers                       0, lr x gate_lr_multiplier
The gates start at 0 and scale the whole xattn branch: with a small lr they stay near 0 for many steps
and damp everything behind them (measured on the demo: |tanh(gate)| < 0.1 after 450 steps at lr 1e-3).
Short runs (the demo) raise their lr; the paper's setting is gate_lr_multiplier = 1.
Frozen parameters get no group at all, hence no AdamW state (exp_avg/exp_avg_sq): for xl that is the
difference between ~20 GB and ~560 GB of optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from train.config import OptimSection


def _is_no_decay(param: torch.Tensor) -> bool:
    # Every vector is a bias, a LayerNorm/RMSNorm weight or a tanh gate (stored with shape (1,)) in this
    # model; matrices, embeddings, latents and convolutions decay.
    return param.dim() < 2


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """AdamW groups over the parameters with requires_grad (see the module docstring)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "resampler": [], "no_decay": [], "gates": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("_gate"):
            groups["gates"].append(param)
        elif _is_no_decay(param):
            groups["no_decay"].append(param)
        elif name.startswith("resampler.") or ".resampler." in name:
            groups["resampler"].append(param)
        else:
            groups["decay"].append(param)
    decay = {"decay": cfg.weight_decay, "resampler": cfg.resampler_weight_decay, "no_decay": 0.0, "gates": 0.0}
    result = [{"params": params, "weight_decay": decay[key], "name": key,
               "lr_scale": cfg.gate_lr_multiplier if key == "gates" else 1.0}
              for key, params in groups.items() if params]
    if not result:
        raise ValueError("the model has no trainable parameters (check model.trainable)")
    return result


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    # foreach: one kernel per group on GPU; works on DTensor shards as well.
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=True)


@dataclass
class WarmupCosineSchedule:
    """lr(step) for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over `warmup`
    steps, then cosine from lr (at step `warmup`) down to `min_lr` (at step `warmup + decay`), then
    `min_lr` forever. A constant lr is min_lr == lr.

    The state is just the number of steps taken (`state_dict` / `load_state_dict`, JSON-friendly)."""

    lr: float
    min_lr: float
    warmup: int
    decay: int
    step: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup < 0 or self.decay < 0:
            raise ValueError(f"warmup and decay must be >= 0, got {self.warmup}, {self.decay}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = step - self.warmup
        if progress >= self.decay:
            return self.min_lr
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress / self.decay))
        return self.min_lr + (self.lr - self.min_lr) * cosine

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the lr of the current step on every group (times the group's "lr_scale"); returns it."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def build_schedule(cfg: OptimSection, total_steps: int) -> WarmupCosineSchedule:
    """Warm-up, then cosine reaching min_lr at the last step (step total_steps - 1), or after
    optim.decay_steps when set."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay = cfg.decay_steps or max(total_steps - warmup - 1, 0)
    return WarmupCosineSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup=warmup, decay=decay)


def accumulation_steps(global_batch_tokens: int, world_size: int, micro_batch_size: int, seq_len: int) -> int:
    """Micro-batches per rank per optimizer step so that
    world_size * accumulation * micro_batch_size * seq_len == global_batch_tokens (exactly)."""
    for name, value in (("global_batch_tokens", global_batch_tokens), ("world_size", world_size),
                        ("micro_batch_size", micro_batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    per_micro_step = world_size * micro_batch_size * seq_len
    steps, remainder = divmod(global_batch_tokens, per_micro_step)
    if steps == 0 or remainder:
        lower = max(steps, 1) * per_micro_step
        raise ValueError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of world_size x micro_batch_size x "
            f"seq_len = {world_size} x {micro_batch_size} x {seq_len} = {per_micro_step} tokens per micro-step; "
            f"use e.g. {lower} or {lower + per_micro_step}, or change data.micro_batch_size / data.max_length"
        )
    return steps
