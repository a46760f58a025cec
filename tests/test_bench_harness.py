"""The benchmark harness: the float64 correctness gate, timing, peer ratios, and the implementations."""

import math

import pytest
import torch

from bench.cases import Case, attention_case, media_case
from bench.harness import (
    TOLERANCE,
    Peaks,
    Row,
    Settings,
    bench_case,
    compare,
    fill_best_peer,
    fill_rates,
    prepare_case,
    time_cpu,
)
from bench.impls import IMPLS, Impl, Skipped, Unavailable, masked_attention_math, openflamingo_dense
from flamingo_fast import ops

CPU = torch.device("cpu")
PEAKS = Peaks(tflops=1.0, gbps=10.0, matmul_n=1, copy_bytes=1)
TINY_ATTENTION = attention_case(32, batch=1, heads_q=4, heads_kv=2, head_dim=16)


def settings(dtype=torch.float32) -> Settings:
    return Settings(device=CPU, dtype=dtype, min_time_s=0.0, device_name="cpu-test")


class Counting:
    """Wraps an op so the test can see how often the harness called it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, q, k, v):
        self.calls += 1
        return self.fn(q, k, v)


def impl_of(name, fn) -> Impl:
    return Impl(name, ("attention",), lambda case, inputs, device: fn)


def correct_attention(q, k, v):
    return ops.attention(q, k, v, causal=True, backend="torch")


class WrongGradient(torch.autograd.Function):
    """Identity forward; backward doubles the gradient (a plausible bug in a hand-written backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_wrong_implementation_is_refused_and_never_timed():
    wrong = Counting(lambda q, k, v: correct_attention(q, k, v) * 1.01)
    right = Counting(correct_attention)
    rows = bench_case(TINY_ATTENTION, "fwd", [impl_of("right", right), impl_of("wrong", wrong)], settings(), PEAKS)
    good, bad = rows
    assert good.status == "ok" and good.ms > 0 and good.tflops > 0 and good.rel_err < TOLERANCE[torch.float32]
    assert right.calls >= 3  # checked once, then warm-up and timed repeats
    assert bad.status == "wrong" and bad.available
    assert bad.ms is None and bad.tflops is None and bad.gbps is None
    assert bad.rel_err == pytest.approx(0.01, rel=1e-3)
    assert "refused to time" in bad.note and "rel_err" in bad.note
    assert wrong.calls == 1  # only the correctness check ran it


def test_wrong_backward_is_refused_for_fwd_bwd_only():
    impl = impl_of("bad_grad", lambda q, k, v: correct_attention(WrongGradient.apply(q), k, v))
    fwd = bench_case(TINY_ATTENTION, "fwd", [impl], settings(), PEAKS)[0]
    both = bench_case(TINY_ATTENTION, "fwd+bwd", [impl], settings(), PEAKS)[0]
    assert fwd.status == "ok" and fwd.ms is not None
    assert both.status == "wrong" and both.ms is None and both.rel_err == pytest.approx(1.0, rel=1e-3)


def test_tolerance_depends_on_dtype():
    # A 0.1% error fails float32's 1e-4 but passes bfloat16's 1e-2.
    impl = impl_of("off_by_0.1%", lambda q, k, v: correct_attention(q, k, v) * 1.001)
    fp32 = bench_case(TINY_ATTENTION, "fwd", [impl], settings(torch.float32), PEAKS)[0]
    bf16 = bench_case(TINY_ATTENTION, "fwd", [impl], settings(torch.bfloat16), PEAKS)[0]
    assert fp32.status == "wrong" and fp32.tolerance == 1e-4
    assert bf16.status == "ok" and bf16.tolerance == 1e-2 and bf16.rel_err < 1e-2


def test_nan_output_is_refused():
    impl = impl_of("nan", lambda q, k, v: correct_attention(q, k, v) * float("nan"))
    row = bench_case(TINY_ATTENTION, "fwd", [impl], settings(), PEAKS)[0]
    assert row.status == "wrong" and row.ms is None and row.rel_err is None and "NaN" in row.note


def test_unavailable_skipped_and_failing_implementations_become_rows():
    def raiser(exc):
        def build(case, inputs, device):
            raise exc

        return Impl(type(exc).__name__, ("attention",), build)

    impls = [raiser(Unavailable("no kernel here")), raiser(NotImplementedError("no backward on CPU")),
             raiser(Skipped("too slow")), raiser(RuntimeError("boom"))]
    rows = bench_case(TINY_ATTENTION, "fwd", impls, settings(), PEAKS)
    assert [r.status for r in rows] == ["unavailable", "unavailable", "skipped", "error"]
    assert [r.note for r in rows] == ["no kernel here", "no backward on CPU", "too slow", "RuntimeError: boom"]
    assert all(not r.available and r.ms is None for r in rows)


def test_oracle_switches_to_chunked_torch_backend_for_big_score_matrices(monkeypatch):
    import bench.impls

    monkeypatch.setitem(bench.impls.REFERENCE_SCORE_LIMIT, "cpu", 16)
    prepared = prepare_case(TINY_ATTENTION, "fwd+bwd", settings())
    assert prepared.oracle == "torch-fp64"
    assert [t.dtype for t in prepared.references] == [torch.float64] * 4
    row = bench_case(TINY_ATTENTION, "fwd", [IMPLS["reference"]], settings(), PEAKS)[0]
    assert row.status == "skipped" and "limit" in row.note


def test_compare_is_relative_to_the_largest_reference_value():
    ref = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    max_abs, rel = compare([torch.tensor([[2.0, -3.9]])], [ref])
    assert max_abs == pytest.approx(0.1, rel=1e-6) and rel == pytest.approx(0.1 / 4, rel=1e-6)
    assert compare([torch.tensor([[math.inf, 0.0]])], [ref]) == (math.inf, math.inf)


def test_time_cpu_repeats_and_returns_the_median():
    calls = []
    ms = time_cpu(lambda: calls.append(1), min_time_s=0.0, min_reps=5)
    assert len(calls) == 6 and ms >= 0  # one warm-up plus five timed calls


def test_fill_best_peer_excludes_self_and_reference():
    rows = [Row("attention", "c", impl, "fwd", ms=ms) for impl, ms in
            (("reference", 0.5), ("torch", 1.0), ("sdpa_math", 2.0), ("flex", 4.0))]
    rows.append(Row("attention", "c", "cuda", "fwd"))  # unavailable: no ratio, never a peer
    fill_best_peer(rows)
    by = {r.impl: r for r in rows}
    assert (by["torch"].best_peer, by["torch"].speedup_vs_best_peer) == ("sdpa_math", 2.0)
    assert (by["sdpa_math"].best_peer, by["sdpa_math"].speedup_vs_best_peer) == ("torch", 0.5)
    assert by["flex"].speedup_vs_best_peer == 0.25
    assert (by["reference"].best_peer, by["reference"].speedup_vs_best_peer) == ("torch", 2.0)
    assert by["cuda"].speedup_vs_best_peer is None


def test_fill_rates_uses_the_roofline():
    row = Row("x", "c", "i", "fwd", ms=1.0)
    fill_rates(row, flop=1e9, nbytes=1e9, peaks=Peaks(tflops=10.0, gbps=1000.0, matmul_n=1, copy_bytes=1))
    # 1 FLOP per byte: the memory roof is 1 TFLOP/s, below the 10 TFLOP/s matmul peak.
    assert row.tflops == pytest.approx(1.0) and row.gbps == pytest.approx(1000.0)
    assert row.bound == "memory" and row.peak_fraction == pytest.approx(1.0)
    fill_rates(row, flop=1e10, nbytes=1e6, peaks=Peaks(tflops=20.0, gbps=1000.0, matmul_n=1, copy_bytes=1))
    assert row.bound == "compute" and row.peak_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_openflamingo_dense_matches_the_reference_op(only_immediate):
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 3 * 4, 2, 8, dtype=torch.float64)  # 3 images of 4 latents, GQA 4 -> 2
    v = torch.randn_like(k)
    index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]])
    expected = ops.media_cross_attention(q, k, v, index, 4, only_immediate, backend="reference")
    got = openflamingo_dense(q, k, v, index, 4, only_immediate)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[0, :2] == 0).all()


