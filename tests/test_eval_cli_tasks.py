"""`flamingo-fast eval`'s task loaders for the real datasets (COCO / Flickr30k Karpathy splits, VQAv2), on tiny
files written by tests/data_fixtures.py: which samples become queries and which demonstrations, and the
errors for missing flags."""

from __future__ import annotations

import pytest

from data_fixtures import make_karpathy, make_vqav2
from flamingo_fast.eval.cli import build_parser, load_task_data


def _args(*argv):
    return build_parser().parse_args(["--checkpoint", "unused", *argv])


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_tasks_query_the_test_split_and_draw_demonstrations_from_train(tmp_path, dataset):
    karpathy, images = make_karpathy(tmp_path, dataset)
    ((name, queries, support),) = load_task_data(_args("--task", dataset, "--karpathy", str(karpathy), "--images",
                                                       str(images)), image_size=16)
    assert name == dataset
    # The fixture's images: 0, 1 train, 2 restval, 3 val, 4 test ("Image {i} caption {k}.", 2 or 3 captions).
    assert len(queries) == 1 and queries[0].references == ["Image 4 caption 0.", "Image 4 caption 1."]
    train_refs = sorted(tuple(s.references) for s in support)
    assert [r[0] for r in train_refs] == ["Image 0 caption 0.", "Image 1 caption 0.", "Image 2 caption 0."]  # restval is train
    ((_, val_queries, _),) = load_task_data(_args("--task", dataset, "--karpathy", str(karpathy), "--images",
                                                  str(images), "--split", "val"), image_size=16)
    assert [q.references[0] for q in val_queries] == ["Image 3 caption 0."]


def test_vqav2_task_reads_queries_and_demonstrations_from_their_own_files(tmp_path):
    q, a, images = make_vqav2(tmp_path / "val")
    sq, sa, support_images = make_vqav2(tmp_path / "train", subtype="train2014")
    ((name, queries, support),) = load_task_data(_args(
        "--task", "vqav2", "--questions", str(q), "--annotations", str(a), "--images", str(images),
        "--support-questions", str(sq), "--support-annotations", str(sa), "--support-images", str(support_images)),
        image_size=16)
    assert name == "vqav2" and len(queries) == len(support) == 4
    first = queries[0]
    assert first.text.startswith("<image>Question:What colour is it? Short answer:")
    assert first.answers.count("red") == 8 and len(first.answers) == 10  # the 10 human answers, kept for the metric


@pytest.mark.parametrize("task, argv, missing", [
    ("coco", [], "--karpathy, --images"),
    ("vqav2", ["--questions", "q.json"], "--annotations, --images, --support-questions, --support-annotations"),
])
def test_missing_data_flags_are_named(task, argv, missing):
    with pytest.raises(SystemExit, match=missing):
        load_task_data(_args("--task", task, *argv), image_size=16)
