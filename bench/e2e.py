"""End-to-end benchmark: one Flamingo training step (forward, loss, backward, AdamW step on the trainable
parameters) over a matrix of models x shapes x variants.

Models: `demo` (the demo recipe's preset), `1b` (3b widths, 6 LM layers, xattn every 2; 1.06B parameters)
and `3b-shape` (the 3b preset's widths with 8 of its 24 LM layers, full ViT-L/14; sized for a 15-minute GPU
slot). Shapes, as Flamingo trains: `pairs` (image-text pairs: 32 tokens, 1 image, large batch), `m3w`
(interleaved web pages: 256 tokens, 5 images) and `long` (2048 tokens, 8 images).

Variants (JSON `impl`):
  openflamingo      OpenFlamingo 2.0.1's own modules (dense text-to-media mask) around a transformers Llama
                    (SDPA) of the same size: what users run today (bench/openflamingo_model.py), eager
  torch             our model, eager, attention ops on the `torch` backend
  torch+sac         as torch, each frozen LM block under selective activation checkpointing (matmul and
                    attention outputs kept, the rest recomputed in backward; train/parallel.py)
  torch+ac          as torch, each frozen LM block fully recomputed in backward
  compile           our model compiled (regional by default, --compile-mode whole), `torch` backend
  compile+cuda      compiled, attention ops on the fused kernels of flamingo_fast._C
  compile+cuda+fp8  as compile+cuda, the frozen LM's Linear layers in float8 (torchao float8 training;
                    Hopper only, never silently bf16)

Rows (op "train_step", direction "fwd+bwd") carry ms per step, tokens_per_s (text tokens), tflops (model
FLOPs per second), mfu (= peak_fraction: that rate over the matmul peak measured in the same run),
compile_s (first step's wall time less a steady step: compilation and warm-up), activation_mb (memory one
forward of the eager variants leaves for the backward: allocated bytes on CUDA, the CPU allocator's net
allocations on CPU) and, on CUDA, peak_mem_mb (torch.cuda.max_memory_allocated). Model FLOPs per step are
counted with torch.utils.flop_counter on an eager step of each model (ours through formulas registered here
from bench.flops, backward = 2.5 x forward): what the step executes, so frozen parts count their
input-gradient backward only.

The gates of every xattn layer are set to 0.5 (they start at 0, which would hide the cross-attention from
the loss). Correctness gate: each variant's first step's loss must match a float64 eager copy of its own
model on the same batch within the dtype's tolerance, else it is refused (rel_err filled, ms null).
On CUDA the step runs under torch.autocast in the run's half dtype (fp32 parameters); on CPU in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bench import flops
from bench.harness import (
    COMPILE_SKIP_NOTE,
    DTYPE_NAMES,
    MODEL_COMPILE_SKIP_NOTE,
    TOLERANCE,
    Peaks,
    Row,
    Settings,
    mark_rows,
    time_cpu,
)
from bench.impls import Unavailable
from flamingo_fast import ops
from flamingo_fast.models.compile import COMPILE_MODES, compile_model

OP = "train_step"
VARIANTS = ("openflamingo", "torch", "torch+sac", "torch+ac", "compile", "compile+cuda", "compile+cuda+fp8")
CHECKPOINTED = {"torch+sac": "selective", "torch+ac": "full"}
COMPILED = ("compile", "compile+cuda", "compile+cuda+fp8")


@dataclass(frozen=True)
class E2ECase:
    name: str  # the model's name in the matrix
    preset: str
    batch: int
    seq: int
    images: int
    shape_name: str = ""
    needs_cuda: bool = False
    overrides: dict = field(default_factory=dict)

    def config(self):
        from flamingo_fast import FlamingoConfig

        cfg = FlamingoConfig.from_preset(self.preset, **self.overrides)
        if cfg.lm.max_seq_len < self.seq:  # the demo preset's LM stops at 512 positions
            cfg = cfg.replace(lm={"max_seq_len": self.seq})
        return cfg

    @property
    def label(self) -> str:
        shape = f" {self.shape_name}" if self.shape_name else ""
        return f"{self.name}{shape} b{self.batch} s{self.seq} img{self.images}"


# model name -> (preset, overrides, needs CUDA)
MODELS = {
    "demo": ("demo", {}, False),
    "1b": ("3b", {"lm": {"layers": 6}, "xattn": {"every": 2}}, True),
    "3b-shape": ("3b", {"lm": {"layers": 8}}, True),
}
# shape name -> (text tokens, images, batch for the demo model, batch for the 3b-width models)
SHAPES = {
    "pairs": (32, 1, 16, 128),
    "m3w": (256, 5, 4, 16),
    "long": (2048, 8, 1, 4),
}


def e2e_case(model: str, shape: str) -> E2ECase:
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    preset, overrides, needs_cuda = MODELS[model]
    seq, images, small_batch, large_batch = SHAPES[shape]
    return E2ECase(model, preset, batch=small_batch if model == "demo" else large_batch, seq=seq, images=images,
                   shape_name=shape, needs_cuda=needs_cuda, overrides=overrides)


E2E_CASES = tuple(e2e_case(m, s) for m in MODELS for s in SHAPES)
QUICK_DEMO = E2ECase("demo", "demo", batch=2, seq=64, images=2, shape_name="quick")


# -- FLOP formulas for the attention custom ops ----------------------------------------------------------------------
def register_op_flop_formulas() -> None:
    """Teach FlopCounterMode the flamingo_fast attention ops (it cannot see inside custom ops)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    lib = torch.ops.flamingo_fast
    if lib.attention_fwd in flop_registry:
        return

    def heads_dim(q):
        return q.shape[2], q.shape[3]

    @register_flop_formula(lib.attention_fwd, get_raw=True)
    def _attention_fwd(q, k, v, causal, scale, backend, out_val=None, **kwargs):
        pairs = q.shape[0] * flops.attention_pairs(q.shape[1], k.shape[1], causal)
        return int(flops.attention_flops(pairs, *heads_dim(q), "fwd"))

    @register_flop_formula(lib.attention_bwd, get_raw=True)
    def _attention_bwd(dout, q, k, v, out, lse, causal, scale, backend, out_val=None, **kwargs):
        pairs = q.shape[0] * flops.attention_pairs(q.shape[1], k.shape[1], causal)
        return int(flops.attention_flops(pairs, *heads_dim(q), "bwd"))

    @register_flop_formula(lib.media_cross_attention_fwd, get_raw=True)
    def _media_fwd(q, k, v, media_index, latents, only_immediate, scale, backend, out_val=None, **kwargs):
        pairs = flops.media_pairs(media_index, latents, only_immediate)
        return int(flops.attention_flops(pairs, *heads_dim(q), "fwd"))

    @register_flop_formula(lib.media_cross_attention_bwd, get_raw=True)
    def _media_bwd(dout, q, k, v, out, lse, media_index, latents, only_immediate, scale, backend, out_val=None,
                   **kwargs):
        pairs = flops.media_pairs(media_index, latents, only_immediate)
        return int(flops.attention_flops(pairs, *heads_dim(q), "bwd"))

    @register_flop_formula(lib.perceiver_attention_fwd, get_raw=True)
    def _perceiver_fwd(q, k, v, scale, backend, out_val=None, **kwargs):
        pairs = q.shape[0] * q.shape[1] * k.shape[1]
        return int(flops.attention_flops(pairs, *heads_dim(q), "fwd"))

    @register_flop_formula(lib.perceiver_attention_bwd, get_raw=True)
    def _perceiver_bwd(dout, q, k, v, out, lse, scale, backend, out_val=None, **kwargs):
        pairs = q.shape[0] * q.shape[1] * k.shape[1]
        return int(flops.attention_flops(pairs, *heads_dim(q), "bwd"))


