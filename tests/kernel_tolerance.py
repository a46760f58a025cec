"""The kernel tests' error metric (tests/test_kernels_gpu.py), importable without a GPU so that its own test
(tests/test_kernel_tolerance.py) runs on every machine."""

from __future__ import annotations

import torch


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, floor: float = 0.0) -> None:
    """Relative Frobenius error <= tol. `floor` bounds the denominator from below where the exact answer
    cancels to (nearly) zero although its terms do not, e.g. dq and dk with a single key."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values (an unwritten output element?)"
    err = (got64 - want).norm().item()
    norm = max(want.norm().item(), floor)
    if norm == 0.0:
        assert err == 0.0, f"{name}: expected exact zeros, got norm {err}"
    else:
        assert err / norm <= tol, f"{name}: relative error {err / norm:.3e} > {tol:.0e} (reference norm {norm:.3e})"
