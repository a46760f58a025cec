"""The data-path benchmark (bench/data_path.py): its synthetic shards are what training reads (pairs and
MMC4-like documents through the real pipeline), and its rows report a throughput."""

from __future__ import annotations

import torch

from bench.data_path import IMAGE_SIZE, SHAPES, bench_data, write_shard
from bench.harness import Settings
from flamingo_fast.data.webdataset import read_shard, record_to_sample


def test_synthetic_shards_decode_to_training_samples(tmp_path):
    for shape, images in SHAPES.items():
        records = list(read_shard(str(write_shard(tmp_path / f"{shape}.tar", shape, samples=3))))
        assert len(records) == 3
        samples = [record_to_sample(r) for r in records]
        assert all(len(s.images) == images for s in samples)
        assert all(s.text.count("<image>") == images for s in samples)
        assert samples[0].images[0].size == (640, 480)


def test_quick_rows_report_samples_per_second_of_the_real_pipeline():
    rows = bench_data(Settings(device=torch.device("cpu"), dtype=torch.float32), quick=True)
    (row,) = rows
    assert row.op == "data" and row.impl == "workers=0" and row.status == "ok"
    assert row.ms > 0 and row.samples_per_s > 0
    assert row.samples_per_s == __import__("pytest").approx(row.shape["batch"] / (row.ms / 1e3), rel=1e-6)
    assert row.shape["image_size"] == IMAGE_SIZE
