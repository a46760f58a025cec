"""`evaluate`: few-shot evaluation of a Flamingo model on one task, for several shot counts and seeds.

    results = evaluate(model, tokenizer, "coco", shots=(0, 4, 8, 32), queries=test_samples,
                       support=train_samples, seeds=(0, 1, 2))
    for row in summarize(results): print(row)   # task, shots, metric, mean, std over seeds

Protocol (flamingo_fast.eval.fewshot): per query, k demonstrations from `support` (random per seed, or
RICES), prompt in the training format, beam search with 3 beams and length_penalty 0 (the paper's 3
beams; OpenFlamingo's evaluation settings), at most 20 new tokens for captions and 5 for answers, stop
at `<|endofchunk|>`/eos, predictions cleaned as OpenFlamingo does.

Metrics are reported in the papers' units: "cider" = CIDEr-D x 100 (as COCO results are quoted, e.g.
113.8), "vqa_accuracy" and "exact_match" in percent. `queries` and `support` are sequences of
`flamingo_fast.data.Sample` (e.g. VQAv2Dataset, CaptionDataset, ShapesDataset); samples are fetched by
index only when needed, so a large support set costs nothing for random demonstrations. Keep the query
samples out of the support set (the paper draws demonstrations from the training split).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from flamingo_fast.data.sample import Sample
from flamingo_fast.data.tokenizer import Tokenizer
from flamingo_fast.data.tiling import transform_for
from flamingo_fast.data.transforms import ImageTransform
from flamingo_fast.eval.cider import cider_d
from flamingo_fast.eval.fewshot import (
    EvalTask,
    build_prompt,
    check_sample,
    clean_prediction,
    exact_match,
    get_task,
    random_demos,
)
from flamingo_fast.eval.rices import RicesRetriever
from flamingo_fast.eval.text_generation import generate_text
from flamingo_fast.eval.vqa import vqa_accuracy
from flamingo_fast.models.flamingo import Flamingo


@dataclass
class EvalResult:
    task: str
    shots: int
    seed: int
    metrics: dict[str, float]  # paper units (module docstring)
    num_queries: int
    seconds: float
    predictions: list[dict] = field(default_factory=list)  # {"id", "prompt", "prediction", "truth"}

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(task: EvalTask, predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """The task's metrics for predictions against references (captions) / human answers (VQA)."""
    if len(predictions) != len(truths) or not predictions:
        raise ValueError(f"need as many predictions as truths (> 0), got {len(predictions)} and {len(truths)}")
    metrics = {}
    for name in task.metrics:
        if name == "cider":
            metrics[name] = 100.0 * cider_d(dict(enumerate(predictions)), dict(enumerate(truths)))
        elif name == "vqa_accuracy":
            metrics[name] = 100.0 * sum(map(vqa_accuracy, predictions, truths)) / len(predictions)
        elif name == "exact_match":
            metrics[name] = 100.0 * sum(map(exact_match, predictions, truths)) / len(predictions)
        else:
            raise ValueError(f"unknown metric {name!r}")
    return metrics


def _check_shots(shots: Sequence[int]) -> list[int]:
    if isinstance(shots, int):
        shots = [shots]
    shots = list(shots)
    if not shots or any(not isinstance(k, int) or k < 0 for k in shots):
        raise ValueError(f"shots must be a non-empty list of ints >= 0, got {shots!r}")
    return shots


