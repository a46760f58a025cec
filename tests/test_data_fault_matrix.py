"""The data-fault matrix: one fault per cell, in every source kind, read through `build_loader` as the trainer
reads it, with the outcome each cell must have:

    Skips(rows, counts)  the broken records are dropped and counted by reason; every good record still arrives
    Stops(pattern)       nothing usable (cycling on): NoUsableDataError naming the source and the reason
    Fails(error, words)  the source cannot be built: an error naming the file (and the entry)
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from data_fixtures import (
    CORRUPT_IMAGE,
    image_bytes,
    interleaved_members,
    make_karpathy,
    make_vqav2,
    pair_members,
    truncate_in_member,
    write_tar,
)
from flamingo_fast.data import build_loader, shapes_tokenizer
from flamingo_fast.data.skipping import NoUsableDataError


@dataclass(frozen=True)
class Skips:
    rows: int | None  # None: some, not all (where the cut falls depends on the compressor)
    counts: dict


@dataclass(frozen=True)
class Stops:
    pattern: str


@dataclass(frozen=True)
class Fails:
    error: type
    words: tuple


# -- fault builders: each writes its files under `root` and returns the source specs -------------------------
def _web(root: Path, members, gz: bool = False, name: str = "web") -> dict:
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    write_tar(shards / ("a.tar.gz" if gz else "a.tar"), members, gz=gz)
    return {"kind": "webdataset", "name": name, "shards": str(shards), "shuffle": False}


def _good(n: int = 2, prefix: str = "g"):
    return pair_members([f"{prefix}{i}" for i in range(n)])


def _document(root: Path, edit: Callable[[dict, list], None]) -> list[dict]:
    members = interleaved_members("doc")
    doc = json.loads(members[0][1])
    edit(doc, members)
    members[0] = ("doc.json", json.dumps(doc).encode())
    return [_web(root, _good() + members)]


def _truncated_tar(root: Path) -> list[dict]:
    full = write_tar(root / "full.tar", _good(3) + pair_members(["lost"]))
    shards = root / "shards"
    shards.mkdir()
    truncate_in_member(full, shards / "a.tar", "lost.txt")
    return [{"kind": "webdataset", "name": "web", "shards": str(shards), "shuffle": False}]


def _truncated_gzip(root: Path) -> list[dict]:
    shards = root / "shards"
    shards.mkdir()
    data = gzip.compress((write_tar(root / "full.tar", _good(40)).read_bytes()))
    (shards / "a.tar.gz").write_bytes(data[: len(data) * 6 // 10])
    return [{"kind": "webdataset", "name": "web", "shards": str(shards), "shuffle": False}]


def _two_shards(root: Path, second: bytes | None) -> list[dict]:
    good = write_tar(root / "good.tar", _good())
    other = root / "other.tar"
    if second is not None:
        other.write_bytes(second)
    return [{"kind": "webdataset", "name": "web", "shards": [str(good), str(other)], "shuffle": False}]


def _karpathy(root: Path, edit: Callable[[Path, Path, dict], None] | None = None, **options) -> list[dict]:
    annotations, image_root = make_karpathy(root, "coco")
    if edit is not None:
        data = json.loads(annotations.read_text())
        edit(annotations, image_root, data)
        if data:
            annotations.write_text(json.dumps(data))
    return [{"kind": "coco", "name": "coco", "annotations": str(annotations), "image_root": str(image_root),
             "split": "train", "per_caption": False, **options}]


def _coco_image(image_root: Path, i: int) -> Path:
    return image_root / "val2014" / f"COCO_val2014_{i:012d}.jpg"


def _vqav2(root: Path, edit: Callable[[Path, Path, Path], None] | None = None, **options) -> list[dict]:
    questions, annotations, image_root = make_vqav2(root)
    if edit is not None:
        edit(questions, annotations, image_root)
    return [{"kind": "vqav2", "name": "vqa", "questions": str(questions), "annotations": str(annotations),
             "image_root": str(image_root), **options}]


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _shapes_and(broken: list[dict]) -> list[dict]:
    return [{"kind": "shapes", "name": "shapes", "n": 50, "task": "caption"}, *broken]


# -- the matrix -----------------------------------------------------------------------------------------------
MATRIX: dict[str, tuple[Callable[[Path], list[dict]], object]] = {
    # WebDataset pairs
    "web: corrupt image": (lambda r: [_web(r, _good() + [("x.jpg", CORRUPT_IMAGE), ("x.txt", b"cap")])],
                           Skips(2, {"corrupt_image": 1})),
    "web: image without caption": (lambda r: [_web(r, _good() + [("x.jpg", image_bytes())])],
                                   Skips(2, {"bad_record": 1})),
    "web: caption not UTF-8": (lambda r: [_web(r, _good() + [("x.jpg", image_bytes()), ("x.txt", b"\xff\xfe")])],
                               Skips(2, {"bad_record": 1})),
    "web: caption without image": (lambda r: [_web(r, _good() + [("x.txt", b"a caption")])],
                                   Skips(2, {"bad_record": 1})),
    "web: <image> markers != images": (
        lambda r: [_web(r, _good() + [("x.jpg", image_bytes()), ("x.txt", b"<image> two <image>")])],
        Skips(2, {"image_marker_mismatch": 1})),
    # WebDataset interleaved (MMC4-like) documents
    "doc: json not JSON": (lambda r: [_web(r, _good() + [("d.json", b"{not json"), ("d.0.jpg", image_bytes())])],
                           Skips(2, {"bad_record": 1})),
    "doc: image matched to no sentence": (
        lambda r: _document(r, lambda doc, m: doc["image_info"][0].update(matched_text_index=7)),
        Skips(2, {"bad_record": 1})),
    "doc: image missing": (lambda r: _document(r, lambda doc, m: m.pop(1)), Skips(2, {"missing_image": 1})),
    "doc: base64 image not base64": (
        lambda r: _document(r, lambda doc, m: (m.pop(), doc["image_info"][1].update(image_base64="%%%"))),
        Skips(2, {"corrupt_image": 1})),
    # WebDataset shards
    "shard: tar cut inside a member": (_truncated_tar, Skips(3, {"truncated_tar": 1})),
    "shard: gzip cut short": (_truncated_gzip, Skips(None, {"truncated_tar": 1})),  # rows before the cut: zlib's
    "shard: not a tar": (lambda r: _two_shards(r, b"garbage " * 100), Skips(2, {"corrupt_tar": 1})),
    "shard: listed but missing": (lambda r: _two_shards(r, None), Skips(2, {"missing_shard": 1})),
    "shard: folder without shards": (lambda r: [{"kind": "webdataset", "shards": str(r)}],
                                     Fails(ValueError, ("no tar shards found", "{root}"))),
    "shard: mistyped path": (lambda r: [{"kind": "webdataset", "name": "web", "shards": str(r / "shard-{000..003}.tar")}],
                             Stops(r"'web'.*'missing_shard'")),
    "shard: every record broken": (lambda r: [_web(r, [m for i in range(3) for m in ((f"x{i}.jpg", CORRUPT_IMAGE),
                                                                                    (f"x{i}.txt", b"c"))])],
                                   Stops(r"'web'.*'corrupt_image'")),
    # COCO / Flickr30k (Karpathy split)
    "karpathy: image file missing": (lambda r: _karpathy(r, lambda a, i, d: _coco_image(i, 1).unlink()),
                                     Skips(2, {"missing_image": 1})),
    "karpathy: image file corrupt": (lambda r: _karpathy(r, lambda a, i, d: _coco_image(i, 0).write_bytes(CORRUPT_IMAGE)),
                                     Skips(2, {"corrupt_image": 1})),
    "karpathy: wrong image root": (lambda r: _karpathy(r, image_root=str(r)), Stops(r"'coco'.*'missing_image'")),
    "karpathy: annotation file missing": (lambda r: _karpathy(r, lambda a, i, d: (a.unlink(), d.clear())),
                                          Fails(FileNotFoundError, ("dataset_coco.json",))),
    "karpathy: annotation file not JSON": (lambda r: _karpathy(r, lambda a, i, d: (a.write_text("{oops"), d.clear())),
                                           Fails(ValueError, ("dataset_coco.json", "not a valid JSON"))),
    "karpathy: no 'images' list": (lambda r: _karpathy(r, lambda a, i, d: d.update(images={"a": 1})),
                                   Fails(ValueError, ("dataset_coco.json", "'images' list"))),
    "karpathy: entry not an object": (lambda r: _karpathy(r, lambda a, i, d: d["images"].__setitem__(2, "x.jpg")),
                                      Fails(ValueError, ("dataset_coco.json", "images[2]"))),
    "karpathy: sentences malformed": (
        lambda r: _karpathy(r, lambda a, i, d: d["images"][1].update(sentences=["no raw"])),
        Fails(ValueError, ("dataset_coco.json", "images[1].sentences"))),
    # VQAv2
    "vqav2: image file missing": (
        lambda r: _vqav2(r, lambda q, a, i: (i / "COCO_val2014_000000000007.jpg").unlink()),
        Skips(2, {"missing_image": 2})),
    "vqav2: question without id": (
        lambda r: _vqav2(r, lambda q, a, i: _edit_json(q, lambda d: d["questions"][0].pop("question_id"))),
        Skips(3, {"bad_record": 1})),
    "vqav2: question without annotation": (
        lambda r: _vqav2(r, lambda q, a, i: _edit_json(a, lambda d: d["annotations"].pop(3))),
        Skips(3, {"bad_record": 1})),
    "vqav2: wrong image root": (lambda r: _vqav2(r, image_root=str(r)), Stops(r"'vqa'.*'missing_image'")),
    "vqav2: questions file not JSON": (lambda r: _vqav2(r, lambda q, a, i: q.write_text("[1, 2")),
                                       Fails(ValueError, ("questions.json", "not a valid JSON"))),
    "vqav2: annotations file missing": (lambda r: _vqav2(r, lambda q, a, i: a.unlink()),
                                        Fails(FileNotFoundError, ("annotations.json",))),
    "vqav2: annotation without question_id": (
        lambda r: _vqav2(r, lambda q, a, i: _edit_json(a, lambda d: d["annotations"][2].pop("question_id"))),
        Fails(ValueError, ("annotations.json", "annotations[2]", "question_id"))),
    "vqav2: no data_subtype given": (
        lambda r: _vqav2(r, lambda q, a, i: _edit_json(q, lambda d: d.pop("data_subtype"))),
        Fails(ValueError, ("questions.json", "data_subtype"))),
    # Mixtures: one unusable source among good ones is reported, not silently dropped from the mix
    "mixture: one source with a wrong image root": (lambda r: _shapes_and(_karpathy(r, image_root=str(r))),
                                                    Stops(r"source 'coco'.*other sources.*'missing_image'")),
    "mixture: one source with a mistyped shard path": (
        lambda r: _shapes_and([{"kind": "webdataset", "name": "web", "shards": str(r / "s-{0..3}.tar")}]),
        Stops(r"source 'web'.*'missing_shard'")),
    "mixture: broken records in one source": (
        lambda r: _shapes_and([_web(r, _good() + [("x.jpg", CORRUPT_IMAGE), ("x.txt", b"c")])]),
        Skips(52, {"corrupt_image": 1})),
}


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


def _build(sources, tok, cycle: bool):
    return build_loader(sources, tok, batch_size=1, image_size=32, num_workers=0, prefetch_factor=0, cycle=cycle,
                        drop_last=False, max_consecutive_skips=20)


@pytest.mark.parametrize("cell", list(MATRIX))
def test_data_fault_matrix(cell, tmp_path, tok):
    build, expected = MATRIX[cell]
    if isinstance(expected, Fails):
        with pytest.raises(expected.error) as info:
            _build(build(tmp_path), tok, cycle=False)
        for word in expected.words:
            assert word.format(root=tmp_path) in str(info.value), str(info.value)
    elif isinstance(expected, Stops):
        with _build(build(tmp_path), tok, cycle=True) as loader:
            iterator = iter(loader)
            with pytest.raises(NoUsableDataError) as info:
                for _ in range(10_000):  # a good source among them keeps yielding until the broken one trips
                    next(iterator)
        assert re.search(expected.pattern, str(info.value), re.S), str(info.value)
    else:
        with _build(build(tmp_path), tok, cycle=False) as loader:
            rows = list(loader)
        if expected.rows is not None:
            assert len(rows) == expected.rows, loader.skipped
        else:
            assert 0 < len(rows) < 40
        assert loader.skipped == expected.counts


def test_the_matrix_covers_every_source_kind_and_outcome():
    kinds = {cell.split(":")[0] for cell in MATRIX}
    assert {"web", "doc", "shard", "karpathy", "vqav2", "mixture"} <= kinds
    outcomes = {type(expected).__name__ for _, expected in MATRIX.values()}
    assert {"Skips", "Stops", "Fails"} <= outcomes
    assert len(MATRIX) >= 30
