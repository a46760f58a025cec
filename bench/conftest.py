"""pytest settings for the pytest-benchmark cases under bench/ (never part of the default `pytest` run)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    """One intra-op thread on CPU by default, as `python -m bench` uses (see bench/README.md);
    FLAMINGO_BENCH_THREADS overrides it."""
    if torch.cuda.is_available():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FLAMINGO_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