# -- model, batch, step ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def forced_backend(name: str):
    """Route every attention op of the model to `name` (the models never pass backend= themselves)."""
    previous = os.environ.get(ops.ENV_VAR)
    os.environ[ops.ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ops.ENV_VAR, None)
        else:
            os.environ[ops.ENV_VAR] = previous


def make_batch(cfg, case: E2ECase, device, seed: int):
    """input_ids with `<image>` tokens after 4 text tokens then evenly spaced, labels = input_ids, images."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.lm.vocab_size, (case.batch, case.seq), generator=generator)
    lead = min(4, case.seq // 2)
    positions = lead + torch.arange(case.images) * (case.seq - lead) // case.images
    ids[:, positions] = cfg.image_token_id
    size = cfg.vision.image_size
    images = torch.randn(case.batch, case.images, 1, cfg.vision.channels, size, size, generator=generator)
    return ids.to(device), images.to(device), ids.clone().to(device)


def build_model(cfg, device, seed: int):
    from flamingo_fast import Flamingo

    torch.manual_seed(seed)
    model = Flamingo(cfg).to(device)
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(0.5)
            layer.ffw_gate.fill_(0.5)
    return model


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_step(model_fn, model, batch, device, dtype, backend: str = "torch") -> Callable[[], torch.Tensor]:
    """One training step: zero grads, forward + loss (autocast on CUDA), backward, AdamW step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    input_ids, images, labels = batch

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with forced_backend(backend), _autocast(device, dtype):
            loss = model_fn(input_ids, images, labels=labels).loss
        with forced_backend(backend):
            loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def count_step_flops(model, batch, device, dtype) -> float:
    """Model FLOPs of one forward + backward (eager, torch backend), optimizer excluded."""
    from torch.utils.flop_counter import FlopCounterMode

    register_op_flop_formulas()
    input_ids, images, labels = batch
    counted = copy.deepcopy(model)
    with forced_backend("torch"), FlopCounterMode(display=False) as counter:
        with _autocast(device, dtype):
            loss = counted(input_ids, images, labels=labels).loss
        loss.backward()
    return float(counter.get_total_flops())


