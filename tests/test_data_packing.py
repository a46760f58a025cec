"""Sequence packing (flamingo_fast/data/packing.py): rows of whole samples, the packed batch layout, per-source
rows, padding efficiency, and exact resume of the Packer alone and through the whole loader."""

import io
import random

import pytest
import torch
from torchdata.nodes import BaseNode

from data_fixtures import assert_same_batches
from flamingo_fast.data import Collator, EncodedSample, build_loader, shapes_dataset, shapes_tokenizer
from flamingo_fast.data.collate import IGNORE_INDEX
from flamingo_fast.data.packing import Packer, collate_packed, cu_seqlens_from_document_ids
from train.config import DataSection, TrainConfig, apply_dict
from train.data import build_train_loader


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


class ListNode(BaseNode):
    """A list as a torchdata node (state: the position), recording every pull in `pulls`."""

    def __init__(self, items):
        super().__init__()
        self.items, self.pulls, self._i = list(items), [], 0

    def reset(self, initial_state=None):
        super().reset(initial_state)
        self._i = 0 if initial_state is None else initial_state["i"]

    def next(self):
        if self._i >= len(self.items):
            raise StopIteration()
        item = self.items[self._i]
        self._i += 1
        self.pulls.append(item.id)
        return item

    def get_state(self):
        return {"i": self._i}


def _sample(length, source="a", id=None, images=0, frames=1):
    ids = torch.arange(100, 100 + length)
    return EncodedSample(input_ids=ids, labels=ids.clone(), images=torch.zeros(images, frames, 3, 4, 4),
                         id=id, source=source)


def _synthetic(n, lengths, sources=("a",), weights=None, seed=0):
    rng = random.Random(seed)
    return [_sample(rng.randint(*lengths), rng.choices(sources, weights)[0], id=f"s{i}") for i in range(n)]


def _rows(packer):
    return [[item.id for item in row] for row in packer]


def _find_packer_states(state):
    """Every Packer state nested in a loader state."""
    if isinstance(state, dict):
        if {"pulled", "buffered", "exhausted"} <= set(state):
            yield state
        for value in state.values():
            yield from _find_packer_states(value)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- the Packer


def test_rows_fit_hold_one_source_and_every_sample_exactly_once():
    items = _synthetic(400, (1, 64), sources=("a", "b", "c"), weights=(5, 2, 1))
    by_id = {item.id: item for item in items}
    packer = Packer(ListNode(items), max_length=64, buffer_size=8)
    rows = list(packer)
    seen = [i for row in rows for i in (item.id for item in row)]
    assert sorted(seen) == sorted(by_id) and len(seen) == len(set(seen))
    for row in rows:
        assert sum(item.input_ids.numel() for item in row) <= 64
        assert len({item.source for item in row}) == 1
        for item in row:  # intact: the very samples, unsplit
            assert item is by_id[item.id] and torch.equal(item.input_ids, by_id[item.id].input_ids)
    assert any(sum(item.input_ids.numel() for item in row) == 64 for row in rows)


def test_row_starts_with_the_oldest_item_then_best_fit():
    lengths = [3, 5, 7, 2, 6, 6, 1]
    items = [_sample(n, id=f"s{i}") for i, n in enumerate(lengths)]
    # buffer full at s0..s3: oldest s0 (3), then the longest that fits in 7: s2 (7) -> full.
    # buffer s1 s3 s4 s5 full: oldest s1 (5), room 5: s3 (2), room 3: nothing (6, 6).
    # end of input: buffer s4 s5 s6: oldest s4 (6), room 4: s6 (1); then s5.
    rows = _rows(Packer(ListNode(items), max_length=10, buffer_size=4))
    assert rows == [["s0", "s2"], ["s1", "s3"], ["s4", "s6"], ["s5"]]
    # ties between equally long candidates go to the older one
    items = [_sample(n, id=f"t{i}") for i, n in enumerate([4, 3, 3, 3])]
    assert _rows(Packer(ListNode(items), max_length=7, buffer_size=4))[0] == ["t0", "t1"]


