"""flamingo-fast benchmarks: every implementation of each attention op side by side, a training step, and
generation with the media K/V cached vs recomputed every step.

    python -m bench [--quick] [--json PATH] [--plot PATH] [--ops ...] [--impls ...] [--device cpu|cuda]
    flamingo-fast bench ...            (the same `main(argv)`)
    pytest bench --benchmark-only      (the same cases as pytest-benchmark tests)

Modules: flops (FLOP and byte counts), cases (shapes), impls (implementations), harness (timing,
float64 correctness gate, peaks), e2e (training step), generation (media K/V cache vs recomputation),
report (table, JSON, plot, markdown), cli (main).
See bench/README.md for the JSON schema and the conventions.
"""

from bench.cli import main

__all__ = ["main"]
