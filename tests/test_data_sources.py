"""Sources on small fixture files: WebDataset tar shards (pairs, MMC4-like documents), Karpathy captions, VQAv2."""

import json

import numpy as np
import pytest

from data_fixtures import (
    CORRUPT_IMAGE,
    image_bytes,
    interleaved_members,
    make_karpathy,
    make_vqav2,
    pair_members,
    write_tar,
)
from flamingo_fast.data import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    BadSampleError,
    CaptionDataset,
    Skipped,
    TarShardSource,
    VQAv2Dataset,
    expand_shards,
    iter_samples,
    read_shard,
    record_to_sample,
)
from flamingo_fast.data.webdataset import TarShardNode


def _records(path):
    return list(read_shard(str(path)))


def test_tar_pairs_grouped_by_key(tmp_path):
    members = pair_members(["a/x0", "a/x1"]) + pair_members(["y2"], caption_kind="json")
    shard = write_tar(tmp_path / "pairs.tar", members)
    records = _records(shard)
    assert [r["__key__"] for r in records] == ["a/x0", "a/x1", "y2"]
    assert set(records[0]) == {"__key__", "__url__", "jpg", "txt"} and set(records[2]) >= {"jpg", "json"}
    samples = [record_to_sample(r) for r in records]
    assert samples[0].text == f"{IMAGE_TOKEN}caption of a/x0{EOC_TOKEN}"
    assert samples[2].text == f"{IMAGE_TOKEN}caption of y2{EOC_TOKEN}"
    assert samples[1].images[0].size == (40, 30) and samples[1].images[0].mode == "RGB"
    assert np.asarray(samples[1].images[0])[15, 20, 1] > 200  # fixture colour 1 = green


def test_gzipped_shard_and_shard_expansion(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"s-{i:03d}.tar.gz", pair_members([f"k{i}"]), gz=True)
    shards = expand_shards(str(tmp_path / "s-{000..002}.tar.gz"))
    assert shards == [str(tmp_path / f"s-{i:03d}.tar.gz") for i in range(3)]
    assert expand_shards(str(tmp_path)) == shards and expand_shards(str(tmp_path / "*.tar.gz")) == shards
    assert [r["__key__"] for s in shards for r in _records(s)] == ["k0", "k1", "k2"]


def test_mmc4_interleaved_document(tmp_path):
    shard = write_tar(tmp_path / "docs.tar", interleaved_members("doc0") + interleaved_members("doc1", inline_second=True))
    samples = [record_to_sample(r) for r in _records(shard)]
    for sample in samples:
        # image 1 matched sentence 0, image 0 matched sentence 2 (OpenFlamingo text layout)
        assert sample.text == (
            f"{IMAGE_TOKEN}First sentence. Middle sentence.{EOC_TOKEN}{IMAGE_TOKEN}Last sentence.{EOC_TOKEN}"
        )
        assert sample.task == "interleaved" and len(sample.images) == 2
        assert np.asarray(sample.images[0])[0, 0, 2] > 200 and np.asarray(sample.images[1])[0, 0, 0] > 200


def test_bad_records_raise_bad_sample_error(tmp_path):
    cases = {
        "corrupt_image": [("c.jpg", CORRUPT_IMAGE), ("c.txt", b"hi")],
        "image_marker_mismatch": [("m.jpg", image_bytes()), ("m.txt", b"two <image> markers")],
        "bad_record": [("n.txt", b"no image")],
        "missing_image": [("d.json", json.dumps({"text_list": ["a"], "image_info": [{"matched_text_index": 0}]}).encode())],
    }
    for reason, members in cases.items():
        (record,) = _records(write_tar(tmp_path / f"{reason}.tar", members))
        with pytest.raises(BadSampleError) as info:
            record_to_sample(record)
        assert info.value.reason == reason


