"""The training loop: build everything from a TrainConfig, train, checkpoint, evaluate.

One optimizer step = `accumulation` micro-batches per rank (derived from train.global_batch_tokens).
All micro-batches of the step are fetched first so the number of label tokens of the whole global batch
is known (one all-reduce) before any backward: each micro-batch contributes
sum(token losses) / global_label_tokens, so the step's loss and gradient are exactly those of the
token-mean over the global batch, independent of how it is split into micro-batches and ranks.

A step whose loss or gradient norm is not finite is skipped (no optimizer update, gradients dropped,
counted in `skipped_steps`); after `train.max_consecutive_nonfinite` such steps in a row the run stops
with NonFiniteLossError. The schedule advances on skipped steps too, so lr(step) never depends on
how many steps were skipped.

Fine-tuning mode (train.epochs > 0): train.epochs passes of steps_per_epoch steps each over the training
sources (the pipeline reshuffles every pass), with evaluation on the held-out split after every epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flamingo_fast.models.config import FlamingoConfig
from flamingo_fast.models.flamingo import Flamingo

from train.checkpoint import (CheckpointManager, CorruptCheckpointError, export_pretrained, load_model_weights,
                              rng_state, set_rng_state)
from train.config import TrainConfig, to_toml
from train.data import build_tokenizer, build_train_loader, eval_samples, model_collator, steps_per_epoch
from train.evaluate import EvalResult, evaluate
from train.loss import count_label_tokens, micro_batch_loss_sum
from train.metrics import BatchShape, FlopCounter, MetricsLogger, device_peak_flops, memory_stats
from train.optim import accumulation_steps, build_optimizer, build_schedule
from train.parallel import DistInfo, compute_dtype, init_distributed, parallelize

LARGE_PRESETS = ("3b", "9b", "xl", "mllama-11b", "mllama-90b")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    label_tokens: int
    input_tokens: int
    flops: float
    skipped: bool
    # Packed batches: real tokens / row tokens per source over the step, all ranks (issue 18's metric).
    packing_efficiency: dict[str, float] | None = None


@dataclass
class RunResult:
    steps: int
    final_loss: float | None
    skipped_steps: int
    wall_seconds: float
    out_dir: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    last_eval: EvalResult | None = None


# -- model ----------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, vocab_size: int, pad_token_id: int) -> FlamingoConfig:
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("pad_token_id", pad_token_id)
    mcfg = FlamingoConfig.from_preset(cfg.model.preset, **overrides)
    if mcfg.vocab_size != vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} != tokenizer vocab_size {vocab_size}")
    return mcfg


def init_weights(model: nn.Module) -> None:
    """Re-run every module's reset_parameters, children before parents (a parent's reset, e.g. the LM's
    N(0, 0.02), overrides its children's defaults, as in the constructor)."""
    with torch.no_grad():
        for module in reversed(list(model.modules())):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def build_model(cfg: TrainConfig, mcfg: FlamingoConfig, info: DistInfo) -> nn.Module:
    """Construct, load initial weights, freeze, and parallelize."""
    init_device = cfg.model.init_device or ("meta" if cfg.model.preset in LARGE_PRESETS else info.device.type)
    if init_device == "meta":
        with torch.device("meta"):
            model = Flamingo(mcfg)
        model.set_trainable(cfg.model.trainable)
        parallelize(model, cfg.parallel, info.mesh, info.device)
        model.to_empty(device=info.device)
        init_weights(model)
        if cfg.model.init_from:
            load_model_weights(model, cfg.model.init_from)
        return model
    with torch.device(init_device):
        model = Flamingo(mcfg)
    if cfg.model.init_from:
        load_model_weights(model, cfg.model.init_from)
    model.set_trainable(cfg.model.trainable)
    model.to(info.device)
    return parallelize(model, cfg.parallel, info.mesh, info.device)


# -- the trainer ------------------------------------------------------------------------------------------------
def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _to_float(value: torch.Tensor) -> float:
    if hasattr(value, "full_tensor"):  # a DTensor norm from sharded gradients
        value = value.full_tensor()
    return float(value)