def test_masked_math_matches_the_reference_with_causal_mask_and_gqa():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 4, 8, dtype=torch.float64)
    k, v = torch.randn(1, 6, 2, 8, dtype=torch.float64), torch.randn(1, 6, 2, 8, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    got = masked_attention_math(q, k, v, mask, 8 ** -0.5)
    torch.testing.assert_close(got, ops.attention(q, k, v, causal=True, backend="reference"), rtol=1e-12, atol=1e-12)


def test_every_cpu_capable_implementation_passes_the_gate_on_a_small_media_case():
    case = media_case(64, 2, heads=2, head_dim=16, latents=8)
    cheap = [IMPLS[name] for name in ("reference", "torch", "sdpa_flash", "sdpa_math", "openflamingo_dense")]
    for direction in ("fwd", "fwd+bwd"):
        rows = bench_case(case, direction, cheap, settings(), PEAKS)
        assert all(r.status == "ok" for r in rows), [(r.impl, r.status, r.note) for r in rows]


def test_gpu_only_implementations_are_unavailable_with_a_reason_on_cpu():
    rows = bench_case(TINY_ATTENTION, "fwd", [IMPLS[n] for n in ("sdpa_cudnn", "sdpa_efficient", "cuda")],
                      settings(), PEAKS)
    for row in rows:
        assert row.status == "unavailable" and not row.available and row.ms is None
        assert row.note
    assert "CUDA" in rows[0].note and "CUDA" in rows[1].note


def test_case_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="op"):
        Case("softmax", 1, 4, 4, 1, 1, 8)
