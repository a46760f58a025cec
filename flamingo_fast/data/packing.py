"""Sequence packing: whole encoded samples fill rows of exactly `max_length` tokens.

Flamingo's mixture mixes short image-text pairs (~10-60 tokens, one image) with interleaved documents (a few
hundred tokens, several images); padding each sample to `max_length` would waste most of a row. Here

    SkipFilter -> Packer -> Batcher(rows) -> Mapper(collate_packed)

puts several documents in one row. `Packer` keeps one bounded buffer per source (`EncodedSample.source`), so a
row holds documents of one source only; a row starts with the oldest buffered item of its source and is then
filled best-fit (the longest buffered item of that source that still fits, until none fits). A sample is
never split across rows (`Collator.encode` already truncated it to `max_length`).

Packed batch dict (B rows, S = max_length: every row is padded at its tail to exactly S tokens):
    input_ids      (B, S) long, pad_id on each row's padding tail
    attention_mask (B, S) long, 1 = real token
    labels         (B, S) long: each document's labels as `Collator.encode` made them, with -100 at every
                   document's first position (no token predicts across a document boundary; the model
                   shifts labels by one) and on padding
    positions      (B, S) long: RoPE positions, restarting at 0 at each document's first token; the padding
                   tail counts from 0 too
    document_ids   (B, S) long: 0, 1, 2, ... per document in row order; the padding tail (if any) is one more
                   document, id = number of documents in the row
    media_index    (B, S) long: index into the flat `images` of the batch of the latest `<image>` token at or
                   before this position within the same document; -1 before a document's first image and on
                   padding
    images         (N, F, C, H, W) float32: every image of the batch, in row-major document order (no padding
                   images); (0, 1, C, H, W) when the batch has none
    num_images     (B,) long: images per row
    source_index   (B,) long: index of the row's source in `DataLoader.source_names`

Attention must stay within a document: `cu_seqlens_from_document_ids` converts `document_ids` to the
FlashAttention varlen layout; a dense equivalent is `document_ids[:, :, None] == document_ids[:, None, :]`
combined with the causal mask.

Exact resume without tensors in the state: `Packer`'s state is the upstream state just before the oldest item
still buffered was pulled (the anchor), the number of items pulled since, and which of those (ordinals from the
anchor) are still buffered. `reset(state)` restores the upstream at the anchor and pulls that many items again,
keeping only the buffered ones, so the rows that follow are those of an uninterrupted run. Since every row of a
source starts with that source's oldest item, an item waits at most about `buffer_size` rows of its source, which
bounds the replay (to about `buffer_size / p` pulls for a source drawn with probability p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchdata.nodes import BaseNode

from flamingo_fast.data.collate import IGNORE_INDEX, EncodedSample

DEFAULT_PACKING_BUFFER = 32


def check_packing_buffer(buffer_size: Any, where: str = "packing_buffer") -> int:
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"{where} must be a positive int (items buffered per source), got {buffer_size!r}")
    return buffer_size


@dataclass
class _Entry:
    item: EncodedSample
    length: int
    ordinal: int  # pull count (since the last reset) at which the item was pulled
    snapshot: Optional[Dict[str, Any]]  # upstream state just before the pull; kept only while buffered


class Packer(BaseNode[List[EncodedSample]]):
    """Packs `EncodedSample`s into rows (lists of samples of one source, total length <= max_length).

    buffer_size: items buffered per source; a row is emitted from a source's buffer when it holds that many
                 (or, without cycling, once upstream is exhausted: then every buffer is flushed, the buffer
                 holding the oldest item first). Larger: fuller rows, longer replay on resume. It should be
                 several times the number of samples a row holds (max_length / typical sample length): a row is
                 emitted as soon as the buffer holds buffer_size items, so a smaller buffer leaves rows part
                 empty (10-60-token pairs into 512-token rows: padding 46% with 8, 4% with 16, 0.6% with 32).
    The rows are a pure function of the input order. See the module docstring for the algorithm and state.
    """

    SOURCE_KEY = "source"  # upstream state at the anchor
    PULLED_KEY = "pulled"  # items pulled since the anchor (the anchor's own item included)
    BUFFERED_KEY = "buffered"  # ordinals (0 = the anchor's item) of those still buffered
    EXHAUSTED_KEY = "exhausted"  # upstream raised StopIteration (flushing)

    def __init__(self, source: BaseNode, max_length: int, buffer_size: int = DEFAULT_PACKING_BUFFER):
        super().__init__()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.source = source
        self.max_length = max_length
        self.buffer_size = check_packing_buffer(buffer_size, "buffer_size")
        self._buffers: dict[Any, list[_Entry]] = {}
        self._ordinal = 0
        self._exhausted = False

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        self._buffers, self._ordinal, self._exhausted = {}, 0, False
        if initial_state is None:
            self.source.reset()
            return
        anchor = initial_state[self.SOURCE_KEY]
        pulled = int(initial_state[self.PULLED_KEY])
        keep = set(int(i) for i in initial_state[self.BUFFERED_KEY])
        self.source.reset(anchor)
        for ordinal in range(pulled):  # replay from the anchor, keeping what was still buffered
            snapshot = None
            if ordinal in keep:
                snapshot = anchor if ordinal == 0 else self.source.state_dict()
            try:
                item = next(self.source)
            except StopIteration:
                raise ValueError(f"Packer state replays {pulled} items from its anchor, but upstream ended after "
                                 f"{ordinal}: the state does not belong to this pipeline") from None
            self._ordinal += 1
            if snapshot is not None:
                self._add(item, ordinal, snapshot)
        self._exhausted = bool(initial_state[self.EXHAUSTED_KEY])

    def next(self) -> List[EncodedSample]:
        while not self._exhausted:
            snapshot = self.source.state_dict()
            try:
                item = next(self.source)
            except StopIteration:
                self._exhausted = True
                break
            ordinal, self._ordinal = self._ordinal, self._ordinal + 1
            buffer = self._add(item, ordinal, snapshot)
            if len(buffer) >= self.buffer_size:
                return self._emit(buffer)
        pending = [buffer for buffer in self._buffers.values() if buffer]
        if not pending:
            raise StopIteration()
        return self._emit(min(pending, key=lambda buffer: buffer[0].ordinal))

    def get_state(self) -> Dict[str, Any]:
        entries = [entry for buffer in self._buffers.values() for entry in buffer]
        if not entries:
            return {self.SOURCE_KEY: self.source.state_dict(), self.PULLED_KEY: 0, self.BUFFERED_KEY: [],
                    self.EXHAUSTED_KEY: self._exhausted}
        oldest = min(entries, key=lambda entry: entry.ordinal)
        return {
            self.SOURCE_KEY: oldest.snapshot,
            self.PULLED_KEY: self._ordinal - oldest.ordinal,
            self.BUFFERED_KEY: sorted(entry.ordinal - oldest.ordinal for entry in entries),
            self.EXHAUSTED_KEY: self._exhausted,
        }

    def _add(self, item: EncodedSample, ordinal: int, snapshot: Optional[Dict[str, Any]]) -> list[_Entry]:
        length = int(item.input_ids.numel())
        if length > self.max_length:
            raise ValueError(f"sample {item.id!r} has {length} tokens, more than the packing max_length "
                             f"{self.max_length}: the collator must truncate to the same max_length")
        buffer = self._buffers.setdefault(getattr(item, "source", None), [])
        buffer.append(_Entry(item, length, ordinal, snapshot))
        return buffer

    def _emit(self, buffer: list[_Entry]) -> List[EncodedSample]:
        """One row: the oldest entry, then best-fit (longest that fits; the older one on ties)."""
        first = buffer.pop(0)  # entries are appended in pull order
        row, room = [first.item], self.max_length - first.length
        while True:
            best = None
            for i, entry in enumerate(buffer):
                if entry.length <= room and (best is None or entry.length > buffer[best].length):
                    best = i
            if best is None:
                return row
            entry = buffer.pop(best)
            row.append(entry.item)
            room -= entry.length


def collate_packed(
    rows: Sequence[Sequence[EncodedSample]],
    *,
    max_length: int,
    pad_id: int,
    image_token_id: int,
    source_names: Sequence[Any],
) -> dict[str, torch.Tensor]:
    """Packed rows (from `Packer`) -> the packed batch dict of the module docstring.

    source_names: the loader's source order (`DataLoader.source_names`); each row's source must be one of them.
    """
    if len(rows) == 0:
        raise ValueError("cannot collate an empty batch")
    names = list(source_names)
    batch, seq_len = len(rows), max_length
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    positions = torch.zeros(batch, seq_len, dtype=torch.long)
    document_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    media_index = torch.full((batch, seq_len), -1, dtype=torch.long)
    num_images = torch.zeros(batch, dtype=torch.long)
    source_index = torch.zeros(batch, dtype=torch.long)
    images: list[torch.Tensor] = []
    frame_counts: set[int] = set()
    image_chw = None
    flat = 0  # images of the batch so far
    for row, docs in enumerate(rows):
        if len(docs) == 0:
            raise ValueError(f"packed row {row} is empty")
        source = docs[0].source
        if source not in names:
            raise ValueError(f"packed row {row} comes from source {source!r}, not one of the loader's sources {names}")
        source_index[row] = names.index(source)
        start, doc_id, row_images = 0, 0, 0
        for doc in docs:
            if doc.source != source:
                raise ValueError(f"packed row {row} mixes sources {source!r} and {doc.source!r}")
            length = int(doc.input_ids.numel())
            if image_chw is None:
                image_chw = tuple(doc.images.shape[2:])
            if length == 0:
                if doc.images.shape[0]:
                    raise ValueError(f"sample {doc.id!r} has no tokens but {doc.images.shape[0]} images")
                continue
            end = start + length
            if end > seq_len:
                raise ValueError(f"packed row {row} holds more than max_length={max_length} tokens")
            span = slice(start, end)
            input_ids[row, span] = doc.input_ids
            labels[row, span] = doc.labels
            labels[row, start] = IGNORE_INDEX
            attention_mask[row, span] = 1
            positions[row, span] = torch.arange(length)
            document_ids[row, span] = doc_id
            local = torch.cumsum(doc.input_ids == image_token_id, dim=0) - 1
            count = doc.images.shape[0]
            if int(local[-1]) + 1 != count:
                raise ValueError(f"sample {doc.id!r} has {int(local[-1]) + 1} <image> tokens but {count} images")
            media_index[row, span] = torch.where(local >= 0, local + flat, local)
            if count:
                frame_counts.add(int(doc.images.shape[1]))
                images.append(doc.images)
            flat += count
            row_images += count
            start, doc_id = end, doc_id + 1
        if start < seq_len:  # the padding tail: its own document, positions from 0
            positions[row, start:] = torch.arange(seq_len - start)
            document_ids[row, start:] = doc_id
        num_images[row] = row_images
    if len(frame_counts) > 1:
        raise ValueError(f"all images in a batch must have the same frame count F, got {sorted(frame_counts)}")
    if images:
        flat_images = torch.cat(images)
    else:
        flat_images = torch.zeros(0, 1, *image_chw)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "positions": positions,
        "document_ids": document_ids,
        "media_index": media_index,
        "images": flat_images,
        "num_images": num_images,
        "source_index": source_index,
    }


class PackedCollate:
    """`collate_packed` with its settings bound (a picklable callable for the pipeline's Mapper)."""

    def __init__(self, max_length: int, pad_id: int, image_token_id: int, source_names: Sequence[Any]):
        self.max_length, self.pad_id, self.image_token_id = max_length, pad_id, image_token_id
        self.source_names = list(source_names)

    def __call__(self, rows: Sequence[Sequence[EncodedSample]]) -> dict[str, torch.Tensor]:
        return collate_packed(rows, max_length=self.max_length, pad_id=self.pad_id,
                              image_token_id=self.image_token_id, source_names=self.source_names)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) (or (S,)) document ids -> (num_segments + 1,) int32 cumulative segment offsets over the flattened
    B*S tokens: the conversion of a packed batch to FlashAttention's varlen layout (`cu_seqlens_q/k`, with the
    tokens flattened to (B*S, ...)). A segment is a run of equal ids within a row; every row boundary is a
    segment boundary too, and a row's padding tail is a segment of its own. Max segment length:
    `cu_seqlens.diff().max()`.
    """
    if document_ids.dim() == 1:
        document_ids = document_ids.unsqueeze(0)
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (B, S) or (S,), got shape {tuple(document_ids.shape)}")
    batch, seq_len = document_ids.shape
    total = batch * seq_len
    if total == 0:
        return torch.zeros(1, dtype=torch.int32, device=document_ids.device)
    starts = torch.ones(batch, seq_len, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([total], dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)