def test_no_item_waits_more_than_buffer_size_rows():
    buffer_size = 6
    items = _synthetic(300, (1, 40))
    upstream = ListNode(items)
    packer = Packer(upstream, max_length=64, buffer_size=buffer_size)
    pulls_before_row, row_of = [], {}
    for r, row in enumerate(packer):
        pulls_before_row.append(len(upstream.pulls))
        for item in row:
            row_of[item.id] = r
    for p, item_id in enumerate(upstream.pulls):
        pulled_in_row = next(r for r, count in enumerate(pulls_before_row) if count > p)
        assert row_of[item_id] - pulled_in_row <= buffer_size - 1, item_id


def test_padding_fraction_on_pairs_like_lengths_is_small():
    """Image-text-pair-like lengths (10-60 tokens) into 512-token rows with the default buffer."""
    items = _synthetic(4000, (10, 60), seed=1)
    rows = list(Packer(ListNode(items), max_length=512))
    used = [sum(item.input_ids.numel() for item in row) for row in rows]
    padding = 1 - sum(used) / (512 * len(rows))
    steady = 1 - sum(used[:-3]) / (512 * (len(rows) - 3))  # without the final flush
    assert padding <= 0.05 and steady <= 0.05, (padding, steady)


def test_oversized_sample_and_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        list(Packer(ListNode([_sample(9, id="long")]), max_length=8))
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="buffer_size"):
            Packer(ListNode([]), max_length=8, buffer_size=bad)
    with pytest.raises(ValueError, match="max_length"):
        Packer(ListNode([]), max_length=0)


def test_packer_resumes_exactly_from_every_row():
    items = _synthetic(240, (1, 64), sources=("a", "b"), weights=(3, 1), seed=2)
    packer = Packer(ListNode(items), max_length=64, buffer_size=8)
    packer.reset()
    states, rows = [packer.state_dict()], []
    for row in packer:
        rows.append([item.id for item in row])
        states.append(packer.state_dict())
    mid_buffer = [s for s in states if s["buffered"] and s["pulled"] > len(s["buffered"])]
    assert mid_buffer and any(s["exhausted"] and s["buffered"] for s in states)
    for k, state in enumerate(states):
        state = _roundtrip(state)  # plain ints / lists (and the upstream's state): no tensors of ours
        assert set(state) == {"source", "pulled", "buffered", "exhausted"}
        resumed = Packer(ListNode(items), max_length=64, buffer_size=8)
        resumed.reset(state)
        assert _rows(resumed) == rows[k:], k


def test_packer_state_from_another_pipeline_is_rejected():
    items = _synthetic(50, (1, 64))
    packer = Packer(ListNode(items), max_length=64, buffer_size=8)
    next(packer)
    state = packer.state_dict()
    with pytest.raises(ValueError, match="does not belong"):
        Packer(ListNode(items[: state["source"]["i"] + 1]), max_length=64, buffer_size=8).reset(state)


# ---------------------------------------------------------------- the packed batch


def _doc(ids, images, source="a", labels=None, id=None):
    ids = torch.tensor(ids)
    images = torch.stack([torch.full((1, 3, 4, 4), float(v)) for v in images]) if images else torch.zeros(0, 1, 3, 4, 4)
    return EncodedSample(ids, ids.clone() if labels is None else torch.tensor(labels), images, id=id, source=source)


