"""The kernel tests' error metric (tests/kernel_tolerance.py) flags what a wrong kernel produces and lets a
right one pass: it needs no GPU, so it runs everywhere (the GPU tests rely on it)."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_tolerance import assert_close


def _noisy(want: torch.Tensor, rms: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return want * (1 + rms * math.sqrt(3) * (2 * torch.rand(want.shape, dtype=torch.float64, generator=g) - 1))


def test_a_two_percent_error_fails_the_bf16_bound_and_half_a_percent_passes():
    want = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("perturbed", _noisy(want, 0.02), want, 1e-2)
    assert_close("rounding", _noisy(want, 0.005), want, 1e-2)  # bf16-sized rounding passes


def test_unwritten_elements_wrong_shapes_and_nonzero_where_zero_is_exact_fail():
    want = torch.randn(4, 8, dtype=torch.float64)
    got = want.clone()
    got[1, 3] = float("nan")  # what a poisoned, never-written output element looks like
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("nan", got, want, 1e-2)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("shape", want.t(), want, 1e-2)
    with pytest.raises(AssertionError, match="exact zeros"):
        assert_close("zeros", torch.full((3,), 1e-9, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1e-2)
    assert_close("zeros", torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=torch.float64), 1e-2)


def test_floor_bounds_the_denominator_only_from_below():
    want = torch.full((10,), 1e-12, dtype=torch.float64)
    got = want + 1e-9
    with pytest.raises(AssertionError):
        assert_close("no floor", got, want, 1e-2)
    assert_close("floor", got, want, 1e-2, floor=1.0)
