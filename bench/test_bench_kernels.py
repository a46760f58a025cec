"""The kernel benchmark cases as pytest-benchmark tests (under bench/, so the default `pytest` run, whose
testpaths is tests/, never collects them).

    pytest bench --benchmark-only                              # this device's case set (GPU or scaled CPU)
    FLAMINGO_BENCH_QUICK=1 pytest bench --benchmark-only       # the --quick cases
    pytest bench --benchmark-only --benchmark-autosave         # then, after a change:
    pytest bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each test checks its implementation against the float64 oracle first (failing, untimed, when it
disagrees, exactly like `python -m bench`), skips when the implementation is unavailable here, and
stores tflops, gbps, rel_err and max_abs_err in `benchmark.extra_info`.
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import select_cases
from bench.flops import DIRECTIONS
from bench.harness import (LatestPrepared, Settings, check_impl, prepare_case, quick_requested, refusal_note,
                           synchronized)
from bench.impls import IMPLS, Skipped, Unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES, _ = select_cases(DEVICE.type, quick_requested())
PARAMS = [
    pytest.param(case, direction, impl, id=f"{case.op}[{case.name}]-{direction}-{impl.name}")
    for case in CASES
    for direction in DIRECTIONS
    for impl in IMPLS.values()
    if case.op in impl.ops
]
SETTINGS = Settings(device=DEVICE, dtype=DTYPE, min_time_s=1.0)
_prepared = LatestPrepared()  # inputs and oracle of one (case, direction), shared by its implementations


@pytest.mark.benchmark
@pytest.mark.parametrize("case, direction, impl", PARAMS)
def test_kernel(benchmark, case, direction, impl):
    if impl.compiled:
        torch._dynamo.reset()
    prepared = _prepared.get((case, direction), lambda: prepare_case(case, direction, SETTINGS))
    try:
        checked = check_impl(case, impl, direction, prepared, SETTINGS)
    except (Skipped, Unavailable, NotImplementedError) as exc:
        pytest.skip(str(exc).split("\n")[0])
    benchmark.extra_info.update(rel_err=checked.rel_err, max_abs_err=checked.max_abs_err,
                                tolerance=checked.tolerance, oracle=prepared.oracle, dtype=str(DTYPE))
    if not checked.ok:
        pytest.fail(refusal_note(checked, prepared.oracle))

    timed = synchronized(checked.call, DEVICE)
    rounds = max(3, min(50, int(1.0 / max(checked.first_call_s, 1e-4))))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    flop, nbytes = case.flops(direction), case.bytes(direction, prepared.inputs.q.element_size())
    benchmark.extra_info.update(tflops=flop / seconds / 1e12, gbps=nbytes / seconds / 1e9)
