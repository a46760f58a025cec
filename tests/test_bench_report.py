"""bench/report.py: the media speedup targets, the JSON list and the markdown summary."""

import json
import math

from bench.cases import media_case
from bench.harness import Row
from bench.report import markdown_summary, media_targets, write_json


def media_row(case, impl, direction, ms):
    return Row("media_cross_attention", case.name, impl, direction, ms=ms, available=ms is not None,
               dtype="fp32", shape=case.to_dict(), status="ok" if ms is not None else "unavailable")


def test_media_targets_compare_torch_with_openflamingo_dense_in_the_same_run():
    eight, many, short = media_case(2048, 8), media_case(2048, 32), media_case(512, 8)
    rows = [
        media_row(eight, "torch", "fwd", 10.0), media_row(eight, "openflamingo_dense", "fwd", 60.0),
        media_row(eight, "torch", "fwd+bwd", 30.0), media_row(eight, "openflamingo_dense", "fwd+bwd", 90.0),
        media_row(many, "torch", "fwd", 10.0), media_row(many, "openflamingo_dense", "fwd", 150.0),
        media_row(short, "torch", "fwd", 1.0), media_row(short, "openflamingo_dense", "fwd", 9.0),  # not a target
    ]
    targets = media_targets(rows)
    assert [(t["images"], t["direction"], t["ratio"], t["target"], t["met"]) for t in targets] == [
        (8, "fwd", 6.0, 5.0, True), (8, "fwd+bwd", 3.0, None, None), (32, "fwd", 15.0, 20.0, False),
    ]


def test_json_is_a_list_with_non_finite_numbers_as_null(tmp_path):
    row = Row("attention", "c", "torch", "fwd", ms=1.0, rel_err=math.inf, available=True)
    write_json([row], tmp_path / "rows.json")
    loaded = json.loads((tmp_path / "rows.json").read_text())
    assert isinstance(loaded, list) and loaded[0]["rel_err"] is None and loaded[0]["ms"] == 1.0


def test_markdown_summary_lists_targets_timed_and_untimed_rows():
    case = media_case(2048, 8)
    rows = [media_row(case, "torch", "fwd", 10.0), media_row(case, "openflamingo_dense", "fwd", 60.0),
            media_row(case, "cuda", "fwd", None)]
    rows[2].note = "no kernels"
    meta = {"device_name": "cpu-x", "date": "2026-01-01", "command": "python -m bench", "device_description": "cpu",
            "dtype": "fp32", "torch": "2", "threads": 1, "peak_tflops": 1.0, "peak_gbps": 2.0, "case_note": "",
            "json_name": "a.json", "plot_name": "a.png"}
    text = markdown_summary(rows, meta, media_targets(rows))
    assert "| b1 s2048 img8x64 h16 d128 | fwd | 10 | 60 | 6.0x | >= 5x met |" in text
    assert "cuda (unavailable, media_cross_attention): no kernels" in text
    assert "![TFLOP/s against sequence length](a.png)" in text
