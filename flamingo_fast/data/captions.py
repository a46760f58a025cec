"""COCO Captions and Flickr30k through Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`).

Format: {"dataset": "coco", "images": [{"filepath": "val2014" (COCO only), "filename": "...jpg",
"split": "train"|"restval"|"val"|"test", "sentences": [{"raw": "A man riding a horse."}, ...],
"cocoid"/"imgid": ...}]}; images live at `image_root/filepath/filename` (or `image_root/filename`).

Samples use Flamingo's caption format `<image>Output:{caption}<|endofchunk|>` with `loss_start` after
"Output:" and `references` = all of the image's captions (for CIDEr). `per_caption=True` (default for
the train split) gives one sample per (image, caption); otherwise one sample per image (evaluation),
whose text uses the first caption.
"""

from __future__ import annotations

import os
from pathlib import Path

from flamingo_fast.data.sample import Sample, caption_text
from flamingo_fast.data.source import MapSource, read_annotation_json
from flamingo_fast.data.transforms import open_image

# Karpathy's "restval" images are the part of COCO val2014 used for training.
_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "restval": ("restval",)}


class CaptionDataset:
    """Indexable Karpathy-split caption data (COCO / Flickr30k); `__getitem__` returns a Sample."""

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str = "train",
        per_caption: bool | None = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        data = read_annotation_json(annotations)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{annotations}: expected a Karpathy split json with an 'images' list")
        self.name = str(data.get("dataset", Path(annotations).stem))
        self.image_root = Path(image_root)
        self.split = split
        self.per_caption = split == "train" if per_caption is None else per_caption
        self.images = []  # (relative path, image id, [captions])
        for number, entry in enumerate(data["images"]):
            where = f"{annotations}: images[{number}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be an object, got {entry!r:.120}")
            if entry.get("split") not in _SPLITS[split]:
                continue
            sentences = entry.get("sentences", [])
            if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
                raise ValueError(f"{where}.sentences must be a list of objects with a 'raw' caption, "
                                 f"got {sentences!r:.120}")
            captions = [s["raw"].strip() for s in sentences if isinstance(s.get("raw"), str)]
            if not captions or "filename" not in entry:
                continue
            if not isinstance(entry["filename"], str) or not isinstance(entry.get("filepath", ""), str):
                raise ValueError(f"{where}: filename and filepath must be strings, got {entry['filename']!r} and "
                                 f"{entry.get('filepath')!r}")
            relative = os.path.join(entry.get("filepath", ""), entry["filename"])
            image_id = entry.get("cocoid", entry.get("imgid", Path(entry["filename"]).stem))
            self.images.append((relative, image_id, captions))
        self._index = (
            [(i, k) for i, (_, _, caps) in enumerate(self.images) for k in range(len(caps))]
            if self.per_caption
            else [(i, 0) for i in range(len(self.images))]
        )

    def __len__(self) -> int:
        return len(self._index)

    def _image_path(self, relative: str) -> Path:
        path = self.image_root / relative
        flat = self.image_root / os.path.basename(relative)  # folders laid out without filepath
        return path if path.exists() or not flat.exists() else flat

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_index, caption_index = self._index[index]
        relative, image_id, captions = self.images[image_index]
        image = open_image(self._image_path(relative))
        text, loss_start = caption_text(captions[caption_index])
        return Sample(
            text,
            [image],
            id=f"{self.name}/{image_id}/{caption_index}" if self.per_caption else f"{self.name}/{image_id}",
            task="caption",
            references=list(captions),
            loss_start=loss_start,
            meta={"image_id": image_id, "file": relative},
        )


class CaptionSource(MapSource):
    """A CaptionDataset as a pipeline source (records are sample indices)."""

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str = "train",
        per_caption: bool | None = None,
        name: str | None = None,
        shuffle: bool = True,
    ):
        dataset = CaptionDataset(annotations, image_root, split, per_caption)
        super().__init__(dataset, name or dataset.name, shuffle)
