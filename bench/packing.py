"""`python -m bench --ops packing`: useful (non-padding) text tokens per second of training micro-batches on
packed rows, against the same documents one per row, padded.

Two length mixtures, as Flamingo's data mixes them: `pairs` (ALIGN/LTIP-like image-text pairs, 10-60 tokens,
one image first) and `m3w` (interleaved web pages, 64-512 tokens, 1-5 images at random places). Documents are
synthetic (random token ids, random images), lengths uniform in the range; rows hold MAX_LENGTH = 512 tokens.
Three ways to batch the same documents, each timed over all of them (forward, loss, backward; the trainer's
own `micro_batch_loss_sum`; no optimizer step):
  padded    one document per row, every row MAX_LENGTH tokens: one `max_length` for the whole mixture
            (static shapes, as compiled steps and OpenFlamingo's M3W loader use); the issue's baseline
  longest   one document per row, rows as long as the longest document of the micro-batch (Collator's
            default padding): the cheaper padded layout, reported alongside
  packed    flamingo_fast.data.packing (Packer + collate_packed): whole documents fill rows of MAX_LENGTH
Correctness gate: each layout's summed loss over the first documents, on a float64 copy of the model, must
equal the padded layout's (rel_err <= 1e-6: the cross-entropy itself runs in float32, train/loss.py), else
the row is refused.
Rows (op "packing", direction "fwd+bwd"): ms for all documents, tokens_per_s = real text tokens / s,
speedup_vs_best_peer against the fastest other layout (as for every op), the note the ratios to both padded
layouts, and in `shape` the padding fraction of each layout. Model: the demo preset (CPU); on CUDA also the 3b widths at 8 LM layers, bf16 autocast.
"""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Callable

import torch
from torchdata.nodes import Batcher, IterableWrapper

from bench.harness import Row, Settings, time_cpu
from flamingo_fast.data.collate import IGNORE_INDEX, EncodedSample, pad_batch
from flamingo_fast.data.packing import Packer, collate_packed

OP = "packing"
MAX_LENGTH = 512
# mixture -> (tokens low, high), (images low, high), documents (CPU, CUDA), documents per padded micro-batch
MIXTURES = {
    "pairs": ((10, 60), (1, 1), (256, 512), 32),
    "m3w": ((64, 512), (1, 5), (96, 96), 8),
}
LAYOUTS = ("padded", "longest", "packed")
MODELS = {"demo": ("demo", {}), "3b-shape": ("3b", {"lm": {"layers": 8}})}


def make_documents(mixture: str, count: int, cfg, seed: int) -> list[EncodedSample]:
    """Synthetic documents of the mixture: bos, text, `<image>` tokens; labels as Collator.encode makes them
    (ignored up to and including the first image, and at every `<image>`)."""
    (low, high), (fewest, most), _, _ = MIXTURES[mixture]
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    size, image = cfg.vision.image_size, cfg.image_token_id
    documents = []
    for _ in range(count):
        length = rng.randint(low, high)
        ids = torch.randint(3, cfg.lm.vocab_size, (length,), generator=generator)
        ids[0] = 1  # bos
        count_images = rng.randint(fewest, most)
        places = [1] if mixture == "pairs" else sorted(rng.sample(range(1, length), count_images))
        ids[places] = image
        labels = ids.clone()
        labels[: places[0] + 1] = IGNORE_INDEX
        labels[ids == image] = IGNORE_INDEX
        images = torch.randn(len(places), 1, cfg.vision.channels, size, size, generator=generator)
        documents.append(EncodedSample(ids, labels, images, source=mixture))
    return documents


def packed_batches(documents: list[EncodedSample], rows_per_batch: int, pad_id: int, image_token_id: int,
                   mixture: str) -> list[dict]:
    """The pipeline's own packing (Packer, default buffer) and collation over these documents."""
    rows = Batcher(Packer(IterableWrapper(documents), MAX_LENGTH), batch_size=rows_per_batch, drop_last=False)
    return [collate_packed(batch, max_length=MAX_LENGTH, pad_id=pad_id, image_token_id=image_token_id,
                           source_names=[mixture]) for batch in rows]


def batches_of(layout: str, documents: list[EncodedSample], per_batch: int, cfg, mixture: str) -> list[dict]:
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if layout == "packed":  # as many row tokens per micro-batch as the padded layout's
        return packed_batches(documents, per_batch, pad_id, cfg.image_token_id, mixture)
    seq_len = MAX_LENGTH if layout == "padded" else None
    return [pad_batch(documents[i:i + per_batch], pad_id, cfg.image_token_id, seq_len=seq_len)
            for i in range(0, len(documents), per_batch)]