def test_packed_layout_by_hand(tok):
    img, bos, pad = tok.image_token_id, tok.bos_id, tok.pad_id
    w1, w2 = tok.encode("red circle")
    with_image_first = _doc([img, w1, w2], [1.0])  # labels unmasked at its first token
    without_images = _doc([bos, w1, w2], [])
    several = _doc([bos, img, w1, img, w2, img], [2.0, 3.0, 4.0], source="b")
    five = _doc([bos, w1, w2, w1, w2], [])
    rows = [[with_image_first, without_images], [several], [without_images, five]]
    batch = collate_packed(rows, max_length=8, pad_id=pad, image_token_id=img, source_names=["b", "a"])
    assert batch["input_ids"].tolist() == [
        [img, w1, w2, bos, w1, w2, pad, pad],
        [bos, img, w1, img, w2, img, pad, pad],
        [bos, w1, w2, bos, w1, w2, w1, w2],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 6 + [0] * 2, [1] * 8]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [x, w1, w2, x, w1, w2, x, x],
        [x, img, w1, img, w2, img, x, x],
        [x, w1, w2, x, w1, w2, w1, w2],
    ]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    # the padding tail is one more document; a full row has no extra id
    assert batch["document_ids"].tolist() == [
        [0, 0, 0, 1, 1, 1, 2, 2],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]
    # flat image list: row 0's image is 0, row 1's are 1, 2, 3; no image crosses into the next document
    assert batch["media_index"].tolist() == [
        [0, 0, 0, -1, -1, -1, -1, -1],
        [-1, 1, 1, 2, 2, 3, -1, -1],
        [-1] * 8,
    ]
    assert batch["images"].shape == (4, 1, 3, 4, 4)
    assert batch["images"][:, 0, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert batch["num_images"].tolist() == [1, 3, 0]
    assert batch["source_index"].tolist() == [1, 0, 1]
    assert {k: v.dtype for k, v in batch.items()} == {k: torch.float32 if k == "images" else torch.long for k in batch}
    assert cu_seqlens_from_document_ids(batch["document_ids"]).tolist() == [0, 3, 6, 8, 14, 16, 19, 24]

    no_images = collate_packed([[without_images]], max_length=4, pad_id=pad, image_token_id=img, source_names=["a"])
    assert no_images["images"].shape == (0, 1, 3, 4, 4) and no_images["num_images"].tolist() == [0]


def test_packed_batch_errors(tok):
    common = dict(max_length=8, pad_id=tok.pad_id, image_token_id=tok.image_token_id, source_names=["a", "b"])
    img = tok.image_token_id
    video = EncodedSample(torch.tensor([img]), torch.tensor([img]), torch.zeros(1, 2, 3, 4, 4), source="a")
    with pytest.raises(ValueError, match="frame count"):
        collate_packed([[_doc([img], [1.0]), video]], **common)
    with pytest.raises(ValueError, match="mixes sources"):
        collate_packed([[_doc([1, 5], []), _doc([1, 5], [], source="b")]], **common)
    with pytest.raises(ValueError, match="max_length"):
        collate_packed([[_doc([1] * 5, []), _doc([1] * 4, [])]], **common)
    with pytest.raises(ValueError, match="not one of the loader's sources"):
        collate_packed([[_doc([1, 5], [], source="c")]], **common)
    with pytest.raises(ValueError, match="empty batch"):
        collate_packed([], **common)


def test_cu_seqlens_from_document_ids():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    cu = cu_seqlens_from_document_ids(ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6, 10, 12]
    assert cu_seqlens_from_document_ids(torch.zeros(3, 4, dtype=torch.long)).tolist() == [0, 4, 8, 12]  # rows split
    assert cu_seqlens_from_document_ids(torch.tensor([0, 1, 1])).tolist() == [0, 1, 3]


def _brute_force(rows, max_length, pad_id, image_token_id):
    """The packed layout, recomputed token by token."""
    out = {k: [] for k in ("input_ids", "labels", "positions", "document_ids", "media_index")}
    flat = 0
    for docs in rows:
        row = {k: [] for k in out}
        for d, doc in enumerate(docs):
            latest = -1
            for p, (t, label) in enumerate(zip(doc.input_ids.tolist(), doc.labels.tolist())):
                if t == image_token_id:
                    latest = flat
                    flat += 1
                row["input_ids"].append(t)
                row["labels"].append(IGNORE_INDEX if p == 0 else label)
                row["positions"].append(p)
                row["document_ids"].append(d)
                row["media_index"].append(latest)
        tail = max_length - len(row["input_ids"])
        row["input_ids"] += [pad_id] * tail
        row["labels"] += [IGNORE_INDEX] * tail
        row["positions"] += list(range(tail))
        row["document_ids"] += [len(docs)] * tail
        row["media_index"] += [-1] * tail
        for k in out:
            out[k].append(row[k])
    return {k: torch.tensor(v) for k, v in out.items()}


def test_shapes_rows_match_a_brute_force_recomputation(tok):
    collator = Collator(tok, image_size=16, max_length=48)
    encoded = []
    for sample in shapes_dataset(n=40, image_size=16, seed=5):
        item = collator.encode(sample)
        item.source = "shapes"
        encoded.append(item)
    rows = list(Packer(ListNode(encoded), max_length=48, buffer_size=6))
    assert any(len(row) > 1 for row in rows) and any(item.images.shape[0] > 1 for row in rows for item in row)
    for start in range(0, len(rows), 4):
        chunk = rows[start : start + 4]
        batch = collate_packed(chunk, max_length=48, pad_id=tok.pad_id, image_token_id=tok.image_token_id,
                               source_names=["shapes"])
        for key, expected in _brute_force(chunk, 48, tok.pad_id, tok.image_token_id).items():
            assert torch.equal(batch[key], expected), key
        docs_per_row = torch.tensor([len(row) for row in chunk])[:, None]
        assert torch.equal(batch["attention_mask"], (batch["document_ids"] < docs_per_row).long())
        assert torch.equal(batch["images"], torch.cat([item.images for row in chunk for item in row]))
        assert batch["num_images"].tolist() == [sum(item.images.shape[0] for item in row) for row in chunk]


# ---------------------------------------------------------------- through the loader


def _documents(batch, tok):
    """(tokens, labels, image bytes) of every document of a packed batch."""
    docs, flat = [], 0
    for r in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][r].bool()
        ids, labels, doc_ids = batch["input_ids"][r][real], batch["labels"][r][real], batch["document_ids"][r][real]
        for d in doc_ids.unique().tolist():
            here = doc_ids == d
            count = int((ids[here] == tok.image_token_id).sum())
            images = batch["images"][flat : flat + count]
            flat += count
            docs.append((tuple(ids[here].tolist()), tuple(labels[here].tolist()), images.numpy().tobytes()))
    assert flat == batch["images"].shape[0]
    return docs


