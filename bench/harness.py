"""Timing, the float64 correctness gate, and the peaks measured in the same run.

For one (case, direction) the harness builds every implementation, runs it once and compares its output
(and for "fwd+bwd" its dq, dk, dv) with a float64 oracle. Only an implementation within tolerance is
timed; one that disagrees gets a row with rel_err filled, ms null and a note saying it was refused.

- Oracle: flamingo_fast.ops' `reference` backend on float64 copies of the inputs, or, where its dense
  score matrix is too big (see impls.REFERENCE_SCORE_LIMIT), the chunked `torch` backend in float64 (the
  ops tests hold the two to 1e-10 of each other). The row's `oracle` field says which.
- Error: max_abs_err = max |x - x64| over all compared tensors; rel_err = max over the tensors of
  max |x - x64| / max |x64| (the error relative to the tensor's largest magnitude).
- Tolerance on rel_err by dtype: bfloat16 1e-2, float16 5e-3, float32 1e-4, float64 1e-10.
- Time: median. On CUDA `triton.testing.do_bench` (median; CUDA events when triton is missing); on CPU
  wall clock after a warm-up call, repeated until `min_time_s` has passed (at least 3 repeats, 2 for
  calls over 2 s; the correctness call is the warm-up of calls over 0.5 s).
- Peaks: a square matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write) in the run's dtype,
  timed the same way. A row's peak_fraction is its FLOP rate over the roofline bound
  min(peak TFLOP/s, intensity * peak GB/s), intensity = FLOPs / minimal bytes; `bound` says which applies.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from bench.cases import Case, Inputs
from bench.impls import IMPLS, Impl, Skipped, Unavailable, ops_fn, reference_score_limit

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
COMPILE_SKIP_NOTE = ("skipped by --quick: torch.compile takes 10-70 s per graph (name it in --impls, or in --variants "
                     "for train_step, to include it)")
COMPILED_CASES_NOTE = ("CPU: torch.compile-based implementations run on the last case of each op only "
                       "(compiling takes 10-70 s per graph here; name them in --impls to run them everywhere)")
MODEL_COMPILE_SKIP_NOTE = ("skipped on CPU: compiling the model takes 30-60 s per case on a small CPU "
                           "(name the variant in --variants to include it)")


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    min_time_s: float = 1.0  # CPU: keep repeating a measurement at least this long
    seed: int = 0
    skip_compiled: bool = False  # --quick: skip the torch.compile-based implementations
    skip_model_compile: bool = False  # CPU: skip torch.compile of the whole model (train_step "compile")
    compiled_cases: Optional[frozenset] = None  # case names where compile/flex run (None: all cases)
    device_name: str = "cpu"  # e.g. "cpu-2core", "nvidia-h200": names the saved result file
    threads: int = 1  # torch intra-op threads of the run


@dataclass
class Peaks:
    tflops: float  # measured square-matmul rate in the run's dtype
    gbps: float  # measured device-to-device copy rate (bytes read + written per second)
    matmul_n: int
    copy_bytes: int


@dataclass
class Row:
    """One JSON object of the results list (public fields first; see bench/README.md)."""

    op: str
    case: str
    impl: str
    direction: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    rel_err: Optional[float] = None
    available: bool = False
    note: str = ""
    # -- extra fields
    status: str = "unavailable"  # ok | wrong | unavailable | skipped | error
    max_abs_err: Optional[float] = None
    tolerance: Optional[float] = None
    speedup_vs_best_peer: Optional[float] = None
    best_peer: Optional[str] = None
    peak_fraction: Optional[float] = None
    bound: Optional[str] = None  # compute | memory (roofline)
    gflop: Optional[float] = None
    oracle: Optional[str] = None
    device: str = ""
    dtype: str = ""
    threads: Optional[int] = None
    seq_len: Optional[int] = None
    series: str = ""
    shape: dict = field(default_factory=dict)
    # train_step rows only
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    compile_s: Optional[float] = None  # first step's wall time less a steady step (compiled variants)
    activation_mb: Optional[float] = None  # memory one forward keeps for the backward (eager variants)
    # data rows only
    samples_per_s: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


# -- shared by the pytest-benchmark files (bench/test_bench_*.py) ------------------------------------------------
def quick_requested() -> bool:
    """FLAMINGO_BENCH_QUICK=1: the pytest benchmarks run their --quick cases only."""
    return os.environ.get("FLAMINGO_BENCH_QUICK", "") not in ("", "0")


class LatestPrepared:
    """Prepared inputs (model, data, oracle) of the newest case only, shared by that case's parametrized
    variants; preparing another case drops the previous one to free its memory."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, key, prepare: Callable[[], object]):
        if self._key is None or self._key != key:
            self._key = self._value = None  # free the old case before building the new one
            self._value = prepare()  # may raise Unavailable: nothing is kept, the next variant retries
            self._key = key
        return self._value


