"""GPU profiles for the planner: one table of peak compute, memory and interconnect figures.

Peak, HBM and link figures are the vendors' published numbers for the SXM parts (dense bf16; NVLink 4 at
900 GB/s in both directions = 450 GB/s each way; one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s). The
efficiency (the fraction of peak a training step reaches) is measured: `from_bench_json` reads it from a
`bench/results` train-step JSON of that GPU (the best compile+cuda MFU row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class GpuProfile:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gib: float
    nvlink_gbps: float  # per GPU, each direction
    network_gbps: float  # per GPU, each direction, between nodes
    gpus_per_node: int
    efficiency: float  # fraction of peak_tflops a train step reaches
    efficiency_source: str

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GIB)


# H200 measured 2026-12-04 (bench/results/2026-12-04-nvidia-h200-train-step.json): compile+cuda steps of a
# 3b-shape model at 385-403 TFLOP/s, 39-41% of the 989 spec (48-50% of the 805 measured matmul peak).
_MEASURED = 0.39
_SOURCE = "3b-shape compile+cuda train steps on an H200, bench/results/2026-12-04-nvidia-h200-train-step.md"
PROFILES = {
    "h100-80gb": GpuProfile("NVIDIA H100 SXM 80GB", 989.0, 80, 450.0, 50.0, 8, _MEASURED,
                            _SOURCE + " (H100 and H200 share the compute die)"),
    "h200-141gb": GpuProfile("NVIDIA H200 SXM 141GB", 989.0, 141, 450.0, 50.0, 8, _MEASURED, _SOURCE),
}


def get_profile(name: str) -> GpuProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown GPU profile {name!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[name]


def from_bench_json(profile: GpuProfile, path: str | Path) -> GpuProfile:
    """`profile` with the efficiency of the best compile+cuda train-step row of a bench JSON measured on that
    GPU: the row's achieved TFLOP/s over the profile's peak."""
    rows = json.loads(Path(path).read_text())
    steps = [r for r in rows if r.get("op") == "train_step" and r.get("impl") == "compile+cuda" and r.get("tflops")]
    if not steps:
        raise ValueError(f"{path}: no train_step rows of compile+cuda with a measured tflops")
    best = max(steps, key=lambda r: r["tflops"])
    return replace(profile, efficiency=best["tflops"] / profile.peak_tflops,
                   efficiency_source=f"{path}: {best['case']}, compile+cuda at {best['tflops']:.0f} TFLOP/s")
