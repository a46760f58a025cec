"""`python -m bench --quick --ops mllama` end to end on CPU: Llama 3.2 Vision cross-attention rows."""

import json

import bench
from bench.mllama_xattn import IMPLS, KEYS_PER_MEDIA, QUICK_CASES, visible_pairs
from flamingo_fast.ops import MediaSpans
from flamingo_fast.ops.media_spans import dense_mask


def test_visible_pairs_counts_the_dense_mask():
    case = QUICK_CASES[0]
    spans = MediaSpans.from_image_groups(*case.image_inputs("cpu"), KEYS_PER_MEDIA)
    assert visible_pairs(spans) == int(dense_mask(spans, case.num_keys).sum()) > 0


def test_quick_mllama_rows(tmp_path):
    path = tmp_path / "mllama.json"
    argv = ["--quick", "--ops", "mllama", "--device", "cpu", "--min-time", "0.01", "--json", str(path)]
    assert bench.main(argv) == 0
    rows = json.loads(path.read_text())
    assert sorted((r["impl"], r["direction"]) for r in rows) == sorted(
        (impl, direction) for impl in IMPLS for direction in ("fwd", "fwd+bwd"))
    for row in rows:
        assert row["op"] == "mllama" and row["case"] == QUICK_CASES[0].name
        if row["impl"] == "flex":  # compiling is skipped by --quick
            assert row["status"] == "skipped" and row["ms"] is None and "--quick" in row["note"]
            continue
        assert row["status"] == "ok" and row["available"] and row["ms"] > 0 and row["tflops"] > 0
        assert row["rel_err"] <= row["tolerance"] == 1e-4
        assert row["shape"]["visible_pairs"] < row["shape"]["dense_pairs"]
    for row in (r for r in rows if r["impl"] == "torch"):
        assert row["note"].startswith("speedup: ") and "x sdpa_dense" in row["note"]
        assert row["best_peer"] == "sdpa_dense" and row["speedup_vs_best_peer"] > 0
