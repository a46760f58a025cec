"""torchdata pipelines: exact mid-epoch resume, mixture weights, rank sharding, skip-and-count of bad data."""

import io
import logging
import pickle

import pytest
import torch

from data_fixtures import (CORRUPT_IMAGE, assert_same_batches, image_bytes, make_karpathy, pair_members,
                           truncate_in_member, write_tar)
from flamingo_fast.data import MapSource, build_loader, shapes_dataset, shapes_tokenizer
from flamingo_fast.data.skipping import NoUsableDataError


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _mixed_sources(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        # a broken record in each shard, so the skip counters are part of the resumed state
        bad = [(f"s{s}bad.jpg", CORRUPT_IMAGE), (f"s{s}bad.txt", b"x")]
        write_tar(shards / f"s{s}.tar", pair_members([f"s{s}k{j}" for j in range(2)]) + bad + pair_members([f"s{s}k2"]))
    annotations, image_root = make_karpathy(tmp_path, "coco")
    return [
        {"kind": "shapes", "name": "shapes", "n": 40, "weight": 2.0},
        {"kind": "webdataset", "name": "web", "shards": str(shards), "weight": 1.0},
        {"kind": "coco", "annotations": str(annotations), "image_root": str(image_root), "weight": 1.0},
    ]


@pytest.mark.parametrize("num_workers, prefetch", [(2, 2), (0, 0)])
def test_resume_mid_epoch_gives_exactly_the_unseen_batches(tmp_path, tok, num_workers, prefetch):
    sources = _mixed_sources(tmp_path)

    def make():
        return build_loader(sources, tok, batch_size=4, image_size=32, seed=7, num_workers=num_workers, prefetch_factor=prefetch)

    loader = make()
    iterator = iter(loader)
    _take(iterator, 6)
    state = loader.state_dict()
    skipped_at_save = loader.skipped
    reference = _take(iterator, 12)  # spans source epochs: shapes (40), web (9) and coco (7) all wrap

    # The state survives a torch.save / torch.load(weights_only=True) round trip (trainer checkpoints).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(_take(iter(resumed), 12), reference)
    assert set(resumed.skipped) <= {"corrupt_image"}
    if num_workers == 0 and prefetch == 0:
        # Without read-ahead the counters are exact: the resumed run continues the saved counts.
        assert skipped_at_save["corrupt_image"] >= 1
        assert resumed.skipped == loader.skipped
        assert loader.skipped["corrupt_image"] > skipped_at_save["corrupt_image"]

    # A fresh loader without state starts over (and differs from the resumed stream).
    with make() as fresh_loader:
        fresh = _take(iter(fresh_loader), 2)
    assert not torch.equal(fresh[0]["input_ids"], reference[0]["input_ids"]) or not torch.equal(
        fresh[0]["images"], reference[0]["images"]
    )
    loader.close()
    resumed.close()


def _origin_counts(batches, tok):
    output, question = tok.hf_tokenizer.token_to_id("output"), tok.hf_tokenizer.token_to_id("question")
    captions = sum(int((b["input_ids"] == output).any(dim=1).sum()) for b in batches)
    questions = sum(int((b["input_ids"] == question).any(dim=1).sum()) for b in batches)
    return captions, questions


def test_mixture_weights_are_respected(tok):
    sources = [
        {"kind": "shapes", "name": "captions", "task": "caption", "n": 50, "weight": 3.0},
        {"kind": "shapes", "name": "questions", "task": "vqa", "n": 50, "weight": 1.0},
    ]
    loader = build_loader(sources, tok, batch_size=16, image_size=32, num_workers=0, prefetch_factor=0)
    captions, questions = _origin_counts(_take(iter(loader), 30), tok)
    assert captions + questions == 480
    assert 0.69 < captions / 480 < 0.81  # 0.75 expected; +-3 sigma is about +-0.06
    assert loader.weights == {"captions": 3.0, "questions": 1.0}


def _row_digests(batches):
    out = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            tokens = batch["input_ids"][row][batch["attention_mask"][row] == 1]  # padding depends on the batch
            out.append(hash((tuple(tokens.tolist()), batch["images"][row].sum().item())))
    return out


def test_ranks_see_disjoint_streams(tmp_path, tok):
    sources = [{"kind": "shapes", "n": 24, "task": "caption"}]
    common = dict(batch_size=3, image_size=32, num_workers=0, prefetch_factor=0, cycle=False)
    everything = _row_digests(list(build_loader(sources, tok, **common)))
    assert len(everything) == 24 == len(set(everything))
    per_rank = [_row_digests(list(build_loader(sources, tok, rank=r, world_size=2, **common))) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(everything)
    with pytest.raises(ValueError, match="rank"):
        build_loader(sources, tok, rank=2, world_size=2, **common)


def test_bad_data_is_skipped_counted_and_logged(tmp_path, tok, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    good_keys = [f"g{i}" for i in range(5)]
    write_tar(
        shards / "a.tar",
        pair_members(good_keys[:2])
        + [("corrupt.jpg", CORRUPT_IMAGE), ("corrupt.txt", b"broken image")]
        + [("markers.jpg", image_bytes()), ("markers.txt", b"one image but <image> two markers")]
        + pair_members(good_keys[2:3]),
    )
    full = write_tar(tmp_path / "full.tar", pair_members(good_keys[3:]) + pair_members(["lost0", "lost1"]))
    truncate_in_member(full, shards / "b.tar", "lost0.txt")  # lost0 is cut, lost1 never arrives
    annotations, image_root = make_karpathy(tmp_path, "flickr30k")
    (image_root / "1003.jpg").unlink()  # the val image
    sources = [
        {"kind": "webdataset", "shards": str(shards), "shuffle": False},
        {"kind": "flickr30k", "annotations": str(annotations), "image_root": str(image_root), "split": "val"},
    ]
    caplog.set_level(logging.WARNING, logger="flamingo_fast.data")
    with build_loader(sources, tok, batch_size=1, image_size=32, num_workers=2, cycle=False, drop_last=False) as loader:
        rows = list(loader)
    # good: 5 pairs (3 in a.tar, 2 complete before the cut in b.tar); the val image is missing
    assert len(rows) == 5
    assert loader.skipped == {"corrupt_image": 1, "image_marker_mismatch": 1, "truncated_tar": 1, "missing_image": 1}
    logged = " ".join(r.getMessage() for r in caplog.records)
    for reason in loader.skipped:
        assert reason in logged


def test_a_source_with_nothing_usable_stops_with_an_error_naming_it(tmp_path, tok, caplog):
    # A wrong image root: every record of the cycling source is skipped. It used to spin forever.
    annotations, _ = make_karpathy(tmp_path, "coco")
    wrong_root = tmp_path / "not_the_images"
    wrong_root.mkdir()
    source = {"kind": "coco", "name": "coco_train", "annotations": str(annotations), "image_root": str(wrong_root)}
    caplog.set_level(logging.WARNING, logger="flamingo_fast.data")
    with build_loader([source], tok, batch_size=1, image_size=32, num_workers=0, cycle=True,
                      max_consecutive_skips=150) as loader:
        with pytest.raises(NoUsableDataError, match=r"last 150 records.*'coco_train'.*'missing_image'"):
            next(iter(loader))
    # rate-limited: the first 5 in full, then at 10 and 100, not 150 lines
    assert len([r for r in caplog.records if "skipped a record" in r.getMessage()]) == 7


def test_broken_records_among_good_ones_never_trip_the_limit(tmp_path, tok):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = []
    for i in range(12):  # alternate good and corrupt records: 12 skips in all, never 2 in a row
        members += pair_members([f"g{i}"]) + [(f"bad{i}.jpg", CORRUPT_IMAGE), (f"bad{i}.txt", b"broken")]
    write_tar(shards / "a.tar", members)
    with build_loader([{"kind": "webdataset", "shards": str(shards), "shuffle": False}], tok, batch_size=1,
                      image_size=32, num_workers=0, cycle=False, max_consecutive_skips=2) as loader:
        rows = list(loader)
    assert len(rows) == 12 and loader.skipped == {"corrupt_image": 12}


def test_process_workers(tok):
    sources = [{"kind": "shapes", "n": 12, "task": "vqa"}]
    common = dict(batch_size=4, image_size=32, cycle=False, prefetch_factor=0)
    threads = list(build_loader(sources, tok, num_workers=0, **common))
    # "fork" keeps this test fast; spawn/forkserver additionally pickle the worker's sources and collator:
    with build_loader(sources, tok, num_workers=2, worker_method="process", multiprocessing_context="fork", **common) as loader:
        assert_same_batches(list(loader), threads)
        sources_copy, collator_copy = pickle.loads(pickle.dumps((loader.sources, loader.collator)))
    sample = sources_copy["shapes"].decode(5)
    assert torch.equal(collator_copy.encode(sample).input_ids, loader.collator.encode(loader.sources["shapes"].decode(5)).input_ids)


def test_epochs_reshuffle_and_close_restarts(tok):
    sources = [{"kind": "shapes", "n": 12, "task": "caption"}]
    common = dict(batch_size=4, image_size=32, cycle=False)
    inline = build_loader(sources, tok, num_workers=0, prefetch_factor=0, **common)
    inline_epochs = [list(inline), list(inline)]
    assert not torch.equal(inline_epochs[0][0]["images"], inline_epochs[1][0]["images"])  # new shuffle
    with build_loader(sources, tok, num_workers=2, prefetch_factor=2, **common) as loader:
        first = list(loader)
        loader.close()  # stops the background threads; the next iter() starts them again
        second = list(loader)
    assert_same_batches(first, inline_epochs[0])
    assert_same_batches(second, inline_epochs[1])


@pytest.mark.parametrize("num_workers, prefetch", [(0, 0), (2, 2)])
def test_state_saved_after_an_epoch_ends_resumes_into_exactly_the_next_epoch(tok, num_workers, prefetch):
    """A one-epoch (cycle=False) loader checkpointed after it ran out: the resumed loader yields what the
    uninterrupted one yields next, i.e. the next epoch with its new shuffle, batch for batch."""
    sources = [{"kind": "shapes", "name": "captions", "n": 20, "task": "caption"},
               {"kind": "shapes", "name": "questions", "n": 12, "task": "vqa"}]

    def make():
        return build_loader(sources, tok, batch_size=4, image_size=32, cycle=False, num_workers=num_workers,
                            prefetch_factor=prefetch)

    with make() as loader, make() as resumed:
        first = list(loader)
        state = loader.state_dict()
        second = list(loader)
        resumed.load_state_dict(state)
        again = list(resumed)
    assert len(first) == len(second) == 8
    assert_same_batches(again, second)
    assert not torch.equal(first[0]["images"], second[0]["images"])


def test_source_objects_and_spec_errors(tok):
    source = MapSource(shapes_dataset("train", 8, image_size=32, task="caption"), name="mine", shuffle=False)
    loader = build_loader([source], tok, batch_size=8, image_size=32, num_workers=0, prefetch_factor=0, cycle=False)
    (batch,) = list(loader)
    assert batch["images"].shape == (8, 1, 1, 3, 32, 32) and loader.sources == {"mine": source}
    with pytest.raises(ValueError, match="unknown kind"):
        build_loader([{"kind": "laion"}], tok, batch_size=2, image_size=32)
    with pytest.raises(ValueError, match="bad options"):
        build_loader([{"kind": "shapes", "colour": "red"}], tok, batch_size=2, image_size=32)
    with pytest.raises(ValueError, match="unique"):
        build_loader([{"kind": "shapes"}, {"kind": "shapes"}], tok, batch_size=2, image_size=32)
    with pytest.raises(ValueError, match="weight"):
        build_loader([{"kind": "shapes", "weight": 0}], tok, batch_size=2, image_size=32)
