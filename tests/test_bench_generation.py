"""bench/generation.py: generation with the media K/V cached vs recomputed every step (OpenFlamingo) vs images
re-encoded, each checked against a cache-free greedy loop, and the ratios the report prints."""

import torch

from bench.generation import GenerationCase, GenerationPrepared, _bench_mode, _row, bench_generation
from bench.harness import Settings
from bench.report import generation_ratios, markdown_summary
from flamingo_fast.models.generate import GenerationOutput

TINY = {
    "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    "resampler": {"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    "xattn": {"heads": 4, "head_dim": 8, "kv_heads": 2, "every": 2},
    "lm": {"vocab_size": 30, "dim": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn_dim": 64, "max_seq_len": 64},
}
CASE = GenerationCase("tiny", "demo", batch=2, seq=12, images=2, new_tokens=4, overrides=TINY)
SETTINGS = Settings(device=torch.device("cpu"), dtype=torch.bfloat16, min_time_s=0.0, device_name="cpu-test")
META = {"device_name": "cpu-x", "date": "2026-01-01", "command": "python -m bench", "device_description": "cpu",
        "dtype": "fp32", "torch": "2", "threads": 1, "peak_tflops": 1.0, "peak_gbps": 2.0, "case_note": "",
        "json_name": "a.json", "plot_name": "a.png"}


def test_every_media_mode_is_checked_then_timed_and_paired():
    rows = bench_generation(SETTINGS, quick=False, cases=(CASE,))
    assert [r.shape["media_cache"] for r in rows] == ["kv", "latents", "none"]
    assert [r.case for r in rows] == [f"tiny b2 p12 img2 +4 {tag}" for tag in ("kv-cached", "kv-per-step", "reencode")]
    for row in rows:
        assert (row.op, row.impl, row.direction, row.series, row.dtype) == ("generate", "torch", "fwd",
                                                                             "tiny b2 p12 img2 +4", "fp32")
        assert row.status == "ok" and row.available and row.ms > 0 and row.tflops > 0
        assert row.tokens_per_s == 2 * 4 / (row.ms * 1e-3) and row.rel_err <= row.tolerance == 1e-4
    assert rows[0].gflop == rows[1].gflop == rows[2].gflop  # the cached mode's work: recomputing earns no credit
    [ratio] = generation_ratios(rows)
    assert ratio["case"] == "tiny b2 p12 img2 +4" and ratio["images"] == 2
    assert ratio["recompute_ratio"] == rows[1].ms / rows[0].ms and ratio["reencode_ratio"] == rows[2].ms / rows[0].ms
    summary = markdown_summary(rows, META, [])
    assert "## generate: media K/V cached vs recomputed every step (OpenFlamingo)" in summary
    assert "| tiny b2 p12 img2 +4 |" in summary


def test_a_mode_that_differs_from_the_oracle_is_refused_and_cuda_cases_wait_for_a_gpu():
    prepared = GenerationPrepared(CASE, None, None, None, oracle_tokens=[[1, 3]], oracle_scores=[-3.0],
                                  useful_flops=1e6)

    def fake(tokens, score):
        return lambda: GenerationOutput(tokens=tokens, finished=[False], scores=[score])

    row = _row(CASE, "latents", SETTINGS)
    _bench_mode(row, prepared, fake([[1, 2]], -3.0), SETTINGS)
    assert row.status == "wrong" and row.ms is None and "differ" in row.note
    row = _row(CASE, "kv", SETTINGS)
    _bench_mode(row, prepared, fake([[1, 3]], -3.1), SETTINGS)
    assert row.status == "wrong" and row.ms is None and row.rel_err > row.tolerance and "rel_err" in row.note
    gpu = GenerationCase("big", "demo", batch=1, seq=8, images=1, needs_cuda=True)
    rows = bench_generation(SETTINGS, quick=False, cases=(gpu,))
    assert len(rows) == 3 and all(r.status == "unavailable" and "CUDA" in r.note and r.ms is None for r in rows)
