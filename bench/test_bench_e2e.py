"""The end-to-end training step (bench/e2e.py) as pytest-benchmark tests: `pytest bench --benchmark-only`.

Every case of the matrix (bench/e2e.py: models x shapes; the 3b-width models on CUDA only) and every variant
(openflamingo, torch, compile, compile+cuda, compile+cuda+fp8; those that cannot run here are skipped with the
reason). Each variant's first step must reproduce its float64 model's loss within the dtype's tolerance
before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from bench.e2e import E2E_CASES, QUICK_DEMO, VARIANTS, check_variant, prepare_e2e
from bench.harness import LatestPrepared, Settings, quick_requested, synchronized
from bench.impls import Unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SETTINGS = Settings(device=DEVICE, dtype=DTYPE, min_time_s=1.0)
CASES = (QUICK_DEMO,) if quick_requested() else E2E_CASES
_prepared = LatestPrepared()  # the model, batch and float64 loss of one case, shared by its variants


@pytest.mark.benchmark
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, case, variant):
    try:
        prepared = _prepared.get(case.label, lambda: prepare_e2e(case, SETTINGS))
        checked = check_variant(prepared, variant, SETTINGS)
        loss64 = prepared.model(variant, SETTINGS).loss64
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(rel_err=checked.rel_err, loss=checked.first_loss, loss_fp64=loss64)
    if not checked.ok:
        pytest.fail(f"refused to time: loss {checked.first_loss} vs float64 {loss64}")

    benchmark.pedantic(synchronized(checked.step, DEVICE), rounds=5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=case.batch * case.seq / seconds,
                                tflops=prepared.model(variant, SETTINGS).step_flops / seconds / 1e12)
