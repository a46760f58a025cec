"""Data-path benchmark (op "data"): how many samples per second the WebDataset pipeline delivers, per decode
worker, so that a user knows how many workers one GPU needs.

Synthetic shards are written once per run in a temporary folder: photo-sized JPEGs (640 x 480, quality 90,
smooth colour fields plus noise, so decoding costs what a photo costs) with 12-word captions (`pairs`), and
MMC4-like documents with 5 images among 8 sentences (`m3w`). Each row reads them through
`flamingo_fast.data.build_loader` as training does: tar streaming, JPEG decode, resize + crop + normalise
to 224 px, tokenize, collate into padded batches. impl `workers=N` decodes in N worker processes
(`workers=0`: inline in the main process, the per-worker cost); `samples_per_s` counts samples
(pairs or documents) after one warm-up batch, `ms` is per batch.

Workers one GPU needs = (GPU samples per second: batch / step time from the train_step rows) /
(`samples_per_s` of `workers=0`), rounded up; the README's table does that for the H200 rows.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench.harness import Row, Settings

OP = "data"
WORDS = ("a photo of the red blue green small large dog cat car tree house person street table sky water "
         "with on in next to near under over two three people sitting standing walking old new bright dark").split()
IMAGE_WH = (640, 480)
IMAGE_SIZE = 224
SHAPES = {"pairs": 1, "m3w": 5}  # images per sample


def _photo_like_jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    w, h = IMAGE_WH
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(np.sin(xx / rng.uniform(20, 90) + c) + np.cos(yy / rng.uniform(20, 90) - c)) * 60 + 128
                     for c in rng.uniform(0, 6, 3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def write_shard(path: Path, shape: str, samples: int, seed: int = 0) -> Path:
    """`samples` pair records or MMC4-like documents (5 images, 8 sentences) in one plain tar."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    images = [_photo_like_jpeg(np_rng) for _ in range(8)]  # reused: decode cost is per member, not per pixel pattern

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"{shape}{i:06d}"
            if shape == "pairs":
                add(tar, f"{key}.jpg", images[i % len(images)])
                add(tar, f"{key}.txt", _sentence(rng).encode())
            else:
                sentences = [_sentence(rng) for _ in range(8)]
                info = [{"image_name": f"{k}.jpg", "matched_text_index": 1 + k} for k in range(SHAPES[shape])]
                add(tar, f"{key}.json", json.dumps({"text_list": sentences, "image_info": info}).encode())
                for k in range(SHAPES[shape]):
                    add(tar, f"{key}.{k}.jpg", images[(i + k) % len(images)])
    return path


def _throughput(shard: Path, tokenizer, workers: int, batch_size: int, batches: int) -> tuple[float, float]:
    """(ms per batch, samples per second) of the training pipeline over `shard`."""
    from flamingo_fast.data import build_loader

    loader = build_loader([{"kind": "webdataset", "shards": str(shard)}], tokenizer, batch_size, IMAGE_SIZE,
                          num_workers=workers, worker_method="process", prefetch_factor=0, max_length=512)
    with loader:
        iterator = iter(loader)
        next(iterator)  # warm-up: worker start, first shard open
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
    return 1e3 * seconds / batches, batches * batch_size / seconds


def bench_data(settings: Settings, quick: bool, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Rows for pairs and m3w at 0, 1 and 2 decode workers (--quick: pairs, workers=0 only)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worker_counts = (0,) if quick else tuple(sorted({0, 1, min(2, cores)}))
    shapes = ("pairs",) if quick else tuple(SHAPES)
    from flamingo_fast.data.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(list(WORDS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flamingo_fast_data_bench_") as folder:
        for shape in shapes:
            batch_size = 16 if shape == "pairs" else 4
            batches = 3 if quick else 6
            shard = write_shard(Path(folder) / f"{shape}.tar", shape, batch_size * (batches + 2) * 3, settings.seed)
            for workers in worker_counts:
                case = f"{shape} {IMAGE_WH[0]}x{IMAGE_WH[1]} jpeg x{SHAPES[shape]} -> {IMAGE_SIZE}px b{batch_size}"
                row = Row(op=OP, case=case,
                          impl=f"workers={workers}", direction="fwd", device=settings.device_name, dtype="uint8",
                          threads=settings.threads, series=shape,
                          shape={"shape": shape, "images_per_sample": SHAPES[shape], "batch": batch_size,
                                 "workers": workers, "image_wh": list(IMAGE_WH), "image_size": IMAGE_SIZE})
                row.ms, row.samples_per_s = _throughput(shard, tokenizer, workers, batch_size, batches)
                row.available, row.status, row.oracle = True, "ok", "none (throughput only)"
                rows.append(row)
                on_row(row)
    return rows
