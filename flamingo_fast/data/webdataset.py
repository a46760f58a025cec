"""WebDataset-style tar shards: image-text pairs and MMC4-like interleaved documents.

Shard layout (plain tar, or tar.gz / tar.bz2 / tar.xz), read sequentially with `tarfile` streaming.
Members are grouped into records by key: the member path up to the first "." of its file name
(WebDataset's rule), so `doc7.json`, `doc7.0.jpg`, `doc7.1.jpg` form record "doc7" with fields "json",
"0.jpg", "1.jpg". Members of one record must be adjacent.

Record kinds:
- pair: an image field (`jpg`, `jpeg`, `png` or `webp`) plus a caption from `txt` or from `json`'s
  "caption" (or "text") field -> `<image>{caption}<|endofchunk|>` (pre-training style, no prompt).
- interleaved (MMC4): `json` with `text_list` (list of sentences) and `image_info`, a list of
  `{"image_name": ..., "matched_text_index": j}`. Image i of `image_info` is the member
  `{key}.{i}.{jpg|jpeg|png|webp}`, or inline as base64 in an `image_base64` field of the entry
  (OpenFlamingo's MMC4 shards). Each image goes before its matched sentence; text is built as in
  OpenFlamingo: `... sentence<|endofchunk|><image>matched sentence ... last sentence<|endofchunk|>`.

Bad data never stops the stream: a missing shard, a shard that is not a tar, or a truncated archive
(including one that just ends without tar's end-of-archive block) yields a `Skipped` marker and moves
on to the next shard (the partly read record at the cut is dropped). Undecodable images and malformed
records raise `BadSampleError` from `decode`, which the pipeline turns into `Skipped` markers.

Sharding: with at least `world_size` shards, rank r reads every world_size-th shard of the epoch's
shard order; with fewer shards every rank reads all shards and keeps every world_size-th record.
Shard order is reshuffled each epoch with (seed, epoch); records within a shard keep their order.
Pipeline state is (epoch, shard cursor, records consumed in that shard): resuming re-opens the shard
and skips the consumed records.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import glob
import gzip
import json
import lzma
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from torchdata.nodes import BaseNode

from flamingo_fast.data.sample import EOC_TOKEN, IMAGE_TOKEN, BadSampleError, Sample
from flamingo_fast.data.skipping import Skipped
from flamingo_fast.data.source import Source, check_rank
from flamingo_fast.data.transforms import decode_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512  # tar block size
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a list, a directory (its *.tar* files), a glob, or a brace range
    "data/shard-{000..099}.tar" (zero padding follows the first bound)."""
    if isinstance(shards, (list, tuple)):
        out = [p for s in shards for p in expand_shards(s)]
    else:
        spec = str(shards)
        match = _BRACES.search(spec)
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo)
            out = [
                p
                for i in range(int(lo), int(hi) + 1)
                for p in expand_shards(spec[: match.start()] + str(i).zfill(width) + spec[match.end() :])
            ]
        elif os.path.isdir(spec):
            out = sorted(str(p) for p in Path(spec).iterdir() if ".tar" in p.name)
        elif any(c in spec for c in "*?["):
            out = sorted(glob.glob(spec))
        else:
            out = [spec]
    return out


class _TailReader:
    """File-like wrapper remembering the last few chunks read, so the block where tarfile stopped can be
    inspected afterwards (tarfile silently ends at a truncated header instead of raising)."""

    def __init__(self, raw):
        self.raw = raw
        self.position = 0
        self.chunks: list[tuple[int, bytes]] = []

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.chunks = self.chunks[-2:] + [(self.position, data)]
            self.position += len(data)
        return data

    def block_at(self, offset: int) -> bytes:
        """The (up to) 512 bytes at `offset` (at most 3 reads back), reading ahead if needed."""
        while self.position < offset + _BLOCK and self.read(_BLOCK):
            pass
        start = self.chunks[0][0] if self.chunks else self.position
        if offset < start:
            raise RuntimeError(f"tar offset {offset} is no longer buffered (oldest kept byte {start})")
        data = b"".join(chunk for _, chunk in self.chunks)
        return data[offset - start : offset - start + _BLOCK]