def synchronized(call: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`call`, then wait for the GPU, so that a wall-clock timer sees the work finish."""

    def run() -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


# -- timing -----------------------------------------------------------------------------------------------------
def time_cpu(call: Callable[[], object], min_time_s: float, min_reps: int = 3, max_reps: int = 100,
             warmup: bool = True) -> float:
    """Median wall-clock milliseconds of call() after one warm-up call."""
    if warmup:
        call()
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_time_s and len(times) < max_reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_cuda(call: Callable[[], object]) -> float:
    """Median milliseconds on the current CUDA stream (triton's do_bench flushes L2 between runs)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(call, warmup=25, rep=100, return_mode="median"))
    for _ in range(3):
        call()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_call(call: Callable[[], object], settings: Settings, first_call_s: float = 0.0) -> float:
    """Median ms. On CPU a slow first call (compilation, or a long kernel) already warmed everything up,
    and calls over 2 s are repeated twice instead of three times to keep the run within minutes."""
    if settings.device.type == "cuda":
        return time_cuda(call)
    return time_cpu(call, settings.min_time_s, min_reps=2 if first_call_s > 2.0 else 3, warmup=first_call_s < 0.5)


def measure_peaks(settings: Settings, quick: bool = False) -> Peaks:
    """Matmul TFLOP/s and copy GB/s on the run's device and dtype, measured now (not assumed)."""
    device, dtype = settings.device, settings.dtype
    if device.type == "cuda":
        n, copy_bytes = 8192, 1 << 31
    else:
        n, copy_bytes = (1024, 1 << 26) if quick else (2048, 1 << 28)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_ms = time_call(lambda: torch.matmul(a, b), settings)
    del a, b
    elems = copy_bytes // torch.empty((), dtype=dtype).element_size()
    src = torch.ones(elems, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), settings)
    del src, dst
    return Peaks(
        tflops=2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        gbps=2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        matmul_n=n,
        copy_bytes=copy_bytes,
    )


# -- correctness ------------------------------------------------------------------------------------------------
def make_call(fn, inputs: Inputs, direction: str, dout: Optional[torch.Tensor]) -> Callable[[], tuple]:
    """A no-argument call running `fn` for `direction`: (out,) or (out, dq, dk, dv)."""
    if direction == "fwd":
        q, k, v = inputs.q, inputs.k, inputs.v

        def forward():
            with torch.no_grad():
                return (fn(q, k, v),)

        return forward
    if direction != "fwd+bwd":
        raise ValueError(f"direction must be 'fwd' or 'fwd+bwd', got {direction!r}")
    q, k, v = (x.detach().requires_grad_() for x in (inputs.q, inputs.k, inputs.v))

    def forward_backward():
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return forward_backward


def oracle_outputs(case: Case, inputs: Inputs, direction: str, dout: Optional[torch.Tensor],
                   device: torch.device) -> tuple[tuple[torch.Tensor, ...], str]:
    """float64 (out[, dq, dk, dv]) and the oracle's name."""
    backend = "reference" if case.score_elements <= reference_score_limit(device) else "torch"
    inputs64 = Inputs(inputs.q.double(), inputs.k.double(), inputs.v.double(), inputs.media_index)
    dout64 = None if dout is None else dout.double()
    outputs = make_call(ops_fn(case, inputs64, backend), inputs64, direction, dout64)()
    return tuple(t.detach() for t in outputs), f"{backend}-fp64"


def compare(outputs, references) -> tuple[float, float]:
    """(max_abs_err, rel_err) of outputs against float64 references; inf when an output is not finite."""
    max_abs, rel = 0.0, 0.0
    for out, ref in zip(outputs, references, strict=True):
        if out.shape != ref.shape:
            raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
        diff = (out.detach().double() - ref).abs().max().item() if out.numel() else 0.0
        if not math.isfinite(diff):
            return math.inf, math.inf
        scale = ref.abs().max().item() if ref.numel() else 0.0
        max_abs = max(max_abs, diff)
        rel = max(rel, diff / max(scale, 1e-300))
    return max_abs, rel


# -- one (case, direction) -----------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the implementations of one (case, direction) share: inputs, dout and the float64 oracle."""

    inputs: Inputs
    dout: Optional[torch.Tensor]
    references: tuple[torch.Tensor, ...]
    oracle: str


def prepare_case(case: Case, direction: str, settings: Settings) -> Prepared:
    inputs = case.make_inputs(settings.device, settings.dtype, settings.seed)
    dout = None
    if direction == "fwd+bwd":
        generator = torch.Generator().manual_seed(settings.seed + 1)
        dout = torch.randn(inputs.q.shape, generator=generator).to(settings.device, settings.dtype)
    references, oracle = oracle_outputs(case, inputs, direction, dout, settings.device)
    return Prepared(inputs, dout, references, oracle)


@dataclass
class Checked:
    """An implementation that ran once: its call (for timing) and its error against the oracle."""

    call: Callable[[], tuple]
    max_abs_err: float
    rel_err: float
    tolerance: float
    first_call_s: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance  # False for NaN / inf


def check_impl(case: Case, impl: Impl, direction: str, prepared: Prepared, settings: Settings) -> Checked:
    """Build and run `impl` once and compare with the oracle. Raises Skipped / Unavailable /
    NotImplementedError (cannot run here) or whatever the implementation raised."""
    inputs = prepared.inputs
    call = make_call(impl.build(case, inputs, settings.device), inputs, direction, prepared.dout)
    start = time.perf_counter()
    outputs = call()
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    max_abs, rel = compare(outputs, prepared.references)
    return Checked(call, max_abs, rel, TOLERANCE[settings.dtype], first_call_s)


def refusal_note(checked: Checked, oracle: str) -> str:
    if not math.isfinite(checked.rel_err):
        return "refused to time: the output contains NaN or Inf"
    return f"refused to time: rel_err {checked.rel_err:.3g} > tolerance {checked.tolerance:g} ({oracle} oracle)"


def _base_row(case: Case, impl: str, direction: str, settings: Settings) -> Row:
    return Row(
        op=case.op, case=case.name, impl=impl, direction=direction, device=settings.device_name,
        dtype=DTYPE_NAMES[settings.dtype], threads=settings.threads, seq_len=case.seq_len, series=case.series,
        shape=case.to_dict(), gflop=case.flops(direction) / 1e9,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return text[:300] or type(exc).__name__


def bench_impl(case: Case, impl: Impl, direction: str, prepared: Prepared, settings: Settings, peaks: Peaks) -> Row:
    """One row: build, check against the oracle, and time only when within tolerance."""
    row = _base_row(case, impl.name, direction, settings)
    row.oracle = prepared.oracle
    if impl.compiled and settings.skip_compiled:
        row.status, row.note = "skipped", COMPILE_SKIP_NOTE
        return row
    if impl.compiled and settings.compiled_cases is not None and case.name not in settings.compiled_cases:
        row.status, row.note = "skipped", COMPILED_CASES_NOTE
        return row
    try:
        checked = check_impl(case, impl, direction, prepared, settings)
    except Skipped as exc:
        row.status, row.note = "skipped", _describe(exc)
        return row
    except (Unavailable, NotImplementedError) as exc:
        row.status, row.note = "unavailable", _describe(exc)
        return row
    except Exception as exc:  # a real failure: reported in the table, never fatal for the whole run
        row.status, row.note = "error", f"{type(exc).__name__}: {_describe(exc)}"
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()  # e.g. after an out-of-memory error, so the next implementation starts clean
        return row
    row.available = True
    row.tolerance = checked.tolerance
    row.max_abs_err = checked.max_abs_err if math.isfinite(checked.max_abs_err) else None
    row.rel_err = checked.rel_err if math.isfinite(checked.rel_err) else None
    if not checked.ok:
        row.status, row.note = "wrong", refusal_note(checked, prepared.oracle)
        return row
    row.ms = time_call(checked.call, settings, checked.first_call_s)
    fill_rates(row, case.flops(direction), case.bytes(direction, prepared.inputs.q.element_size()), peaks)
    row.status = "ok"
    return row


def fill_rates(row: Row, flop: float, nbytes: float, peaks: Peaks) -> None:
    """tflops, gbps, and the fraction of the roofline bound min(peak FLOP/s, intensity * peak bytes/s)."""
    seconds = row.ms * 1e-3
    row.tflops = flop / seconds / 1e12
    row.gbps = nbytes / seconds / 1e9
    memory_bound_tflops = flop / nbytes * peaks.gbps / 1e3
    row.bound = "memory" if memory_bound_tflops < peaks.tflops else "compute"
    row.peak_fraction = row.tflops / min(peaks.tflops, memory_bound_tflops)


def bench_case(case: Case, direction: str, impls: list[Impl], settings: Settings, peaks: Peaks,
               on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Rows for every implementation that applies to case.op, in `impls` order."""
    applicable = [impl for impl in impls if case.op in impl.ops]
    if not applicable:
        return []
    if any(impl.compiled for impl in applicable):
        torch._dynamo.reset()  # fresh compile caches per case: no recompile limits, no dynamic-shape fallback
    prepared = prepare_case(case, direction, settings)
    rows = []
    for impl in applicable:
        row = bench_impl(case, impl, direction, prepared, settings, peaks)
        on_row(row)
        rows.append(row)
    return rows


def mark_rows(rows: list[Row], status: str, note: str, on_row: Callable[[Row], None]) -> list[Row]:
    """Give every row one status and note (e.g. a model that cannot run on this device) and report each."""
    for row in rows:
        row.status, row.note = status, note
        on_row(row)
    return rows


def fill_best_peer(rows: list[Row], exclude: tuple[str, ...] = ("reference",)) -> None:
    """speedup_vs_best_peer = (fastest OTHER timed implementation of the same op, case and direction) / ms.

    > 1: faster than every peer; < 1: that much slower than the best one. The float64 `reference` is an
    oracle, not a competitor, so it is never anyone's peer (it still gets its own ratio).
    """
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.case, row.direction), []).append(row)
    for group in groups.values():
        for row in group:
            peers = [p for p in group if p is not row and p.ms is not None and p.impl not in exclude]
            if row.ms is None or not peers:
                continue
            best = min(peers, key=lambda p: p.ms)
            row.best_peer, row.speedup_vs_best_peer = best.impl, best.ms / row.ms


def select_impls(names: Optional[list[str]] = None) -> list[Impl]:
    if not names:
        return list(IMPLS.values())
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; valid: {', '.join(IMPLS)}")
    return [IMPLS[n] for n in IMPLS if n in names]