@torch.no_grad()
def evaluate(
    model: Flamingo,
    tokenizer: Tokenizer,
    task: str | EvalTask,
    shots: Sequence[int] = (0, 4, 8, 32),
    *,
    queries: Sequence[Sample],
    support: Sequence[Sample],
    num_queries: Optional[int] = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 8,
    num_beams: int = 3,
    length_penalty: float = 0.0,
    max_new_tokens: Optional[int] = None,
    rices: bool = False,
    zero_shot_demos: int = 2,
    demo_separator: str = "",
    image_transform: Optional[ImageTransform] = None,
    keep_predictions: bool = True,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> list[EvalResult]:
    """One EvalResult per (shots, seed); see the module docstring for the protocol.

    num_queries: use the first N queries (default all). rices: choose demonstrations by image similarity
    (deterministic, so only the first seed runs). zero_shot_demos: text-only demonstrations at 0 shots
    (the paper: 2). demo_separator: text between chunks ("" as in training; OpenFlamingo's evaluation
    uses "\\n"). on_batch(done, total) is called after each generated batch (progress display).
    """
    if not isinstance(model, Flamingo):
        raise TypeError(f"model must be a flamingo_fast Flamingo, got {type(model).__name__}")
    task = get_task(task)
    shots = _check_shots(shots)
    if batch_size < 1 or zero_shot_demos < 0:
        raise ValueError(f"batch_size must be >= 1 and zero_shot_demos >= 0, got {batch_size} and {zero_shot_demos}")
    count = len(queries) if num_queries is None else min(num_queries, len(queries))
    if count == 0:
        raise ValueError("no query samples to evaluate")
    query_samples = [queries[i] for i in range(count)]
    for sample in query_samples:
        check_sample(sample, task, "query")
    truths = [q.references if task.kind == "caption" else q.answers for q in query_samples]
    transform = image_transform or transform_for(model.cfg.vision)
    retriever = RicesRetriever(model, support, transform) if rices else None
    run_seeds = list(seeds)[:1] if rices else list(seeds)
    if not run_seeds:
        raise ValueError("seeds must hold at least one seed")
    model.eval()

    results = []
    total_batches = len(shots) * len(run_seeds) * math.ceil(count / batch_size)
    done_batches = 0
    for k in shots:
        n_demos = k if k > 0 else zero_shot_demos
        for seed in run_seeds:
            start_time = time.perf_counter()
            predictions, records = [], []
            for start in range(0, count, batch_size):
                batch = query_samples[start: start + batch_size]
                if retriever is not None:
                    picks = retriever.find([q.images[0] for q in batch], n_demos)
                else:
                    picks = [random_demos(len(support), n_demos, seed, start + i) for i in range(len(batch))]
                prompts, images = [], []
                for query, indices in zip(batch, picks):
                    demos = [support[i] for i in indices]
                    for demo in demos:
                        check_sample(demo, task, "demonstration")
                    text, imgs = build_prompt(query, demos, with_images=k > 0, separator=demo_separator)
                    prompts.append(text)
                    images.append(imgs)
                outputs = generate_text(model, tokenizer, prompts, images, transform,
                                        max_new_tokens=max_new_tokens or task.max_new_tokens, num_beams=num_beams,
                                        length_penalty=length_penalty)
                for query, prompt, output in zip(batch, prompts, outputs):
                    prediction = clean_prediction(output, task)
                    predictions.append(prediction)
                    if keep_predictions:
                        truth = query.references if task.kind == "caption" else query.answers
                        records.append({"id": query.id, "prompt": prompt, "prediction": prediction, "truth": truth})
                done_batches += 1
                if on_batch is not None:
                    on_batch(done_batches, total_batches)
            results.append(EvalResult(task=task.name, shots=k, seed=seed,
                                      metrics=compute_metrics(task, predictions, truths), num_queries=count,
                                      seconds=time.perf_counter() - start_time, predictions=records))
    return results


def summarize(results: Sequence[EvalResult]) -> list[dict]:
    """Rows {task, shots, metric, mean, std, seeds, num_queries}: mean and (sample) std over seeds."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    sizes: dict[tuple[str, int, str], int] = {}
    for result in results:
        for metric, value in result.metrics.items():
            key = (result.task, result.shots, metric)
            groups.setdefault(key, []).append(value)
            sizes[key] = result.num_queries
    rows = []
    for (task, shots, metric), values in groups.items():
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        rows.append({"task": task, "shots": shots, "metric": metric, "mean": mean, "std": std,
                     "seeds": len(values), "num_queries": sizes[(task, shots, metric)]})
    return rows