@pytest.mark.parametrize("cut", ["mid_member", "at_header", "mid_header"])
def test_truncated_archive_gives_complete_records_then_a_marker(tmp_path, cut):
    shard = write_tar(tmp_path / "full.tar", pair_members([f"k{i}" for i in range(4)]))
    data = shard.read_bytes()
    # layout: 512-byte header + data padded to 512 per member; k0.jpg, k0.txt, k1.jpg, ...
    jpg_blocks = 1 + -(-len(image_bytes()) // 512)
    record_bytes = (jpg_blocks + 2) * 512
    end = {"mid_member": 2 * record_bytes + 700, "at_header": 2 * record_bytes + jpg_blocks * 512, "mid_header": 2 * record_bytes + 100}[cut]
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(data[:end])
    records = _records(truncated)
    # A record is complete once the next key's header was read; the record at the cut is dropped
    # (mid_header: the unreadable header might have been k1's, so k1 goes too).
    expected = ["k0"] if cut == "mid_header" else ["k0", "k1"]
    assert [r["__key__"] for r in records[:-1]] == expected
    assert isinstance(records[-1], Skipped) and records[-1].reason == "truncated_tar"


@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_truncated_gzip_shard(tmp_path, keep):
    noise = np.random.default_rng(0)
    members = []
    for i in range(4):  # incompressible payloads, so the cut lands inside the members
        members += pair_members([f"k{i}"]) + [(f"k{i}.bin", noise.bytes(20000))]
    data = write_tar(tmp_path / "full.tar.gz", members, gz=True).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: int(len(data) * keep)])
    records = _records(tmp_path / "cut.tar.gz")
    assert isinstance(records[-1], Skipped) and records[-1].reason == "truncated_tar"
    assert [r["__key__"] for r in records[:-1]] == ([] if keep < 0.5 else ["k0", "k1"])


def test_missing_and_garbage_shards_are_markers(tmp_path):
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file at all" * 50)
    assert [r.reason for r in _records(tmp_path / "garbage.tar")] == ["corrupt_tar"]
    assert [r.reason for r in _records(tmp_path / "nope.tar")] == ["missing_shard"]


def test_tar_node_resume_and_rank_split(tmp_path):
    shards = [str(write_tar(tmp_path / f"s{i}.tar", pair_members([f"s{i}k{j}" for j in range(3)]))) for i in range(2)]

    def keys(node, n=None):
        out = []
        for record in node:
            out.append(record["__key__"])
            if n is not None and len(out) == n:
                break
        return out

    full = keys(TarShardNode(shards, 0, 1, seed=1, shuffle=True, source="t"))
    assert sorted(full) == sorted(f"s{i}k{j}" for i in range(2) for j in range(3))
    node = TarShardNode(shards, 0, 1, seed=1, shuffle=True, source="t")
    head = keys(node, 4)
    resumed = TarShardNode(shards, 0, 1, seed=1, shuffle=True, source="t")
    resumed.reset(node.state_dict())
    assert head + keys(resumed) == full
    # 2 shards, 2 ranks: one shard each; 2 shards, 3 ranks: every rank reads both, strides records.
    for world in (2, 3):
        per_rank = [keys(TarShardNode(shards, r, world, seed=1, shuffle=True, source="t")) for r in range(world)]
        flat = [k for ks in per_rank for k in ks]
        assert sorted(flat) == sorted(full) and len(set(flat)) == len(flat)


def test_tar_source_iter_samples_counts_skips(tmp_path):
    write_tar(tmp_path / "a.tar", pair_members(["k0"]) + [("bad.jpg", CORRUPT_IMAGE), ("bad.txt", b"x")] + pair_members(["k1"]))
    source = TarShardSource(str(tmp_path / "a.tar"), shuffle=False)
    skipped = {}
    samples = list(iter_samples(source, skipped))
    assert [s.id for s in samples] == ["k0", "k1"] and skipped == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="no tar shards"):
        TarShardSource(str(tmp_path / "none-*.tar"))


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_captions(tmp_path, dataset):
    annotations, image_root = make_karpathy(tmp_path, dataset)
    train = CaptionDataset(annotations, image_root, split="train")
    # train = train + restval images (0, 1, 2), one sample per caption: 2 + 3 + 2 captions
    assert len(train) == 7 and train.per_caption
    sample = train[2]
    assert sample.text == f"{IMAGE_TOKEN}Output:Image 1 caption 0.{EOC_TOKEN}"
    assert sample.prompt == f"{IMAGE_TOKEN}Output:" and sample.task == "caption"
    assert sample.references == ["Image 1 caption 0.", "Image 1 caption 1.", "Image 1 caption 2."]
    assert np.asarray(sample.images[0])[0, 0, 1] > 200  # fixture colour 1 = green
    test = CaptionDataset(annotations, image_root, split="test")
    assert len(test) == 1 and not test.per_caption and len(test[0].references) == 2
    expected_id = "coco/104" if dataset == "coco" else "flickr30k/4"
    assert test[0].id == expected_id


def test_karpathy_missing_and_corrupt_images(tmp_path):
    annotations, image_root = make_karpathy(tmp_path, "flickr30k")
    (image_root / "1000.jpg").unlink()
    (image_root / "1001.jpg").write_bytes(CORRUPT_IMAGE)
    dataset = CaptionDataset(annotations, image_root, split="train")
    with pytest.raises(BadSampleError) as missing:
        dataset[0]
    with pytest.raises(BadSampleError) as corrupt:
        dataset[2]
    assert (missing.value.reason, corrupt.value.reason) == ("missing_image", "corrupt_image")
    with pytest.raises(ValueError, match="split"):
        CaptionDataset(annotations, image_root, split="dev")


