"""Tiny on-disk fixtures in each data format, built with Pillow / tarfile / json (for tests/test_data_*.py)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]


def image_bytes(colour=(255, 0, 0), size=(40, 30), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT_IMAGE = b"\xff\xd8\xff\xe0 this is not really a jpeg"


def write_tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def truncate_in_member(path: Path, out: Path, member_name: str) -> Path:
    """Copy the archive at `path` to `out`, cut 10 bytes into the data of `member_name`."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member_name).offset_data
    out.write_bytes(path.read_bytes()[: offset + 10])
    return out


def pair_members(keys: list[str], caption_kind: str = "txt") -> list[tuple[str, bytes]]:
    members = []
    for i, key in enumerate(keys):
        members.append((f"{key}.jpg", image_bytes(COLOURS[i % len(COLOURS)])))
        caption = f"caption of {key}"
        if caption_kind == "txt":
            members.append((f"{key}.txt", caption.encode()))
        else:
            members.append((f"{key}.json", json.dumps({"caption": caption}).encode()))
    return members


def interleaved_members(key: str, inline_second: bool = False) -> list[tuple[str, bytes]]:
    """An MMC4-like document: 3 sentences, images matched to sentences 0 and 2 (second one optionally base64)."""
    doc = {
        "text_list": ["First sentence.", "Middle sentence.", "Last sentence."],
        "image_info": [
            {"image_name": "a.jpg", "matched_text_index": 2},
            {"image_name": "b.jpg", "matched_text_index": 0},
        ],
    }
    members = [(f"{key}.0.jpg", image_bytes((255, 0, 0)))]
    if inline_second:
        doc["image_info"][1]["image_base64"] = base64.b64encode(image_bytes((0, 0, 255))).decode()
    else:
        members.append((f"{key}.1.png", image_bytes((0, 0, 255), fmt="PNG")))
    return [(f"{key}.json", json.dumps(doc).encode())] + members


def make_karpathy(root: Path, dataset: str = "coco") -> tuple[Path, Path]:
    """A Karpathy split json (2 train + 1 restval + 1 val + 1 test image) and its image folder."""
    image_root = root / f"{dataset}_images"
    images = []
    for i, split in enumerate(["train", "train", "restval", "val", "test"]):
        filename = f"COCO_val2014_{i:012d}.jpg" if dataset == "coco" else f"{1000 + i}.jpg"
        entry = {
            "filename": filename,
            "split": split,
            "sentences": [{"raw": f"Image {i} caption {k}.", "tokens": []} for k in range(2 + i % 2)],
            "imgid": i,
        }
        folder = image_root
        if dataset == "coco":
            entry["filepath"] = "val2014"
            entry["cocoid"] = 100 + i
            folder = image_root / "val2014"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_bytes(image_bytes(COLOURS[i]))
        images.append(entry)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path, image_root


def make_vqav2(root: Path, subtype: str = "val2014") -> tuple[Path, Path, Path]:
    """VQAv2 questions + annotations json for 2 images x 2 questions, and the COCO image folder."""
    image_root = root / subtype
    image_root.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for image_id in (42, 7):
        (image_root / f"COCO_{subtype}_{image_id:012d}.jpg").write_bytes(image_bytes(COLOURS[image_id % 7]))
        for k, (question, answer) in enumerate([("What colour is it?", "red"), ("Is it square?", "yes")]):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            answers = [{"answer": answer if j < 8 else "no idea", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "multiple_choice_answer": answer,
                    "answers": answers,
                    "answer_type": "other",
                    "question_type": "what",
                }
            )
    q_path, a_path = root / "questions.json", root / "annotations.json"
    q_path.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    a_path.write_text(json.dumps({"annotations": annotations}))
    return q_path, a_path, image_root


def llama_style_tokenizer_json(folder: Path, name: str = "tokenizer.json") -> tuple[Path, int]:
    """A tiny BPE tokenizer in Llama's style (<unk>=0, <s>=1, </s>=2, metaspace, byte fallback, bos template)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "a red circle left of a blue square", "Output: Question"]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = folder / name
    tok.save(str(path))
    return path, tok.get_vocab_size()


def assert_same_batches(a, b) -> None:
    """Two lists of batch dicts are equal, key for key and bit for bit (exact-resume checks)."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