def test_one_epoch_holds_every_sample_once_as_its_unpacked_encoding(tok):
    collator = Collator(tok, image_size=16, max_length=40)  # some interleaved samples get truncated
    expected = []
    for sample in shapes_dataset(n=50, image_size=16):
        item = collator.encode(sample)
        expected.append((tuple(item.input_ids.tolist()), tuple(item.labels.tolist()), item.images.numpy().tobytes()))
    assert any(len(e[0]) == 40 for e in expected)
    with build_loader([{"kind": "shapes", "n": 50}], tok, batch_size=3, image_size=16, num_workers=0, prefetch_factor=0,
                      max_length=40, packing=True, packing_buffer=5, cycle=False, drop_last=False) as loader:
        batches = list(loader)
    assert all(batch["input_ids"].shape[1] == 40 for batch in batches)
    got = [doc for batch in batches for doc in _documents(batch, tok)]
    assert sorted(got) == sorted(expected)


def _mixture():
    return [
        {"kind": "shapes", "name": "pairs", "task": "caption", "n": 20, "weight": 3.0},
        {"kind": "shapes", "name": "docs", "task": "interleaved", "n": 12, "weight": 1.0, "seed": 1},
    ]


def test_rows_of_a_mixture_hold_one_source_each(tok):
    with build_loader(_mixture(), tok, batch_size=4, image_size=16, num_workers=0, prefetch_factor=0, max_length=64,
                      packing=True, packing_buffer=4) as loader:
        assert loader.source_names == ["pairs", "docs"] and loader.packing
        iterator = iter(loader)
        batches = [next(iterator) for _ in range(6)]
    seen = set()
    for batch in batches:
        for r in range(4):
            real = batch["attention_mask"][r].bool()
            ids, doc_ids = batch["input_ids"][r][real], batch["document_ids"][r][real]
            images_per_doc = [int((ids[doc_ids == d] == tok.image_token_id).sum()) for d in doc_ids.unique().tolist()]
            source = loader.source_names[int(batch["source_index"][r])]
            seen.add(source)
            if source == "pairs":
                assert images_per_doc == [1] * len(images_per_doc)
            else:
                assert min(images_per_doc) >= 2
    assert seen == {"pairs", "docs"}