def test_vqav2(tmp_path):
    questions, annotations, image_root = make_vqav2(tmp_path)
    dataset = VQAv2Dataset(questions, image_root, annotations)
    assert len(dataset) == 4
    sample = dataset[1]
    assert sample.text == f"{IMAGE_TOKEN}Question:Is it square? Short answer:yes{EOC_TOKEN}"
    assert sample.prompt == f"{IMAGE_TOKEN}Question:Is it square? Short answer:"
    assert sample.answers == ["yes"] * 8 + ["no idea"] * 2 and sample.id == "421" and sample.task == "vqa"
    assert sample.meta["image_id"] == 42 and dataset.image_path(42).name == "COCO_val2014_000000000042.jpg"
    unlabeled = VQAv2Dataset(questions, image_root)  # test-dev style: no annotations
    assert unlabeled[0].text == unlabeled[0].prompt and unlabeled[0].answers is None
    (image_root / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(BadSampleError, match="missing_image"):
        dataset[2]
    with pytest.raises(ValueError, match="image_subtype"):
        qs = tmp_path / "q2.json"
        qs.write_text(json.dumps({"questions": []}))
        VQAv2Dataset(qs, image_root)


def _rewrite(path, key, index, value):
    data = json.loads(path.read_text())
    data[key][index] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("entry,expected", [
    ("not an object", r"annotations\[1\] must be an object with an int or string question_id"),
    ({"answers": []}, r"annotations\[1\] must be an object"),
    ({"question_id": [1, 2]}, r"annotations\[1\] must be an object"),
    ({"question_id": True}, r"annotations\[1\] must be an object"),
])
def test_vqav2_malformed_annotation_entry_names_the_file_and_entry(tmp_path, entry, expected):
    questions, annotations, image_root = make_vqav2(tmp_path)
    _rewrite(annotations, "annotations", 1, entry)
    with pytest.raises(ValueError, match=rf"annotations\.json: {expected}"):
        VQAv2Dataset(questions, image_root, annotations)


@pytest.mark.parametrize("entry", [
    "not an object",
    {"image_id": 42, "question": "Is it red?"},  # no question_id
    {"image_id": "42", "question": "Is it red?", "question_id": 9},  # image id as a string
    {"image_id": 42, "question": ["Is it red?"], "question_id": 9},
    {"image_id": None, "question": "Is it red?", "question_id": 9},
])
def test_vqav2_malformed_question_entry_is_a_bad_record_naming_the_file_and_entry(tmp_path, entry):
    questions, annotations, image_root = make_vqav2(tmp_path)
    _rewrite(questions, "questions", 2, entry)
    dataset = VQAv2Dataset(questions, image_root)
    with pytest.raises(BadSampleError, match=r"questions\.json: questions\[2\] needs") as error:
        dataset[2]
    assert error.value.reason == "bad_record"  # skipped and counted by the pipeline, like a broken image
    assert dataset[1].id == "421"  # the other entries still load


def test_vqav2_answers_that_are_not_a_list_of_objects_fall_back_to_the_main_answer(tmp_path):
    questions, annotations, image_root = make_vqav2(tmp_path)
    data = json.loads(annotations.read_text())
    data["annotations"][1]["answers"] = "yes"
    data["annotations"][0]["answers"] = ["yes", {"answer": "no"}]
    annotations.write_text(json.dumps(data))
    dataset = VQAv2Dataset(questions, image_root, annotations)
    assert dataset[1].answers == ["yes"] and dataset[0].answers == ["no"]


@pytest.mark.parametrize("entry,expected", [
    ("not an object", r"images\[1\] must be an object"),
    ({"split": "train", "filename": "x.jpg", "sentences": "a caption"}, r"images\[1\]\.sentences must be a list"),
    ({"split": "train", "filename": "x.jpg", "sentences": ["a caption"]}, r"images\[1\]\.sentences must be a list"),
    ({"split": "train", "filename": 7, "sentences": [{"raw": "a caption"}]}, r"images\[1\]: filename and filepath"),
    ({"split": "train", "filename": "x.jpg", "filepath": None, "sentences": [{"raw": "c"}]},
     r"images\[1\]: filename and"),
])
def test_karpathy_malformed_entry_names_the_file_and_entry(tmp_path, entry, expected):
    annotations, image_root = make_karpathy(tmp_path, "coco")
    _rewrite(annotations, "images", 1, entry)
    with pytest.raises(ValueError, match=rf"dataset_coco\.json: {expected}"):
        CaptionDataset(annotations, image_root, split="train")
