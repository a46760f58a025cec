"""`flamingo-fast demo --quick`: all three stages run (tiny budgets) and the outputs are written. The real
demo's accuracy (caption EM >= 0.95, VQA >= 0.90 within 10 minutes) is measured by `make demo`."""

from __future__ import annotations

import json

import pytest

from train.demo import main


@pytest.mark.slow
def test_demo_quick_writes_summary_plot_and_weights(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("caption_exact_match", "vqa_accuracy", "wall_seconds", "steps"):
        assert key in summary, key
    assert 0.0 <= summary["caption_exact_match"] <= 1.0 and 0.0 <= summary["vqa_accuracy"] <= 1.0
    assert summary["steps"] == 3 and summary["wall_seconds"] > 0 and summary["targets_met"] is False
    stages = summary["stages"]
    assert stages["vision_contrastive"]["steps"] == 2 and stages["lm_text"]["steps"] == 2
    assert stages["flamingo"]["frozen_vision_and_lm"] is True
    assert stages["flamingo"]["trainable_parameters"] < stages["flamingo"]["total_parameters"]
    assert summary["num_caption"] == 4 and summary["num_vqa"] == 4
    assert sum(v["count"] for v in summary["vqa_by_type"].values()) == 4
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "pretrained.safetensors").is_file()
    assert (tmp_path / "flamingo" / "metrics.jsonl").is_file()
    assert (tmp_path / "flamingo" / "model.safetensors").is_file()