def _open_decompressed(path: str):
    raw = open(path, "rb")
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb"), raw
    if magic.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(raw, mode="rb"), raw
    return raw, raw


def _split_key(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (extension if dot else "")


def read_shard(path: str, source: str = "") -> Iterator[dict | Skipped]:
    """Records (dicts: "__key__", "__url__" and one bytes field per member extension) of one shard,
    then, if the shard is broken, a Skipped marker (and nothing more from it)."""
    record: dict | None = None
    try:
        stream, raw = _open_decompressed(path)
    except OSError as error:
        yield Skipped("missing_shard", f"{path}: {error.strerror or error}", source)
        return
    try:
        reader = _TailReader(stream)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|")
        except EOFError as error:  # the compressed stream ends before the first tar header is complete
            yield Skipped("truncated_tar", f"{path}: {type(error).__name__}: {error}", source)
            return
        except (tarfile.TarError, OSError, zlib.error, lzma.LZMAError) as error:
            yield Skipped("corrupt_tar", f"{path}: {type(error).__name__}: {error}", source)
            return
        try:
            for member in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if not member.isfile():
                    continue
                key, extension = _split_key(member.name.removeprefix("./"))
                if record is not None and record["__key__"] != key:
                    yield record  # complete: a new key started (before reading data that may be cut)
                    record = None
                if record is None:
                    record = {"__key__": key, "__url__": path}
                data = tar.extractfile(member).read()
                if extension:
                    record[extension] = data
            end_block = reader.block_at(tar.offset)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
            yield Skipped("truncated_tar", f"{path}: {type(error).__name__}: {error}", source)
            return
        if len(end_block) < _BLOCK or end_block.count(0) != _BLOCK:
            # tarfile stops quietly at a short or invalid header: the archive was cut or damaged there,
            # so the record being assembled may be missing members and is dropped.
            yield Skipped("truncated_tar", f"{path}: archive ends without an end-of-archive block at byte {tar.offset}", source)
            return
        if record is not None:
            yield record
    finally:
        raw.close()


def _image_field(record: dict, prefix: str = "") -> str | None:
    for extension in IMAGE_EXTENSIONS:
        if prefix + extension in record:
            return prefix + extension
    return None


def _load_json(record: dict, key: str) -> Any:
    try:
        return json.loads(record["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError("bad_record", f"{key}: json field is not valid JSON ({error})") from None


def _interleaved_sample(record: dict, doc: dict, key: str) -> Sample:
    text_list, image_info = doc.get("text_list"), doc.get("image_info", [])
    if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
        raise BadSampleError("bad_record", f"{key}: text_list must be a list of strings")
    if not isinstance(image_info, list):
        raise BadSampleError("bad_record", f"{key}: image_info must be a list")
    placed = []  # (matched_text_index, order, image)
    for i, info in enumerate(image_info):
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(text_list):
            raise BadSampleError("bad_record", f"{key}: image_info[{i}] needs matched_text_index in [0, {len(text_list)})")
        field = _image_field(record, f"{i}.")
        if field is not None:
            data = record[field]
        elif isinstance(info.get("image_base64"), str):
            try:
                data = base64.b64decode(info["image_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise BadSampleError("corrupt_image", f"{key}: image_info[{i}].image_base64 is not base64") from None
        else:
            raise BadSampleError("missing_image", f"{key}: no member {key}.{i}.<ext> or image_base64 for image {i}")
        placed.append((index, i, decode_image(data, f"{key}.{i}")))
    placed.sort(key=lambda p: (p[0], p[1]))
    sentences = list(text_list)
    for index in sorted({p[0] for p in placed}):
        count = sum(1 for p in placed if p[0] == index)
        sentences[index] = f"{EOC_TOKEN}{IMAGE_TOKEN}" * count + sentences[index]
    text = " ".join(sentences)
    # As OpenFlamingo: no chunk ends before the first image; no spaces around the markers.
    text = text.replace(EOC_TOKEN, "", 1)
    text = text.replace(f" {EOC_TOKEN}", EOC_TOKEN).replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN).replace(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    images = [p[2] for p in placed]
    return Sample(f"{text}{EOC_TOKEN}", images, id=key, task="interleaved", meta={"url": record.get("__url__")})


def record_to_sample(record: dict) -> Sample:
    """Decode one grouped tar record (see module docstring) into a Sample; raises BadSampleError."""
    key = record.get("__key__", "?")
    doc = _load_json(record, key) if "json" in record else None
    if isinstance(doc, dict) and "text_list" in doc:
        return _interleaved_sample(record, doc, key)
    field = _image_field(record)
    if field is None:
        raise BadSampleError("bad_record", f"{key}: no image member ({'/'.join(IMAGE_EXTENSIONS)}) and no text_list json")
    if "txt" in record:
        try:
            caption = record["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSampleError("bad_record", f"{key}: txt is not UTF-8") from None
    elif isinstance(doc, dict) and isinstance(doc.get("caption", doc.get("text")), str):
        caption = doc.get("caption", doc.get("text"))
    else:
        raise BadSampleError("bad_record", f"{key}: no caption (txt member or json 'caption' field)")
    image = decode_image(record[field], f"{key}.{field}")
    return Sample(f"{IMAGE_TOKEN}{caption.strip()}{EOC_TOKEN}", [image], id=key, meta={"url": record.get("__url__")})


class TarShardNode(BaseNode):
    """Streams records of this rank's shards (see module docstring for sharding and state)."""

    EPOCH_KEY, CURSOR_KEY, CONSUMED_KEY = "epoch", "shard_cursor", "consumed_in_shard"

    def __init__(self, shards: Sequence[str], rank: int, world_size: int, seed: int, shuffle: bool, source: str):
        super().__init__()
        check_rank(rank, world_size)
        self.shards, self.rank, self.world_size = list(shards), rank, world_size
        self.seed, self.shuffle, self.source = seed, shuffle, source
        self.per_shard = len(self.shards) >= world_size  # else: every rank reads all shards, strides records
        self.epoch, self._started = 0, False
        self._stream: Iterator | None = None

    def _epoch_shards(self) -> list[str]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        shards = [self.shards[i] for i in order]
        return shards[self.rank :: self.world_size] if self.per_shard else shards

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch = initial_state[self.EPOCH_KEY]
            self._cursor = initial_state[self.CURSOR_KEY]
            self._consumed = initial_state[self.CONSUMED_KEY]
        else:
            if self._started:
                self.epoch += 1
            self._cursor, self._consumed = 0, 0
        self._started = False
        self._order = self._epoch_shards()
        self._stream = None

    def _open(self) -> Iterator:
        stream = read_shard(self._order[self._cursor], self.source)
        for _ in range(self._consumed):  # resume: replay what this shard already gave
            next(stream)
        return stream

    def next(self):
        self._started = True
        while self._cursor < len(self._order):
            if self._stream is None:
                self._stream = self._open()
            try:
                item = next(self._stream)
            except StopIteration:
                self._cursor, self._consumed, self._stream = self._cursor + 1, 0, None
                continue
            self._consumed += 1
            if self.per_shard or (self._consumed - 1) % self.world_size == self.rank:
                return item
        raise StopIteration()

    def get_state(self) -> Dict[str, Any]:
        return {self.EPOCH_KEY: self.epoch, self.CURSOR_KEY: self._cursor, self.CONSUMED_KEY: self._consumed}


class TarShardSource(Source):
    """Tar shards as a pipeline source (records: grouped member dicts; decode: `record_to_sample`)."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], name: str = "webdataset", shuffle: bool = True):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no tar shards found for {shards!r}")
        self.name, self.shuffle = name, shuffle

    def records(self, rank: int = 0, world_size: int = 1, seed: int = 0) -> BaseNode:
        return TarShardNode(self.shards, rank, world_size, seed, self.shuffle, self.name)

    def decode(self, record: dict) -> Sample:
        return record_to_sample(record)
