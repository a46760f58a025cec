"""`python -m bench --ops mllama`: Llama 3.2 Vision's text-to-image cross-attention at its image shapes.

Each image is MAX_TILES = 4 tiles of 1601 keys (ViT-H/14 at 560 px: 1600 patches + the class token), stored at
a fixed stride of 4 x 1601 keys per image; an image's aspect ratio gives it 1, 2 or 4 valid tiles, the rest are
padding. Text tokens see images by the processor's image-group rule (MediaSpans.from_image_groups). Widths are
reduced for the CPU: HEADS query heads of HEAD_DIM and KV_HEADS key/value heads (GQA 4:1 like Mllama's 32/8),
batch 1. Implementations (`impl`), on the same inputs:
  sdpa_dense  what transformers runs (MllamaTextCrossAttention with sdpa): KV heads repeated (`repeat_kv`, as
              transformers does with a mask), F.scaled_dot_product_attention with the additive float mask of
              `_prepare_cross_attention_mask` over all T x 4 x 1601 keys, rows without an image zeroed by
              `full_text_row_masked_out_mask`. The mask is built once per model forward: not timed.
  flex        torch.compile(flex_attention) with a BlockMask from the spans (fully masked blocks skipped; the block
              mask, built once per forward, is not timed). PyTorch has no FlexAttention backward on CPU.
  torch       flamingo_fast.ops.media_span_attention, backend="torch" (its planning is timed: it runs per call).
Correctness gate as for the kernels (bench/harness.py): out (and dq, dk, dv) against a float64 oracle, the
reference backend where its dense scores fit, else the torch backend in float64 (tests/test_ops_media_spans.py
holds the two together; the peers agreeing with it is an independent check). FLOPs count visible pairs only:
4 d Hq per (token, valid key of an image it sees). The torch row's note gives its speedup over each peer;
`shape.dense_over_visible` (dense-mask pairs / visible pairs) is what skipping masked work can gain at most.
Timing: the implementations of a case take turns, ROUNDS rounds, median per implementation (time_round_robin),
so that other jobs on a shared machine load them alike; the correctness call is the warm-up. Every round's time
is kept in `shape.ms_rounds`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.cases import Inputs
from bench.flops import attention_bytes, attention_flops
from bench.harness import (DTYPE_NAMES, TOLERANCE, Peaks, Row, Settings, compare, fill_rates, make_call,
                           refusal_note, synchronized)
from bench.impls import reference_score_limit
from flamingo_fast import ops

OP = "mllama"
IMPLS = ("sdpa_dense", "flex", "torch")
TOKENS_PER_TILE, MAX_TILES = 1601, 4
KEYS_PER_MEDIA = TOKENS_PER_TILE * MAX_TILES
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 64
ROUNDS = 7  # timing rounds (each implementation once per round); 3 with --quick


@dataclass(frozen=True)
class MllamaCase:
    text: int  # tokens in the row
    images: tuple[int, ...]  # positions of the <|image|> tokens
    tiles: tuple[int, ...]  # valid tiles of each image
    layout: str

    @property
    def name(self) -> str:
        return f"s{self.text} {self.layout}, tiles {'+'.join(map(str, self.tiles))}"

    @property
    def num_keys(self) -> int:
        return len(self.images) * KEYS_PER_MEDIA

    def image_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_token_mask (1, S), key_count (1, T)) as the model has them."""
        mask = torch.zeros(1, self.text, dtype=torch.bool, device=device)
        mask[0, list(self.images)] = True
        return mask, torch.tensor([self.tiles], device=device) * TOKENS_PER_TILE


# Prompts start "<|begin_of_text|><|image|>...": one image (all text sees 4 tiles), a group of two images seen
# together, a group then a later image, and four images each followed by its own text.
CASES = (
    MllamaCase(2048, (1,), (4,), "1 image"),
    MllamaCase(4096, (1, 2), (4, 2), "2-image group"),
    MllamaCase(4096, (1, 2, 2049), (1, 2, 4), "2-image group + 1 image"),
    MllamaCase(8192, (1, 2048, 4096, 6144), (4, 2, 1, 4), "4 interleaved images"),
)
QUICK_CASES = (MllamaCase(256, (1, 2, 130), (2, 1, 4), "2-image group + 1 image"),)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def build_sdpa_dense(case: MllamaCase, spans: ops.MediaSpans, dtype: torch.dtype) -> Callable:
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    token_ids = [int(i in case.images) for i in range(case.text)]
    dense = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(token_ids, 1)], [list(case.tiles)], MAX_TILES, case.text)
    mask, row_mask = _prepare_cross_attention_mask(torch.from_numpy(dense).to(spans.start.device), TOKENS_PER_TILE,
                                                   dtype)

    def fn(q, k, v):
        group = q.shape[2] // k.shape[2]
        k, v = (_bhsd(x).repeat_interleave(group, dim=1) for x in (k, v))  # repeat_kv
        out = F.scaled_dot_product_attention(_bhsd(q), k, v, attn_mask=mask)
        return (out * row_mask).transpose(1, 2)

    return fn