def reference_loss(model, batch) -> float:
    """The same model and batch in float64, eager, torch backend: the loss every variant must reproduce."""
    model64 = copy.deepcopy(model).double()
    input_ids, images, labels = batch
    with torch.no_grad(), forced_backend("torch"):
        loss = model64(input_ids, images.double(), labels=labels).loss.item()
    del model64
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_bytes(model, batch, settings: Settings) -> int:
    """Memory one forward leaves for the backward (plus the scalar loss): CUDA allocated bytes before and after,
    or on CPU the net of the CPU allocator's allocations and frees during the forward (torch.profiler)."""
    input_ids, images, labels = batch
    model.zero_grad(set_to_none=True)

    def forward():
        with forced_backend("torch"), _autocast(settings.device, settings.dtype):
            return model(input_ids, images, labels=labels).loss

    if settings.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = forward()
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = forward()
        kept = sum(event.self_cpu_memory_usage for event in prof.profiler.function_events)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return max(kept, 0)


def time_steps(step: Callable[[], torch.Tensor], settings: Settings) -> float:
    if settings.device.type != "cuda":
        return time_cpu(step, settings.min_time_s)
    step()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# -- rows -------------------------------------------------------------------------------------------------------------
def _row(case: E2ECase, variant: str, settings: Settings, compile_mode: str = "regional") -> Row:
    shape = {"preset": case.preset, "overrides": case.overrides, "batch": case.batch, "seq": case.seq,
             "images": case.images, "shape": case.shape_name}
    if variant in COMPILED:
        shape["compile_mode"] = compile_mode
    return Row(op=OP, case=case.label, impl=variant, direction="fwd+bwd", device=settings.device_name,
               dtype=DTYPE_NAMES[settings.dtype], threads=settings.threads, seq_len=case.seq, series=case.name,
               shape=shape)


def _cuda_reason(cfg, settings: Settings) -> Optional[str]:
    """Why the fused kernels cannot serve this model's three attention ops here, or None."""
    device, dtype = settings.device, settings.dtype
    probes = {
        "attention": (cfg.lm.heads, cfg.lm.n_kv_heads, cfg.lm.head_dim),
        "media_cross_attention": (cfg.xattn.heads, cfg.xattn.n_kv_heads, cfg.xattn.head_dim),
        "perceiver_attention": (cfg.resampler.heads, cfg.resampler.heads, cfg.resampler.head_dim),
    }
    for op, (hq, hkv, d) in probes.items():
        q = torch.empty(1, 1, hq, d, device=device, dtype=dtype)
        kv = torch.empty(1, 1, hkv, d, device=device, dtype=dtype)
        reason = ops.cuda_unsupported_reason(op, q, kv, kv)
        if reason is not None:
            return f"{op}: {reason}"
    return None


