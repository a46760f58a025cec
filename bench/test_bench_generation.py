"""Generation with the media K/V cached vs recomputed every step (bench/generation.py) as pytest-benchmark
tests: `pytest bench --benchmark-only`. Each mode must first reproduce the cache-free greedy loop's tokens
(and its summed log-probs within the fp32 tolerance) before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from bench.generation import GENERATION_CASES, QUICK_GENERATION, check_mode, prepare_generation
from bench.harness import LatestPrepared, Settings, quick_requested, synchronized
from bench.impls import Unavailable
from flamingo_fast.models.generate import MEDIA_CACHE_MODES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETTINGS = Settings(device=DEVICE, dtype=torch.float32, min_time_s=1.0)
CASES = (QUICK_GENERATION,) if quick_requested() else GENERATION_CASES
_prepared = LatestPrepared()  # the model, prompt and oracle of one case, shared by the modes


@pytest.mark.benchmark
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
@pytest.mark.parametrize("mode", MEDIA_CACHE_MODES)
def test_generate(benchmark, case, mode):
    try:
        prepared = _prepared.get(case.label, lambda: prepare_generation(case, SETTINGS))
    except Unavailable as exc:
        pytest.skip(str(exc))
    checked = check_mode(prepared, prepared.call(mode))
    benchmark.extra_info.update(rel_err=checked.rel_err, media_cache=mode)
    if not checked.ok:
        pytest.fail(checked.refusal)

    benchmark.pedantic(synchronized(checked.run, DEVICE), rounds=3, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=case.batch * case.new_tokens / seconds,
                                tflops=prepared.useful_flops / seconds / 1e12)