@pytest.mark.parametrize("num_workers, prefetch, mixture", [(0, 0, False), (2, 2, False), (0, 0, True), (2, 2, True)])
def test_loader_resumes_exactly(tok, num_workers, prefetch, mixture):
    sources = _mixture() if mixture else [{"kind": "shapes", "name": "shapes", "n": 30}]

    def make():
        return build_loader(sources, tok, batch_size=2, image_size=16, seed=3, num_workers=num_workers,
                            prefetch_factor=prefetch, max_length=64, packing=True, packing_buffer=6)

    ks, following = (0, 1, 3, 6), 6
    with make() as loader:
        iterator = iter(loader)
        batches, states = [], {0: loader.state_dict()}
        for step in range(1, max(ks) + following + 1):
            batches.append(next(iterator))
            if step in ks:
                states[step] = loader.state_dict()
    packer_states = [s for k in ks for s in _find_packer_states(states[k])]
    assert len(packer_states) == len(ks)
    assert any(s["buffered"] and s["pulled"] > len(s["buffered"]) for s in packer_states)  # mid-buffer replays
    for k in ks:
        with make() as resumed:
            resumed.load_state_dict(_roundtrip(states[k]))
            iterator = iter(resumed)
            assert_same_batches([next(iterator) for _ in range(following)], batches[k : k + following])


def test_state_saved_after_an_epoch_resumes_into_the_next_epoch(tok):
    def make():
        return build_loader([{"kind": "shapes", "n": 24}], tok, batch_size=2, image_size=16, num_workers=0,
                            prefetch_factor=0, max_length=64, packing=True, packing_buffer=5, cycle=False)

    with make() as loader:
        first = list(loader)
        state = loader.state_dict()
        second = list(loader)
    assert first and second and not torch.equal(first[0]["input_ids"], second[0]["input_ids"])
    with make() as resumed:
        resumed.load_state_dict(state)
        assert_same_batches(list(resumed), second)


def test_loader_bad_packing_arguments(tok):
    common = dict(batch_size=2, image_size=16, num_workers=0, prefetch_factor=0)
    with pytest.raises(ValueError, match="max_length"):
        build_loader([{"kind": "shapes", "n": 4}], tok, packing=True, **common)
    for bad in (0, -2, True, 1.5, "8"):
        with pytest.raises(ValueError, match="packing_buffer"):
            build_loader([{"kind": "shapes", "n": 4}], tok, max_length=32, packing=True, packing_buffer=bad, **common)
    with pytest.raises(ValueError, match="collator"):
        build_loader([{"kind": "shapes", "n": 4}], tok, max_length=32, packing=True,
                     collator=Collator(tok, image_size=16), **common)


# ---------------------------------------------------------------- config


def test_config_fields_and_train_loader(tok):
    assert DataSection().packing is True and DataSection().packing_buffer == 32
    cfg = TrainConfig()
    cfg.data.packing_buffer = 0
    with pytest.raises(ValueError, match="data.packing_buffer"):
        cfg.validate()
    with pytest.raises(ValueError, match="data.packing_buffer"):
        apply_dict(TrainConfig(), {"data": {"packing_buffer": 1.5}})
    with pytest.raises(ValueError, match="data.packing"):
        apply_dict(TrainConfig(), {"data": {"packing": "yes"}})
    cfg = TrainConfig()
    cfg.data.packing = "yes"
    with pytest.raises(ValueError, match="data.packing"):
        cfg.validate()

    cfg = apply_dict(TrainConfig(), {"data": {"sources": [{"kind": "shapes", "n": 20}], "max_length": 48,
                                              "micro_batch_size": 2, "prefetch": 0, "packing_buffer": 5}})
    cfg.validate()
    with build_train_loader(cfg, tok, 16, 0, 1) as loader:
        packers = [node for node in loader._graph() if isinstance(node, Packer)]
        assert loader.packing and [p.buffer_size for p in packers] == [5] and packers[0].max_length == 48
        batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 48) and "document_ids" in batch and batch["images"].dim() == 5
    cfg.data.packing = False
    with build_train_loader(cfg, tok, 16, 0, 1) as loader:
        batch = next(iter(loader))
    assert not loader.packing and "document_ids" not in batch and batch["images"].dim() == 6