def _fp8_reason(settings: Settings) -> Optional[str]:
    """Why float8 training of the frozen LM cannot run here, or None (never a silent bf16 fallback)."""
    from flamingo_fast.models.float8 import float8_unsupported_reason

    return float8_unsupported_reason(settings.device)


def _variant_reason(variant: str, cfg, settings: Settings) -> Optional[str]:
    reason = _cuda_reason(cfg, settings) if "cuda" in variant else None
    if reason is None and variant.endswith("fp8"):
        reason = _fp8_reason(settings)
    return reason


@dataclass
class E2EModel:
    """One model of the comparison (ours, or OpenFlamingo's) with its float64 loss and FLOPs per step."""

    base: torch.nn.Module
    loss64: float
    step_flops: float
    parameters: dict


@dataclass
class E2EPrepared:
    """What the variants of one case share: config, batch, our model and (built on first use) OpenFlamingo's."""

    case: E2ECase
    cfg: object
    batch: tuple
    ours: E2EModel
    theirs: Optional[E2EModel] = None

    def model(self, variant: str, settings: Settings) -> E2EModel:
        if variant != "openflamingo":
            return self.ours
        if self.theirs is None:
            self.theirs = _prepare_model(_open_flamingo_like(self.ours.base, self.cfg, settings), self.batch, settings)
        return self.theirs


def _count(model: torch.nn.Module) -> dict:
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _prepare_model(model: torch.nn.Module, batch: tuple, settings: Settings) -> E2EModel:
    return E2EModel(model, reference_loss(model, batch), count_step_flops(model, batch, settings.device,
                                                                          settings.dtype), _count(model))


def _open_flamingo_like(ours, cfg, settings: Settings) -> torch.nn.Module:
    try:
        from bench.openflamingo_model import build_open_flamingo

        torch.manual_seed(settings.seed)
        return build_open_flamingo(cfg, copy.deepcopy(ours.vision)).to(settings.device)
    except ImportError as exc:
        raise Unavailable(f"OpenFlamingo baseline needs open-flamingo, einops, einops-exts, transformers: {exc}")


def prepare_e2e(case: E2ECase, settings: Settings) -> E2EPrepared:
    if case.needs_cuda and settings.device.type != "cuda":
        raise Unavailable(f"the {case.name} model needs a CUDA GPU (minutes per step on a CPU)")
    cfg = case.config()
    base = build_model(cfg, settings.device, settings.seed)
    batch = make_batch(cfg, case, settings.device, settings.seed)
    return E2EPrepared(case, cfg, batch, _prepare_model(base, batch, settings))


@dataclass
class E2EChecked:
    step: Callable[[], torch.Tensor]
    first_loss: float
    max_abs_err: float
    rel_err: float
    tolerance: float
    first_step_s: float  # wall time of the first step: compilation (if any) + one step
    model: torch.nn.Module  # the model the step trains (a copy of the variant's base)

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance


