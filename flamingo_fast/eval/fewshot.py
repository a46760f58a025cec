"""The Flamingo paper's few-shot protocol: tasks, in-context prompts, and choosing the demonstrations.

A k-shot prompt is k demonstrations from a support set followed by the query, in the training format:

    captioning  "<image>Output:{caption}<|endofchunk|>" * k + "<image>Output:"
    VQA         "<image>Question:{q} Short answer:{a}<|endofchunk|>" * k + "<image>Question:{q} Short answer:"

with the demonstrations' images before the query's. Zero-shot uses two demonstrations with their images
removed (text only), as the paper does (its Appendix; OpenFlamingo does the same); `zero_shot_demos`
changes that number (0 = the bare query). Demonstrations are drawn per query, at random with a seed
(`random_demos`) or by RICES (`flamingo_fast.eval.rices`). Demonstrations and queries are
`flamingo_fast.data.Sample`s: a demonstration contributes its full `text` (one chunk ending in
`<|endofchunk|>`), a query its `prompt` and its `references` / `answers`.

Predictions are cleaned as OpenFlamingo does: cut where the model starts a new prompt ("Output:",
"Question:", "Short answer:", "Answer:"; case-insensitive here because word tokenizers lowercase) and,
for VQA, at the first ", ".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from flamingo_fast.data.sample import EOC_TOKEN, IMAGE_TOKEN, Sample


@dataclass(frozen=True)
class EvalTask:
    name: str
    kind: str  # "caption" | "vqa": the sample task it evaluates
    max_new_tokens: int  # OpenFlamingo's defaults: 20 for captions, 5 for VQA answers
    metrics: tuple[str, ...]  # from METRICS


METRICS = ("cider", "vqa_accuracy", "exact_match")
TASKS = {
    "coco": EvalTask("coco", "caption", 20, ("cider",)),
    "flickr30k": EvalTask("flickr30k", "caption", 20, ("cider",)),
    "vqav2": EvalTask("vqav2", "vqa", 5, ("vqa_accuracy",)),
    "shapes_caption": EvalTask("shapes_caption", "caption", 20, ("cider", "exact_match")),
    "shapes_vqa": EvalTask("shapes_vqa", "vqa", 5, ("vqa_accuracy", "exact_match")),
}

_NEW_PROMPT = re.compile(r"(?i)(short\s+answer|answer|question|output)\s*:")


def get_task(task: str | EvalTask) -> EvalTask:
    if isinstance(task, EvalTask):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)} (or an EvalTask)")
    return TASKS[task]


def check_sample(sample: Sample, task: EvalTask, role: str) -> None:
    """A query needs its prompt and ground truth; a demonstration one full chunk with one image."""
    if not isinstance(sample, Sample):
        raise TypeError(f"{role} must be flamingo_fast.data.Sample objects, got {type(sample).__name__}")
    if sample.task != task.kind:
        raise ValueError(f"{role} sample {sample.id!r} has task {sample.task!r}; {task.name} needs {task.kind!r}")
    if len(sample.images) != 1 or sample.loss_start is None:
        raise ValueError(f"{role} sample {sample.id!r} must have one image and a loss_start (the prompt's end)")
    if role == "query":
        truth = sample.references if task.kind == "caption" else sample.answers
        if not truth:
            raise ValueError(f"query sample {sample.id!r} has no {'references' if task.kind == 'caption' else 'answers'}")
    elif not sample.text.endswith(EOC_TOKEN):
        raise ValueError(f"demonstration sample {sample.id!r} must be a full chunk ending in {EOC_TOKEN}")


def build_prompt(query: Sample, demos: Sequence[Sample], with_images: bool, separator: str = "") -> tuple[str, list]:
    """(prompt text, images in order) for one query after its demonstrations (module docstring).
    with_images=False drops the demonstrations' `<image>` markers and images (zero-shot)."""
    texts = [d.text if with_images else d.text.replace(IMAGE_TOKEN, "") for d in demos]
    images = [d.images[0] for d in demos] if with_images else []
    return separator.join(texts + [query.prompt]), images + [query.images[0]]


def random_demos(num_support: int, k: int, seed: int, query_index: int) -> list[int]:
    """k distinct support indices for one query, reproducible from (seed, query_index)."""
    if k > num_support:
        raise ValueError(f"{k} demonstrations requested but the support set has only {num_support} samples")
    rng = random.Random(f"flamingo-fast/eval/{seed}/{query_index}")
    return rng.sample(range(num_support), k)


def clean_prediction(text: str, task: EvalTask) -> str:
    """Cut where the model starts a new prompt (and, for VQA, at ', '), strip quotes and spaces."""
    text = _NEW_PROMPT.split(text, maxsplit=1)[0]
    if task.kind == "vqa":
        text = text.split(", ", 1)[0]
    return text.replace('"', "").strip()


def exact_match(prediction: str, truths: Sequence[str]) -> float:
    """1.0 if the prediction equals the first reference/answer up to case and spacing."""
    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    return float(norm(prediction) == norm(truths[0]))
