"""End-to-end benchmark: one Flamingo training step (forward, loss, backward, AdamW step on the trainable
parameters), for the `demo` preset and a ~1B-parameter model, in three variants (JSON `impl`):

  torch    eager PyTorch, attention ops on the `torch` backend
  compile  torch.compile(model), attention ops on the `torch` backend (no custom kernels)
  cuda     torch.compile(model), attention ops on the fused `cuda` kernels of flamingo_fast._C

Rows (op "train_step", direction "fwd+bwd") carry ms per step, tokens_per_s (text tokens), tflops (model
FLOPs per second), mfu (= peak_fraction: that rate over the matmul peak measured in the same run) and, on
CUDA, peak_mem_mb (torch.cuda.max_memory_allocated). Model FLOPs per step are counted once with
torch.utils.flop_counter.FlopCounterMode on an eager step: every aten matmul/linear (backward included), and
the attention custom ops through formulas registered here from bench.flops (backward = 2.5 x forward).

The gates of every xattn layer are set to 0.5 (they start at 0, which would hide the cross-attention from
the loss). Correctness gate: the first step's loss must match a float64 eager copy of the same model on the
same batch within the dtype's tolerance, else the variant is refused (rel_err filled, ms null).
On CUDA the step runs under torch.autocast in the run's half dtype (fp32 parameters); on CPU in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
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

OP = "train_step"
VARIANTS = ("torch", "compile", "cuda")


@dataclass(frozen=True)
class E2ECase:
    name: str
    preset: str
    batch: int
    seq: int
    images: int
    needs_cuda: bool = False
    overrides: dict = field(default_factory=dict)

    def config(self):
        from flamingo_fast import FlamingoConfig

        return FlamingoConfig.from_preset(self.preset, **self.overrides)

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch} s{self.seq} img{self.images}"


# "1b": the 3b preset's dimensions (ViT-L/14, resampler 1536, LM D 2048) with 6 LM layers and an xattn
# layer every 2: 1.06B parameters, 316M of them trainable.
E2E_CASES = (
    E2ECase("demo", "demo", batch=4, seq=128, images=2),
    E2ECase("1b", "3b", batch=4, seq=2048, images=8, needs_cuda=True,
            overrides={"lm": {"layers": 6}, "xattn": {"every": 2}}),
)
QUICK_DEMO = E2ECase("demo", "demo", batch=2, seq=64, images=2)


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
def _row(case: E2ECase, variant: str, settings: Settings) -> Row:
    return Row(op=OP, case=case.label, impl=variant, direction="fwd+bwd", device=settings.device_name,
               dtype=DTYPE_NAMES[settings.dtype], threads=settings.threads, seq_len=case.seq, series=case.name,
               shape={"preset": case.preset, "overrides": case.overrides, "batch": case.batch, "seq": case.seq,
                      "images": case.images})


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


@dataclass
class E2EPrepared:
    """What the variants of one model share: config, initial model, batch, float64 loss, FLOPs per step."""

    case: E2ECase
    cfg: object
    base: torch.nn.Module
    batch: tuple
    loss64: float
    step_flops: float
    parameters: dict


def prepare_e2e(case: E2ECase, settings: Settings) -> E2EPrepared:
    if case.needs_cuda and settings.device.type != "cuda":
        raise Unavailable(f"the {case.name} model needs a CUDA GPU (minutes per step on a CPU)")
    cfg = case.config()
    base = build_model(cfg, settings.device, settings.seed)
    batch = make_batch(cfg, case, settings.device, settings.seed)
    return E2EPrepared(case, cfg, base, batch, reference_loss(base, batch),
                       count_step_flops(base, batch, settings.device, settings.dtype), base.parameter_counts())


@dataclass
class E2EChecked:
    step: Callable[[], torch.Tensor]
    first_loss: float
    max_abs_err: float
    rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance


def check_variant(prepared: E2EPrepared, variant: str, settings: Settings) -> E2EChecked:
    """A fresh copy of the model, its training step for `variant`, and the first step's loss error.
    Raises Unavailable when the fused kernels cannot serve this model here."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "cuda":
        reason = _cuda_reason(prepared.cfg, settings)
        if reason is not None:
            raise Unavailable(reason)
    torch._dynamo.reset()
    model = copy.deepcopy(prepared.base)
    model_fn = model if variant == "torch" else torch.compile(model)
    step = make_step(model_fn, model, prepared.batch, settings.device, settings.dtype,
                     backend="cuda" if variant == "cuda" else "torch")
    first_loss = step().item()  # before any update: comparable with the float64 model's loss
    error = abs(first_loss - prepared.loss64)
    return E2EChecked(step, first_loss, error, error / abs(prepared.loss64), TOLERANCE[settings.dtype])


def bench_e2e_case(case: E2ECase, variants: tuple[str, ...], settings: Settings, peaks: Peaks,
                   on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    rows = [_row(case, v, settings) for v in variants]
    try:
        prepared = prepare_e2e(case, settings)
    except Unavailable as exc:
        return mark_rows(rows, "unavailable", str(exc), on_row)
    for row in rows:
        row.gflop = prepared.step_flops / 1e9
        row.oracle = "eager-fp64 loss"
        row.shape["parameters"] = prepared.parameters["total"]
        row.shape["trainable"] = prepared.parameters["trainable"]
        _bench_variant(row, prepared, settings, peaks)
        on_row(row)
    return rows


def _bench_variant(row: Row, prepared: E2EPrepared, settings: Settings, peaks: Peaks) -> None:
    reason = _cuda_reason(prepared.cfg, settings) if row.impl == "cuda" else None
    if reason is not None:
        row.status, row.note = "unavailable", reason
        return
    if row.impl != "torch" and settings.skip_compiled:
        row.status, row.note = "skipped", COMPILE_SKIP_NOTE
        return
    if row.impl == "compile" and settings.skip_model_compile:
        row.status, row.note = "skipped", MODEL_COMPILE_SKIP_NOTE
        return
    try:
        checked = check_variant(prepared, row.impl, settings)
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
        row.note = (f"refused to time: loss {checked.first_loss:.6g} vs float64 {prepared.loss64:.6g} "
                    f"(rel_err {checked.rel_err:.3g} > {checked.tolerance:g})")
        return
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row.ms = time_steps(checked.step, settings)
    seconds = row.ms * 1e-3
    row.tflops = prepared.step_flops / seconds / 1e12
    row.tokens_per_s = prepared.case.batch * prepared.case.seq / seconds
    row.mfu = row.peak_fraction = row.tflops / peaks.tflops
    row.bound = "compute"
    row.status = "ok"
    if settings.device.type == "cuda":
        row.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        row.note = "peak memory is measured on CUDA only"


def bench_e2e(settings: Settings, peaks: Peaks, quick: bool, variants: tuple[str, ...] = VARIANTS,
              on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Rows for the demo model and the ~1B model (--quick: a smaller demo batch; the 1B model is skipped)."""
    rows = []
    for case in (QUICK_DEMO, E2E_CASES[1]) if quick else E2E_CASES:
        if quick and case.needs_cuda and settings.device.type == "cuda":
            rows += mark_rows([_row(case, v, settings) for v in variants], "skipped",
                              "skipped by --quick (demo model only)", on_row)
            continue
        rows += bench_e2e_case(case, variants, settings, peaks, on_row)
    return rows