def check_variant(prepared: E2EPrepared, variant: str, settings: Settings,
                  compile_mode: str = "regional") -> E2EChecked:
    """A fresh copy of the variant's model, its training step, and the first step's loss error.
    Raises Unavailable when the variant cannot run here (no kernels for these shapes, no Hopper, ...)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    reason = _variant_reason(variant, prepared.cfg, settings)
    if reason is not None:
        raise Unavailable(reason)
    reference = prepared.model(variant, settings)
    torch._dynamo.reset()
    model = copy.deepcopy(reference.base)
    if variant in CHECKPOINTED:
        from train.parallel import apply_activation_checkpointing

        for block in model.lm.layers:
            apply_activation_checkpointing(block, CHECKPOINTED[variant])
    if variant.endswith("fp8"):
        from flamingo_fast.models.float8 import convert_frozen_lm_to_float8

        convert_frozen_lm_to_float8(model, settings.device)
    if variant in COMPILED:
        compile_model(model, compile_mode)
    step = make_step(model, model, prepared.batch, settings.device, settings.dtype,
                     backend="cuda" if "cuda" in variant else "torch")
    _sync(settings.device)
    started = time.perf_counter()
    first_loss = step().item()  # before any update: comparable with the float64 model's loss
    first_step_s = time.perf_counter() - started
    error = abs(first_loss - reference.loss64)
    return E2EChecked(step, first_loss, error, error / abs(reference.loss64), TOLERANCE[settings.dtype], first_step_s,
                      model)


def bench_e2e_case(case: E2ECase, variants: tuple[str, ...], settings: Settings, peaks: Peaks,
                   on_row: Callable[[Row], None] = lambda row: None, compile_mode: str = "regional") -> list[Row]:
    rows = [_row(case, v, settings, compile_mode) for v in variants]
    try:
        prepared = prepare_e2e(case, settings)
    except Unavailable as exc:
        return mark_rows(rows, "unavailable", str(exc), on_row)
    for row in rows:
        row.oracle = "eager-fp64 loss"
        _bench_variant(row, prepared, settings, peaks, compile_mode)
        on_row(row)
    return rows


def _bench_variant(row: Row, prepared: E2EPrepared, settings: Settings, peaks: Peaks, compile_mode: str) -> None:
    reason = _variant_reason(row.impl, prepared.cfg, settings)
    if reason is not None:
        row.status, row.note = "unavailable", reason
        return
    if row.impl in COMPILED and settings.skip_compiled:
        row.status, row.note = "skipped", COMPILE_SKIP_NOTE
        return
    if row.impl in COMPILED and settings.skip_model_compile:
        row.status, row.note = "skipped", MODEL_COMPILE_SKIP_NOTE
        return
    try:
        model = prepared.model(row.impl, settings)
        row.gflop = model.step_flops / 1e9
        row.shape["parameters"], row.shape["trainable"] = model.parameters["total"], model.parameters["trainable"]
        checked = check_variant(prepared, row.impl, settings, compile_mode)
    except Unavailable as exc:
        row.status, row.note = "unavailable", str(exc)
        return
    except Exception as exc:  # reported in the table, never fatal for the whole run
        row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        return
    row.available = True
    row.tolerance, row.max_abs_err, row.rel_err = checked.tolerance, checked.max_abs_err, checked.rel_err
    if not checked.ok:
        row.status = "wrong"
        row.note = (f"refused to time: loss {checked.first_loss:.6g} vs float64 {model.loss64:.6g} "
                    f"(rel_err {checked.rel_err:.3g} > {checked.tolerance:g})")
        return
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row.ms = time_steps(checked.step, settings)
    seconds = row.ms * 1e-3
    if row.impl in COMPILED:
        row.compile_s = max(checked.first_step_s - seconds, 0.0)
    row.tflops = model.step_flops / seconds / 1e12
    row.tokens_per_s = prepared.case.batch * prepared.case.seq / seconds
    row.mfu = row.peak_fraction = row.tflops / peaks.tflops
    row.bound = "compute"
    row.status = "ok"
    if settings.device.type == "cuda":
        row.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        row.note = "peak memory is measured on CUDA only"
    if row.impl not in COMPILED:  # a compiled graph's saved tensors would be measured the same way, but its
        # first forward also allocates the compiled code's buffers
        row.activation_mb = activation_bytes(checked.model, prepared.batch, settings) / 2**20


def select_e2e_cases(models: Optional[list[str]], shapes: Optional[list[str]], quick: bool,
                     device: torch.device) -> list[E2ECase]:
    """The matrix to run. Default: on CUDA every model x shape; on CPU the demo model at every shape.
    --quick: one small demo case."""
    if quick:
        return [QUICK_DEMO]
    default_models = list(MODELS) if device.type == "cuda" else ["demo"]
    return [e2e_case(m, s) for m in (models or default_models) for s in (shapes or list(SHAPES))]


def bench_e2e(settings: Settings, peaks: Peaks, quick: bool, variants: tuple[str, ...] = VARIANTS,
              on_row: Callable[[Row], None] = lambda row: None, models: Optional[list[str]] = None,
              shapes: Optional[list[str]] = None, compile_mode: str = "regional") -> list[Row]:
    rows = []
    for case in select_e2e_cases(models, shapes, quick, settings.device):
        rows += bench_e2e_case(case, variants, settings, peaks, on_row, compile_mode)
    return rows

