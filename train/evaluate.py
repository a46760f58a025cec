"""Held-out evaluation: zero-shot greedy decoding, scored with flamingo_fast.eval's metrics.

Prompts are the samples' evaluation prompts (`Sample.prompt`: "<image>Output:" for captions,
"<image>Question:{q} Short answer:" for VQA), tokenised and left-padded as `flamingo_fast.eval` does
(`prompt_batch`). Decoding stops at `<|endofchunk|>` or eos. Predictions are cleaned and scored as
`flamingo-fast eval` scores them (`clean_prediction`; `exact_match` for captions: the first reference up
to case and spacing; `vqa_accuracy` with the official VQAv2 normalisation), here as fractions in [0, 1].

One process (use_cache=True): the package's `generate_text` (LM KV cache, media K/V computed once).
An FSDP-sharded model (use_cache=False) cannot use it: it computes the media keys/values outside the xattn
layers' forward, where FSDP has not gathered the weights, and it stops when its own rows are done, while
each FSDP forward is a collective. So `greedy_generate` re-runs the whole left-padded sequence every step,
every rank decodes its share of the samples, and the ranks run the same number of forward calls (short
ranks repeat a batch and drop its output; decoding continues until every rank is done).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from flamingo_fast.data.collate import Collator
from flamingo_fast.data.sample import Sample
from flamingo_fast.data.tokenizer import Tokenizer
from flamingo_fast.eval.fewshot import TASKS, clean_prediction, exact_match
from flamingo_fast.eval.text_generation import generate_text, never_generated, prompt_batch
from flamingo_fast.eval.vqa import vqa_accuracy
from flamingo_fast.models.generate import suppress_tokens

# How each scored kind of sample is cleaned (clean_prediction reads only the task's kind).
_CLEANING = {"caption": TASKS["shapes_caption"], "vqa": TASKS["shapes_vqa"]}


@dataclass
class EvalResult:
    caption_exact_match: float | None = None
    vqa_accuracy: float | None = None
    num_caption: int = 0
    num_vqa: int = 0
    # VQA accuracy and count per question type (the samples' meta["question_type"], e.g. shapes' "colour")
    vqa_by_type: dict[str, dict[str, float | int]] = field(default_factory=dict)  # {"accuracy": ..., "count": ...}
    examples: list[dict[str, Any]] = field(default_factory=list)  # this rank's decoded samples

    def metrics(self) -> dict[str, Any]:
        return {"caption_exact_match": self.caption_exact_match, "vqa_accuracy": self.vqa_accuracy,
                "num_caption": self.num_caption, "num_vqa": self.num_vqa, "vqa_by_type": self.vqa_by_type}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    if _dist()[1] > 1:
        dist.all_reduce(value, op=op)
    return value


def _merge_by_type(parts: Sequence[dict[str, tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    """Sum {question type: (score sum, count)} dicts."""
    merged: dict[str, tuple[float, int]] = {}
    for part in parts:
        for key, (score, count) in part.items():
            total_score, total_count = merged.get(key, (0.0, 0))
            merged[key] = (total_score + score, total_count + count)
    return merged


def score_example(sample: Sample, text: str) -> dict[str, Any]:
    """One decoded sample as an example record: the cleaned prediction and, for a caption with references
    or a sample with answers, its "kind", "score", first "reference" and whether it is fully "correct"."""
    kind = "caption" if sample.task == "caption" and sample.references else ("vqa" if sample.answers else None)
    example = {"id": sample.id, "task": sample.task, "prompt": sample.prompt, "prediction": text.strip()}
    if kind is None:
        return example
    prediction = clean_prediction(text, _CLEANING[kind])
    truths = sample.references if kind == "caption" else sample.answers
    score = exact_match(prediction, truths) if kind == "caption" else vqa_accuracy(prediction, truths)
    example.update(prediction=prediction, kind=kind, score=score, reference=truths[0], correct=score >= 1.0)
    return example


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward that no backward follows (the root has
    reshard_after_forward=False, train/parallel.py): free them, so the model's parameters are the sharded ones
    the optimizer holds again (else the next checkpoint cannot map its optimizer state to parameter names)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
                    tokenizer: Tokenizer, max_new_tokens: int, device: torch.device) -> list[list[list[int]]]:
    """Cache-free greedy decoding in step with the other ranks (module docstring): for each left-padded
    (input_ids (B, L), attention_mask (B, L), media keyword arguments: `prompt_batch`'s) batch, the generated
    ids per row without the stop token. Every rank must call this with the same number of batches."""
    stops = [tokenizer.eoc_token_id, tokenizer.eos_id]
    never = [tokenizer.image_token_id, *never_generated(tokenizer, stops)]
    stop_ids = torch.tensor(stops, device=device)
    results = []
    for input_ids, attention_mask, media in batches:
        ids, padding = input_ids.to(device), ~attention_mask.to(device).bool()
        media = {name: x.to(device) for name, x in media.items()}
        padded = bool(padding.any())  # else the LM's fused causal path
        generated = []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        while True:
            logits = model(ids, **media, key_padding_mask=padding if padded else None).logits[:, -1]
            logits = suppress_tokens(logits, never)
            token = torch.where(done, tokenizer.pad_id, logits.argmax(dim=-1))
            generated.append(token)
            done |= torch.isin(token, stop_ids)
            all_done = _all_reduce(done.all().to(torch.int32).reshape(1), dist.ReduceOp.MIN)
            if bool(all_done.item()) or len(generated) == max_new_tokens:
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            padding = torch.cat([padding, torch.zeros_like(padding[:, :1])], dim=1)
        out = []
        for row in torch.stack(generated, dim=1).tolist():
            out.append(row[: next((i for i, t in enumerate(row) if t in stops), len(row))])
        results.append(out)
    return results


def evaluate(model: torch.nn.Module, samples: Sequence[Sample], collator: Collator, *, batch_size: int = 64,
             max_new_tokens: int = 24, device: torch.device | None = None, use_cache: bool = True) -> EvalResult:
    """Decode `samples` (this rank's share is taken by striding) and score them; every rank must call
    this with the same `samples`. Scores are reduced over ranks. use_cache=False for a sharded model."""
    rank, world = _dist()
    device = device or torch.device("cpu")
    tok = collator.tokenizer
    mine = list(samples)[rank::world]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    count = int(_all_reduce(torch.tensor([len(chunks)], device=device), dist.ReduceOp.MAX).item())
    if count > 0 and not chunks:
        raise ValueError("every rank needs at least one evaluation sample; use more samples than ranks")
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            texts = [generate_text(model, tok, [s.prompt for s in chunk], [s.images for s in chunk], collator.transform,
                                   max_new_tokens=max_new_tokens) for chunk in chunks]
        else:
            batches = [prompt_batch(tok, [s.prompt for s in chunk], [s.images for s in chunk], collator.transform)
                       for chunk in chunks + chunks[-1:] * (count - len(chunks))]
            outputs = greedy_generate(model, batches, tok, max_new_tokens, device)[: len(chunks)]
            texts = [[tok.decode(ids) for ids in rows] for rows in outputs]
    finally:
        model.train(was_training)
        _reshard(model)

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # caption hits, captions, vqa score, questions
    by_type: dict[str, tuple[float, int]] = {}  # question type -> (score sum, count)
    examples = []
    for chunk, rows in zip(chunks, texts):
        for sample, text in zip(chunk, rows):
            example = score_example(sample, text)
            if "kind" in example:
                first = 0 if example["kind"] == "caption" else 2
                sums[first] += example["score"]
                sums[first + 1] += 1
                question_type = (sample.meta or {}).get("question_type")
                if example["kind"] == "vqa" and question_type is not None:
                    score, count = by_type.get(str(question_type), (0.0, 0))
                    by_type[str(question_type)] = (score + example["score"], count + 1)
            examples.append(example)
    _all_reduce(sums, dist.ReduceOp.SUM)
    if _dist()[1] > 1:  # the types seen differ between ranks: gather the small dicts
        gathered: list[dict[str, tuple[float, int]]] = [{} for _ in range(_dist()[1])]
        dist.all_gather_object(gathered, by_type)
        by_type = _merge_by_type(gathered)
    cap_hits, caps, vqa_score, questions = sums.tolist()
    return EvalResult(
        caption_exact_match=cap_hits / caps if caps else None,
        vqa_accuracy=vqa_score / questions if questions else None,
        num_caption=int(caps),
        num_vqa=int(questions),
        vqa_by_type={key: {"accuracy": score / count, "count": count} for key, (score, count) in sorted(by_type.items())},
        examples=examples,
    )
