"""The end-to-end training step (bench/e2e.py) as pytest-benchmark tests: `pytest bench --benchmark-only`.

demo model: torch (eager), compile, cuda (fused kernels); the ~1B model on CUDA only. Each variant's first
step must reproduce the float64 model's loss within the dtype's tolerance before it is timed.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.e2e import E2E_CASES, QUICK_DEMO, VARIANTS, check_variant, prepare_e2e
from bench.harness import Settings
from bench.impls import Unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
QUICK = os.environ.get("FLAMINGO_BENCH_QUICK", "") not in ("", "0")
SETTINGS = Settings(device=DEVICE, dtype=DTYPE, min_time_s=1.0)
CASES = (QUICK_DEMO,) if QUICK else E2E_CASES
_prepared: dict = {}


@pytest.mark.benchmark
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, case, variant):
    try:
        if case.label not in _prepared:  # the model, batch and float64 loss, shared by the variants
            _prepared.clear()
            _prepared[case.label] = prepare_e2e(case, SETTINGS)
        prepared = _prepared[case.label]
        checked = check_variant(prepared, variant, SETTINGS)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(rel_err=checked.rel_err, loss=checked.first_loss, loss_fp64=prepared.loss64)
    if not checked.ok:
        pytest.fail(f"refused to time: loss {checked.first_loss} vs float64 {prepared.loss64}")

    def step():
        checked.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=case.batch * case.seq / seconds,
                                tflops=prepared.step_flops / seconds / 1e12)