def padding_fraction(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / sum(b["input_ids"].numel() for b in batches)


def _runner(model, batches: list[dict], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    from train.loss import micro_batch_loss_sum

    cfg = model.cfg
    moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
    autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())

    def run() -> None:
        for batch in moved:
            with autocast:
                loss = micro_batch_loss_sum(model, batch, cfg.image_token_id, cfg.pad_token_id)
            loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def loss_sum(model64, batches: list[dict], device: torch.device) -> float:
    """The summed token loss over all micro-batches on a float64 copy of the model (the layouts' common answer)."""
    from train.loss import micro_batch_loss_sum

    total = 0.0
    with torch.no_grad():
        for batch in batches:
            batch = {k: (v.double() if v.is_floating_point() else v).to(device) for k, v in batch.items()}
            total += micro_batch_loss_sum(model64, batch, model64.cfg.image_token_id, model64.cfg.pad_token_id).item()
    return total


def bench_packing(settings: Settings, quick: bool, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Rows for each mixture x layout (x model on CUDA); --quick: fewer documents, pairs only."""
    from bench.e2e import build_model
    from flamingo_fast import FlamingoConfig

    models = ("demo",) if settings.device.type != "cuda" else tuple(MODELS)
    mixtures = ("pairs",) if quick else tuple(MIXTURES)
    rows = []
    for name in models:
        preset, overrides = MODELS[name]
        cfg = FlamingoConfig.from_preset(preset, **overrides)
        if cfg.lm.max_seq_len < MAX_LENGTH:
            cfg = cfg.replace(lm={"max_seq_len": MAX_LENGTH})
        model = build_model(cfg, settings.device, settings.seed)
        model.set_trainable("flamingo")
        model64 = copy.deepcopy(model).double()
        for mixture in mixtures:
            cpu_count, gpu_count = MIXTURES[mixture][2]
            count = (gpu_count if settings.device.type == "cuda" else cpu_count) // (8 if quick else 1)
            per_batch = MIXTURES[mixture][3]
            documents = make_documents(mixture, count, cfg, settings.seed)
            useful = sum(d.input_ids.numel() for d in documents)
            layouts = {layout: batches_of(layout, documents, per_batch, cfg, mixture) for layout in LAYOUTS}
            fractions = {layout: padding_fraction(b) for layout, b in layouts.items()}
            # The float64 check runs on a prefix (a few micro-batches' documents) to keep the bench short.
            check_docs = documents[: 2 * per_batch]
            want = loss_sum(model64, batches_of("padded", check_docs, per_batch, cfg, mixture), settings.device)
            timed = {}
            for layout, batches in layouts.items():
                row = Row(op=OP, case=f"{name} {mixture} x{count} docs, rows of {MAX_LENGTH}", impl=layout,
                          direction="fwd+bwd", device=settings.device_name, threads=settings.threads,
                          dtype="fp32" if settings.device.type != "cuda" else str(settings.dtype).removeprefix("torch."),
                          seq_len=MAX_LENGTH, series=mixture,
                          shape={"model": name, "mixture": mixture, "documents": count, "useful_tokens": useful,
                                 "micro_batches": len(batches), "rows": sum(b["input_ids"].shape[0] for b in batches),
                                 "padding_fraction": round(fractions[layout], 4),
                                 "padding_fraction_padded": round(fractions["padded"], 4)})
                got = loss_sum(model64, batches_of(layout, check_docs, per_batch, cfg, mixture), settings.device)
                row.rel_err, row.tolerance = abs(got - want) / abs(want), 1e-6
                if row.rel_err > row.tolerance:
                    row.status, row.note = "wrong", f"summed float64 loss {got} != padded layout's {want}"
                    rows.append(row)
                    on_row(row)
                    continue
                dtype = settings.dtype if settings.device.type == "cuda" else torch.float32
                repeats = 1 if quick else 3  # after one warm-up pass; each pass runs every micro-batch
                row.ms = time_cpu(_runner(model, batches, settings.device, dtype), 0.0, min_reps=repeats,
                                  max_reps=repeats)
                row.tokens_per_s = useful / (row.ms / 1e3)
                row.available, row.status, row.oracle = True, "ok", "tests/test_packing_equivalence.py (float64)"
                timed[layout] = row
                rows.append(row)
            if len(timed) < len(LAYOUTS):
                continue
            packed = timed["packed"]  # fill_best_peer compares it with the faster padded layout; both ratios here
            packed.note = (f"useful tokens/s {packed.tokens_per_s / timed['padded'].tokens_per_s:.2f}x padded, "
                           f"{packed.tokens_per_s / timed['longest'].tokens_per_s:.2f}x longest; padding "
                           f"{fractions['packed']:.1%} packed, {fractions['padded']:.1%} padded, "
                           f"{fractions['longest']:.1%} longest")
            for row in timed.values():
                on_row(row)
    return rows
