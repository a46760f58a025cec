"""Generation with the media K/V cached vs recomputed every step (bench/generation.py) as pytest-benchmark
tests: `pytest bench --benchmark-only`. Each mode must first reproduce the cache-free greedy loop's tokens
(and its summed log-probs within the fp32 tolerance) before it is timed.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.generation import GENERATION_CASES, QUICK_GENERATION, check_mode, prepare_generation
from bench.harness import Settings
from bench.impls import Unavailable
from flamingo_fast.models.generate import MEDIA_CACHE_MODES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FLAMINGO_BENCH_QUICK", "") not in ("", "0")
SETTINGS = Settings(device=DEVICE, dtype=torch.float32, min_time_s=1.0)
CASES = (QUICK_GENERATION,) if QUICK else GENERATION_CASES
_prepared: dict = {}


@pytest.mark.benchmark
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
@pytest.mark.parametrize("mode", MEDIA_CACHE_MODES)
def test_generate(benchmark, case, mode):
    try:
        if case.label not in _prepared:  # the model, prompt and oracle, shared by the modes
            _prepared.clear()
            _prepared[case.label] = prepare_generation(case, SETTINGS)
    except Unavailable as exc:
        pytest.skip(str(exc))
    prepared = _prepared[case.label]
    checked = check_mode(prepared, prepared.call(mode))
    benchmark.extra_info.update(rel_err=checked.rel_err, media_cache=mode)
    if not checked.ok:
        pytest.fail(checked.refusal)

    def run():
        checked.run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=case.batch * case.new_tokens / seconds,
                                tflops=prepared.useful_flops / seconds / 1e12)
