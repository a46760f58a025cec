"""Held-out evaluation: greedy decoding with the LM's KV cache, caption exact-match and VQA accuracy.

Prompts are the samples' evaluation prompts (`Sample.prompt`, e.g. "<image>Output:" or
"<image>Question:what colour is the star? Short answer:"). The LM has no padding mask, so prompts are
batched by (token length, image count) instead of being padded. Decoding stops at `<|endofchunk|>` or eos.

Works on an FSDP-sharded model (without the KV cache, see greedy_generate): every rank decodes its share of the samples, and the ranks run the same
number of forward calls (short ranks repeat a batch and drop its output; decoding continues until every
rank is done) because each FSDP forward is a collective.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from flamingo_fast.data.collate import Collator
from flamingo_fast.data.sample import Sample
from flamingo_fast.data.tokenizer import Tokenizer

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                             "nine", "ten"])}


def normalize_answer(text: str) -> str:
    """VQAv2-style answer normalisation: lowercase, punctuation removed, articles dropped, number words
    as digits, single spaces."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the (usually 10) human answers: the mean over the
    leave-one-out subsets of min(1, matches / 3)."""
    if not answers:
        raise ValueError("answers must hold at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(gt == pred for gt in others) / 3.0))
    return sum(scores) / len(scores)


def caption_exact_match(prediction: str, references: Sequence[str]) -> float:
    norm = " ".join(prediction.lower().split())
    return float(any(norm == " ".join(r.lower().split()) for r in references))


@dataclass
class EvalResult:
    caption_exact_match: float | None = None
    vqa_accuracy: float | None = None
    num_caption: int = 0
    num_vqa: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # this rank's decoded samples

    def metrics(self) -> dict[str, Any]:
        return {"caption_exact_match": self.caption_exact_match, "vqa_accuracy": self.vqa_accuracy,
                "num_caption": self.num_caption, "num_vqa": self.num_vqa}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    if _dist()[1] > 1:
        dist.all_reduce(value, op=op)
    return value


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                    tokenizer: Tokenizer, max_new_tokens: int, device: torch.device, dtype: torch.dtype,
                    use_cache: bool = True) -> list[list[list[int]]]:
    """For each (input_ids (B, L), images (B, T, F, C, H, W) or None) batch, the generated ids per row
    (without the stop token). Every rank must call this with the same number of batches.

    use_cache: decode with the model's KV cache (one new token per forward). An FSDP-sharded model must
    not: the cache path computes the media keys/values by calling the xattn layers' projections outside
    their forward, where FSDP has not gathered the weights; it re-runs the whole sequence instead."""
    stop_ids = torch.tensor([tokenizer.eoc_token_id, tokenizer.eos_id], device=device)
    results = []
    for input_ids, images in batches:
        input_ids = input_ids.to(device)
        images = None if images is None else images.to(device)
        rows = input_ids.shape[0]
        if use_cache:
            cache = model.new_cache(rows, input_ids.shape[1] + max_new_tokens, dtype=dtype, device=device)
            logits = model(input_ids, images, cache=cache).logits[:, -1]
        else:
            logits = model(input_ids, images).logits[:, -1]
        generated = torch.empty(rows, 0, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            # `<image>` is never a valid continuation (there is no image to go with it).
            logits[:, tokenizer.image_token_id] = float("-inf")
            token = logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, tokenizer.pad_id), token)
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= torch.isin(token, stop_ids)
            all_done = _all_reduce(done.all().to(torch.int32).reshape(1), dist.ReduceOp.MIN)
            if bool(all_done.item()) or generated.shape[1] == max_new_tokens:
                break
            if use_cache:
                logits = model(token[:, None], cache=cache).logits[:, -1]
            else:
                logits = model(torch.cat([input_ids, generated], dim=1), images).logits[:, -1]
        out = []
        for row in generated.tolist():
            stops = [i for i, t in enumerate(row) if t in (tokenizer.eoc_token_id, tokenizer.eos_id)]
            out.append(row[: stops[0]] if stops else row)
        results.append(out)
    return results


def _prompt_batches(samples: Sequence[Sample], collator: Collator, batch_size: int):
    """Group samples by (prompt token length, image count); returns [(indices, input_ids, images)]."""
    tok = collator.tokenizer
    groups: dict[tuple[int, int], list[tuple[int, list[int], torch.Tensor | None]]] = {}
    for index, sample in enumerate(samples):
        ids = [tok.bos_id] + tok.encode(sample.prompt)
        n_images = sum(1 for t in ids if t == tok.image_token_id)
        if n_images != len(sample.images):
            raise ValueError(f"sample {sample.id!r}: prompt has {n_images} <image> tokens for {len(sample.images)} images")
        images = torch.stack([collator.transform(image) for image in sample.images]) if sample.images else None
        groups.setdefault((len(ids), n_images), []).append((index, ids, images))
    batches = []
    for _, items in sorted(groups.items()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids = torch.tensor([c[1] for c in chunk], dtype=torch.long)
            images = torch.stack([c[2] for c in chunk]) if chunk[0][2] is not None else None
            batches.append(([c[0] for c in chunk], ids, images))
    return batches


def evaluate(model: torch.nn.Module, samples: Sequence[Sample], collator: Collator, *, batch_size: int = 64,
             max_new_tokens: int = 24, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
             use_cache: bool = True) -> EvalResult:
    """Decode `samples` (this rank's share is taken by striding) and score them; every rank must call
    this with the same `samples`. Scores are reduced over ranks."""
    rank, world = _dist()
    device = device or torch.device("cpu")
    mine = list(samples)[rank::world]
    batches = _prompt_batches(mine, collator, batch_size)
    count = _all_reduce(torch.tensor([len(batches)], device=device), dist.ReduceOp.MAX)
    padded = batches + [batches[-1]] * (int(count.item()) - len(batches)) if batches else []
    if not padded and int(count.item()) > 0:
        raise ValueError("every rank needs at least one evaluation sample; use more samples than ranks")
    was_training = model.training
    model.eval()
    try:
        outputs = greedy_generate(model, [(ids, images) for _, ids, images in padded], collator.tokenizer,
                                  max_new_tokens, device, dtype, use_cache)
    finally:
        model.train(was_training)

    tok = collator.tokenizer
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # caption hits, captions, vqa score, questions
    examples = []
    for (indices, _, _), rows in zip(batches, outputs):
        for index, ids in zip(indices, rows):
            sample = mine[index]
            prediction = tok.decode(ids).strip()
            example = {"id": sample.id, "task": sample.task, "prompt": sample.prompt, "prediction": prediction}
            if sample.task == "caption" and sample.references:
                score = caption_exact_match(prediction, sample.references)
                sums[0] += score
                sums[1] += 1
                example.update(reference=sample.references[0], correct=bool(score))
            elif sample.answers:
                score = vqa_accuracy(prediction, sample.answers)
                sums[2] += score
                sums[3] += 1
                example.update(reference=sample.answers[0], correct=score >= 1.0)
            examples.append(example)
    _all_reduce(sums, dist.ReduceOp.SUM)
    cap_hits, caps, vqa_score, questions = sums.tolist()
    return EvalResult(
        caption_exact_match=cap_hits / caps if caps else None,
        vqa_accuracy=vqa_score / questions if questions else None,
        num_caption=int(caps),
        num_vqa=int(questions),
        examples=examples,
    )