def build_flex(case: MllamaCase, spans: ops.MediaSpans, dtype: torch.dtype) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    start, end, count = spans.start, spans.end, spans.key_count
    key = torch.arange(case.num_keys, device=start.device)
    key_image, key_tile_pos = key // KEYS_PER_MEDIA, key % KEYS_PER_MEDIA

    def sees(b, h, q_idx, kv_idx):
        image = key_image[kv_idx]
        return (image >= start[b, q_idx]) & (image < end[b, q_idx]) & (key_tile_pos[kv_idx] < count[b, image])

    block_mask = create_block_mask(sees, 1, None, case.text, case.num_keys, device=start.device)
    torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no dynamic-shape kernel
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(_bhsd(q), _bhsd(k), _bhsd(v), block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    return fn


def build_torch(case: MllamaCase, spans: ops.MediaSpans, dtype: torch.dtype) -> Callable:
    return lambda q, k, v: ops.media_span_attention(q, k, v, spans, backend="torch")


BUILDERS = {"sdpa_dense": build_sdpa_dense, "flex": build_flex, "torch": build_torch}


def visible_pairs(spans: ops.MediaSpans) -> int:
    """Sum over tokens of the valid keys of the images each one sees (per head)."""
    keys_before = F.pad(spans.key_count.long().cumsum(1), (1, 0))
    return int((keys_before.gather(1, spans.end.long()) - keys_before.gather(1, spans.start.long())).sum())


def _oracle(case, spans, inputs, direction, dout, device) -> tuple[tuple[torch.Tensor, ...], str]:
    backend = "reference" if HEADS * case.text * case.num_keys <= reference_score_limit(device) else "torch"
    inputs64 = Inputs(*(x.double() for x in (inputs.q, inputs.k, inputs.v)))
    call = make_call(lambda q, k, v: ops.media_span_attention(q, k, v, spans, backend=backend), inputs64, direction,
                     None if dout is None else dout.double())
    return tuple(t.detach() for t in call()), f"{backend}-fp64"


def _check_impl(row: Row, build: Callable, case, spans, inputs, direction, dout, references,
                settings) -> Callable | None:
    """Build one implementation, run it once and compare with the oracle; fills the row and returns the call to
    time, or None (unavailable, failed, or refused: over tolerance)."""
    try:
        call = make_call(build(case, spans, settings.dtype), inputs, direction, dout)
        outputs = call()
    except (NotImplementedError, ImportError) as exc:  # e.g. no FlexAttention backward on CPU, no transformers
        row.status, row.note = "unavailable", f"{type(exc).__name__}: {_first_line(exc)}"
        return None
    except Exception as exc:  # a real failure: reported in its row, never fatal for the run
        row.status, row.note = "error", f"{type(exc).__name__}: {_first_line(exc)}"
        return None
    row.available, row.tolerance = True, TOLERANCE[settings.dtype]
    max_abs, rel = compare(outputs, references)
    row.max_abs_err, row.rel_err = (x if math.isfinite(x) else None for x in (max_abs, rel))
    if not rel <= row.tolerance:
        row.status, row.note = "wrong", refusal_note(row, row.oracle)
        return None
    row.status = "ok"
    return call


def time_round_robin(calls: dict[str, Callable], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each call per round, timed in turns (one call of each per round): on a machine shared with
    other jobs, load that changes over seconds then weighs on every implementation alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            synchronized(call, device)()
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _row(case: MllamaCase, impl: str, direction: str, settings: Settings, oracle: str, pairs: int) -> Row:
    dense = case.text * case.num_keys
    return Row(op=OP, case=case.name, impl=impl, direction=direction, device=settings.device_name,
               dtype=DTYPE_NAMES[settings.dtype], threads=settings.threads, seq_len=case.text, series=OP,
               oracle=oracle, gflop=attention_flops(pairs, HEADS, HEAD_DIM, direction) / 1e9,
               shape={"text": case.text, "images": list(case.images), "tiles": list(case.tiles),
                      "keys": case.num_keys, "visible_pairs": pairs, "dense_pairs": dense,
                      "dense_over_visible": round(dense / pairs, 2), "heads_q": HEADS, "heads_kv": KV_HEADS,
                      "head_dim": HEAD_DIM})


def bench_mllama(settings: Settings, quick: bool, peaks: Peaks, directions: tuple[str, ...],
                 on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Rows for each case x direction x impl; --quick: one small case, flex skipped (compiling takes 10-30 s)."""
    rows = []
    for case in QUICK_CASES if quick else CASES:
        mask, count = case.image_inputs(settings.device)
        spans = ops.MediaSpans.from_image_groups(mask, count, KEYS_PER_MEDIA)
        pairs = visible_pairs(spans)
        generator = torch.Generator().manual_seed(settings.seed)
        q, k, v = (torch.randn(1, n, h, HEAD_DIM, generator=generator).to(settings.device, settings.dtype)
                   for n, h in ((case.text, HEADS), (case.num_keys, KV_HEADS), (case.num_keys, KV_HEADS)))
        inputs = Inputs(q, k, v)
        for direction in directions:
            dout = None if direction == "fwd" else torch.randn(q.shape, generator=generator).to(q)
            references, oracle = _oracle(case, spans, inputs, direction, dout, settings.device)
            case_rows, calls = {}, {}
            for impl in IMPLS:
                row = _row(case, impl, direction, settings, oracle, pairs)
                if impl == "flex" and settings.skip_compiled:
                    row.status, row.note = "skipped", "skipped by --quick: torch.compile takes 10-30 s per graph"
                else:
                    call = _check_impl(row, BUILDERS[impl], case, spans, inputs, direction, dout, references, settings)
                    if call is not None:
                        calls[impl] = call
                case_rows[impl] = row
            nbytes = attention_bytes(q.numel(), k.numel(), HEADS * case.text, q.element_size(), direction)
            for impl, times in time_round_robin(calls, 3 if quick else ROUNDS, settings.device).items():
                row = case_rows[impl]
                row.ms, row.shape["ms_rounds"] = statistics.median(times), [round(t, 1) for t in times]
                fill_rates(row, row.gflop * 1e9, nbytes, peaks)
            if "torch" in calls:
                ours = case_rows["torch"]
                ours.note = "speedup: " + ", ".join(f"{case_rows[p].ms / ours.ms:.2f}x {p}"
                                                    for p in calls if p != "torch")
            rows += case_rows.values()
            for row in case_rows.values():
                on_row(row)
    return rows