class Trainer:
    """Holds the model, optimizer, schedule and data of one run; `run()` trains it (module docstring)."""

    def __init__(self, cfg: TrainConfig, console=None):
        self.cfg = cfg
        self.console = console
        # The resampler returns a view of its output; FSDP2 warns that an in-place op on it would skip a
        # hook. Flamingo.forward only reads the latents, so the warning is noise for this model.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if cfg.parallel.ops_backend:
            os.environ["FLAMINGO_FAST_BACKEND"] = cfg.parallel.ops_backend
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.info = init_distributed(cfg.parallel)
        self.out_dir = Path(cfg.train.out_dir)
        _seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights

        self.tokenizer = build_tokenizer(cfg.data)
        self.model_cfg = model_config(cfg, self.tokenizer.vocab_size, self.tokenizer.pad_id)
        self.image_size = cfg.data.image_size or self.model_cfg.vision.image_size
        if self.image_size != self.model_cfg.vision.image_size:
            raise ValueError(f"data.image_size {self.image_size} != model vision.image_size "
                             f"{self.model_cfg.vision.image_size}")
        self.model = build_model(cfg, self.model_cfg, self.info)
        self.sharded = self.info.mesh is not None
        self.dtype = compute_dtype(cfg.parallel, self.sharded)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.flop_counter = FlopCounter(self.model)
        self.peak_flops = device_peak_flops(self.info.device) * self.info.world_size

        self.accumulation = accumulation_steps(cfg.train.global_batch_tokens, self.info.world_size,
                                               cfg.data.micro_batch_size, cfg.data.max_length)
        rows_per_step = self.info.world_size * self.accumulation * cfg.data.micro_batch_size
        if cfg.train.epochs > 0:
            self.steps_per_epoch = steps_per_epoch(cfg, self.image_size, rows_per_step)
            self.total_steps = cfg.train.epochs * self.steps_per_epoch
        else:
            self.steps_per_epoch = 0
            self.total_steps = cfg.train.steps
        self.schedule = build_schedule(cfg.optim, self.total_steps)
        # The model's image transform (tiles for Llama 3.2 Vision), for training and evaluation.
        self.collator = model_collator(self.model_cfg, self.tokenizer, cfg.data.max_length)
        self.loader = build_train_loader(cfg, self.tokenizer, self.image_size, self.info.rank, self.info.world_size,
                                         self.collator)
        self.source_names = self.loader.source_names  # a packed row's source_index points into this list
        self.checkpoints = CheckpointManager(self.out_dir / cfg.checkpoint.folder, cfg.checkpoint.keep_last,
                                             self.info.rank, self.info.world_size)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.losses: list[tuple[int, float]] = []
        self.evals: list[dict[str, Any]] = []
        self._eval_samples = None

    # -- one step --------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over this rank's micro-batches (module docstring)."""
        device = self.info.device
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        cfg = self.model_cfg
        counts = torch.tensor([sum(count_label_tokens(b["labels"], cfg.image_token_id, cfg.pad_token_id)
                                   for b in micro_batches)], dtype=torch.float64, device=device)
        global_tokens = float(_all_reduce_sum(counts).item())
        # FSDP averages gradients over ranks; multiplying by world_size turns that into the sum.
        scale = self.info.world_size / max(global_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        names = self.source_names  # the same on every rank, as the all-reduce needs
        packing = torch.zeros(2, max(len(names), 1), dtype=torch.float64, device=device)  # real, row tokens
        shape = None
        for batch in micro_batches:
            if "source_index" in batch:
                rows = batch["source_index"]
                packing[0].index_add_(0, rows, batch["attention_mask"].sum(dim=1).double())
                packing[1].index_add_(0, rows, torch.full_like(rows, batch["input_ids"].shape[1]).double())
            loss = micro_batch_loss_sum(self.model, batch, cfg.image_token_id, cfg.pad_token_id)
            (loss * scale).backward()
            loss_sum += loss.detach().double()
            batch_shape = BatchShape.from_batch(batch, self.flop_counter.tiles_of)
            shape = batch_shape if shape is None else shape + batch_shape
        totals = torch.cat([loss_sum[None], torch.tensor([float(shape.text_tokens), self.flop_counter.flops(shape)],
                                                         dtype=torch.float64, device=device), packing.flatten()])
        totals = _all_reduce_sum(totals).tolist()
        loss_total, input_tokens, flops = totals[:3]
        real, row = totals[3:3 + packing.shape[1]], totals[3 + packing.shape[1]:]
        efficiency = {name: real[i] / row[i] for i, name in enumerate(names) if row[i] > 0} or None
        loss_value = loss_total / max(global_tokens, 1.0)

        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.clip_grad_norm
        if clip > 0:
            grad_norm = _to_float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
        else:
            grad_norm = _to_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None],
                                                                foreach=True))
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        else:
            self.consecutive_nonfinite = 0
            self.schedule.apply(self.optimizer)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.advance()
        self.step += 1
        if self.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"step {self.step}: {self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                f"norm (last loss {loss_value}, grad norm {grad_norm}); stopping (train.max_consecutive_nonfinite="
                f"{self.cfg.train.max_consecutive_nonfinite}). Lower optim.lr, check the data, or resume from an "
                "earlier checkpoint."
            )
        return StepResult(loss_value, grad_norm, int(global_tokens), int(input_tokens), flops, skipped, efficiency)

    # -- state -----------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "total_steps": self.total_steps,
                "evals": self.evals}

    def rank_state(self) -> dict[str, Any]:
        return {"data": self.loader.state_dict(), "rng": rng_state()}

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self.model, self.optimizer, self.trainer_state(), self.rank_state())

    def resume(self) -> bool:
        """Load the latest complete checkpoint of the run folder; False when there is none. One that fails
        verification stops the run, or with `checkpoint.fallback` is skipped for the next older one."""
        found = self.checkpoints.newest_first()
        for path in found:
            try:
                trainer_state, rank_state = self.checkpoints.load(path, self.model, self.optimizer)
                break
            except CorruptCheckpointError as error:
                if not self.cfg.checkpoint.fallback:
                    raise CorruptCheckpointError(
                        f"{error}. Resume from the previous complete checkpoint with --checkpoint.fallback=true, "
                        f"or move {path} away") from None
                self._log(f"[yellow]{error}; trying the previous checkpoint (checkpoint.fallback)")
        else:
            if found:
                raise CorruptCheckpointError(f"none of the {len(found)} checkpoints in {self.checkpoints.folder} "
                                             "verifies (see the warnings above); nothing was resumed")
            return False
        self.step = int(trainer_state["step"])
        self.schedule.load_state_dict(trainer_state["schedule"])
        self.skipped_steps = int(trainer_state["skipped_steps"])
        self.consecutive_nonfinite = int(trainer_state["consecutive_nonfinite"])
        self.evals = list(trainer_state.get("evals", []))
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
        else:
            self._log(f"[yellow]checkpoint {path.name} was written with world size {trainer_state['world_size']}; "
                      f"the data pipeline restarts from its beginning with world size {self.info.world_size}")
        self._log(f"resumed from {path} at step {self.step}")
        return True

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        if self._eval_samples is None:
            self._eval_samples = eval_samples(self.cfg.eval.sources, self.image_size)
        return evaluate(self.model, self._eval_samples, self.collator,
                        batch_size=self.cfg.eval.batch_size, max_new_tokens=self.cfg.eval.max_new_tokens,
                        device=self.info.device, use_cache=not self.sharded)

    def _record_eval(self, result: EvalResult, epoch: int | None) -> None:
        record = {"step": self.step, **({"epoch": epoch} if epoch is not None else {}), **result.metrics()}
        self.evals.append(record)
        if self.info.is_main:
            with (self.out_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        # Scalars only on the console line: breakdowns (vqa_by_type; VQAv2 has ~65 question types) stay in eval.jsonl.
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                 if not isinstance(v, (dict, list))]
        self._log("[bold]eval[/bold]  " + "  ".join(parts))
        for example in result.examples[: self.cfg.eval.show_samples]:
            mark = "[green]ok[/green]" if example.get("correct") else "[red]wrong[/red]"
            self._log(f"  {mark}  {example['prompt']!r} -> {example['prediction']!r} (ref {example.get('reference')!r})")

    def _log(self, text: str) -> None:
        if self.info.is_main and self.console is not None:
            self.console.print(text)

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int, StepResult], None] | None = None) -> RunResult:
        try:
            return self._run(on_step)
        finally:
            # Stop the loader's prefetch/decode threads now: left running, a daemon thread that is inside a
            # torch op at interpreter exit aborts the process ("terminate called without an active exception").
            self.loader.close()

    def _run(self, on_step: Callable[[int, StepResult], None] | None) -> RunResult:
        cfg = self.cfg
        start_time = time.perf_counter()
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.toml").write_text(to_toml(cfg.to_dict()))
        resumed = cfg.checkpoint.resume and self.resume()
        metrics = MetricsLogger(self.out_dir, self.info.is_main, self.console, resume_step=self.step if resumed else None)
        self._log(self._banner())
        progress = _progress(self.console) if (self.info.is_main and cfg.train.progress and self.console) else None
        task = progress.add_task("train", total=self.total_steps, completed=self.step) if progress else None
        iterator = iter(self.loader)
        window_tokens, window_flops, window_wait, window_steps, window_start = 0, 0.0, 0.0, 0, time.perf_counter()
        last = None
        try:
            if progress:
                progress.start()
            while self.step < self.total_steps:
                # Time blocked on the data pipeline: above ~0 the GPU starves (add data.num_workers).
                wait_start = time.perf_counter()
                micro = [next(iterator) for _ in range(self.accumulation)]
                window_wait += time.perf_counter() - wait_start
                window_steps += 1
                result = self.train_step(micro)
                last = result
                window_tokens += result.input_tokens
                window_flops += result.flops
                if not result.skipped:
                    self.losses.append((self.step, result.loss))
                if on_step is not None:
                    on_step(self.step, result)
                if progress:
                    progress.update(task, completed=self.step, description=f"loss {result.loss:.4f}")
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps or result.skipped:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {
                        "step": self.step, "loss": result.loss, "lr": self.schedule.lr_at(self.step - 1),
                        "grad_norm": result.grad_norm, "tokens_per_s": window_tokens / elapsed,
                        "mfu": (window_flops / elapsed / self.peak_flops) if self.peak_flops else None,
                        "tflops": window_flops / elapsed / 1e12, "label_tokens": result.label_tokens,
                        "data_wait_ms": 1e3 * window_wait / max(window_steps, 1),
                        "skipped": self.skipped_steps, "data_skipped": sum(self.loader.skipped.values()),
                        **({"packing_efficiency": result.packing_efficiency} if result.packing_efficiency else {}),
                        **({"epoch": (self.step - 1) // self.steps_per_epoch + 1} if self.steps_per_epoch else {}),
                        **memory_stats(self.info.device),
                    }
                    metrics.log(record)
                    window_tokens, window_flops, window_wait, window_steps = 0, 0.0, 0.0, 0
                    window_start = time.perf_counter()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.steps_per_epoch and self.step % self.steps_per_epoch == 0 and cfg.eval.every_epoch:
                    self._record_eval(self.evaluate(), epoch=self.step // self.steps_per_epoch)
        finally:
            if progress:
                progress.stop()
            metrics.close()
        if cfg.checkpoint.save_final:
            self.save_checkpoint()
        if cfg.checkpoint.export_safetensors:  # out_dir/model.safetensors + config.json + tokenizer files
            export_pretrained(self.model, self.tokenizer, self.out_dir)
        last_eval = None
        already_evaluated = self.evals and self.evals[-1]["step"] == self.step
        if cfg.eval.at_end and not already_evaluated:
            last_eval = self.evaluate()
            self._record_eval(last_eval, epoch=None)
        return RunResult(
            steps=self.step, final_loss=None if last is None else last.loss, skipped_steps=self.skipped_steps,
            wall_seconds=time.perf_counter() - start_time, out_dir=self.out_dir, losses=self.losses,
            evals=self.evals, last_eval=last_eval,
        )

    def _banner(self) -> str:
        counts = self.model.parameter_counts() if hasattr(self.model, "parameter_counts") else {}
        return (f"flamingo-fast train: preset {self.cfg.model.preset}, {counts.get('total', 0) / 1e6:.2f}M params "
                f"({counts.get('trainable', 0) / 1e6:.2f}M trainable), world size {self.info.world_size} on "
                f"{self.info.device.type}, {self.accumulation} micro-batch(es) of {self.cfg.data.micro_batch_size} x "
                f"{self.cfg.data.max_length} tokens per rank per step, {self.total_steps} steps, out {self.out_dir}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def train(cfg: TrainConfig, console=None, on_step=None) -> RunResult:
    """Build a Trainer from `cfg` and run it."""
    return Trainer(cfg, console=console).run(on_step=on_step)
