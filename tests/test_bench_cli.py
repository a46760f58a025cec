"""Smoke test of `python -m bench --quick` (= `flamingo-fast bench --quick`) on CPU, and the JSON schema."""

import json
import tomllib
from pathlib import Path

import pytest

import bench
from bench.cases import OPS
from bench.e2e import VARIANTS as E2E_VARIANTS
from bench.impls import IMPL_NAMES
from bench.mllama_xattn import IMPLS as MLLAMA_IMPLS
from bench.packing import LAYOUTS as PACKING_LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_FIELDS = {
    "op": str, "case": str, "impl": str, "direction": str, "ms": (float, type(None)),
    "tflops": (float, type(None)), "gbps": (float, type(None)), "rel_err": (float, type(None)),
    "available": bool, "note": str,
}
GPU_ONLY = ("cuda", "sdpa_cudnn", "sdpa_efficient")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--min-time", "0.02", "--json", str(out / "quick.json"),
            "--plot", str(out / "quick.png"), "--save", str(out / "results"), "--date", "2026-01-02",
            "--device-name", "cpu-test"]
    assert bench.main(argv) == 0
    return out, json.loads((out / "quick.json").read_text())


@pytest.mark.slow  # the shared --quick run takes 10-30 s on the 2-core machine
def test_quick_json_schema(quick_run):
    _, rows = quick_run
    assert isinstance(rows, list) and rows
    for row in rows:
        for name, kind in PUBLIC_FIELDS.items():
            assert name in row, name
            assert isinstance(row[name], kind), (name, row[name])
        names = {"train_step": E2E_VARIANTS, "data": ("workers=0",), "packing": PACKING_LAYOUTS,
                 "mllama": MLLAMA_IMPLS}.get(row["op"], IMPL_NAMES)
        assert row["impl"] in names, row
        assert row["direction"] in ("fwd", "fwd+bwd")
        if row["ms"] is not None:  # timed rows passed the correctness gate and carry their rates
            assert row["available"] and row["status"] == "ok"
            if row["op"] == "data":  # throughput only: no FLOPs, no oracle
                assert row["ms"] > 0 and row["samples_per_s"] > 0
            elif row["op"] == "packing":  # useful tokens/s; gated on the float64 loss of every layout
                assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["rel_err"] <= row["tolerance"]
            else:
                assert row["ms"] > 0 and row["tflops"] > 0 and row["rel_err"] <= row["tolerance"]
        else:
            assert row["note"], row  # every untimed row says why


@pytest.mark.slow
def test_quick_covers_every_op_and_both_directions(quick_run):
    _, rows = quick_run
    for op in OPS + ("train_step", "generate", "packing"):
        timed = [r for r in rows if r["op"] == op and r["available"] and r["ms"] is not None]
        assert timed, f"no timed row for {op}"
    for op in OPS:
        assert {r["direction"] for r in rows if r["op"] == op and r["ms"] is not None} == {"fwd", "fwd+bwd"}
    media = {r["impl"] for r in rows if r["op"] == "media_cross_attention" and r["ms"] is not None}
    assert {"torch", "openflamingo_dense", "sdpa_math"} <= media


@pytest.mark.slow
def test_gpu_rows_are_unavailable_with_a_reason_on_cpu(quick_run):
    _, rows = quick_run
    gpu_rows = [r for r in rows if r["impl"] in GPU_ONLY + ("compile+cuda", "compile+cuda+fp8")]
    assert len(gpu_rows) >= 3 * len(OPS)
    for row in gpu_rows:
        assert row["available"] is False and row["ms"] is None and row["note"], row


@pytest.mark.slow
def test_quick_writes_plot_and_saved_results(quick_run):
    out, rows = quick_run
    assert (out / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = out / "results" / "2026-01-02-cpu-test.json"
    assert json.loads(saved.read_text()) == rows
    summary = (out / "results" / "2026-01-02-cpu-test.md").read_text()
    assert "cpu-test" in summary and "| op | case |" in summary and "2026-01-02-cpu-test.png" in summary
    assert (out / "results" / "2026-01-02-cpu-test.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_tests_are_not_collected_by_the_default_run():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert not list((ROOT / "tests").glob("test_bench_kernels*.py"))
    assert (ROOT / "bench" / "test_bench_kernels.py").exists()
