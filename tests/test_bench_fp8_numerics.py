"""bench/fp8_numerics.py: the pass/fail rule of the float8-vs-bf16 loss check, and its refusal without a GPU."""

from __future__ import annotations

import pytest
import torch

from bench.fp8_numerics import compare_losses, main


def test_every_common_logged_step_must_be_within_tolerance():
    bf16 = {10: 5.0, 20: 2.0, 30: 1.0}
    close = compare_losses(bf16, {10: 5.02, 20: 1.995, 30: 1.006, 40: 9.0}, tolerance=0.01)
    assert close["passed"] and close["steps"] == [10, 20, 30] and close["worst_step"] == 30
    assert close["worst_gap"] == pytest.approx(0.006)
    late_drift = compare_losses(bf16, {10: 5.0, 20: 2.0, 30: 1.02}, tolerance=0.01)
    assert not late_drift["passed"] and late_drift["worst_step"] == 30
    with pytest.raises(ValueError, match="no common step"):
        compare_losses(bf16, {50: 1.0}, tolerance=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_refuses_without_a_float8_gpu(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "float8 training needs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
