"""Evaluation: VQA accuracy, CIDEr-D, and the Flamingo paper's few-shot protocol.

    vqa_accuracy(prediction, answers) -> float          # one question, its (10) human answers; in [0, 1]
    cider_d(candidates, references) -> float            # dicts id -> str / id -> [str]; COCO-code scale
    evaluate(model, tokenizer, task, shots, queries=..., support=...) -> [EvalResult]   # paper units
    summarize(results) -> rows {task, shots, metric, mean, std, seeds, num_queries}
    generate_text(model, tokenizer, prompts, images, **generate_kwargs) -> [str]
"""

from flamingo_fast.eval.cider import cider_d
from flamingo_fast.eval.harness import EvalResult, compute_metrics, evaluate, summarize
from flamingo_fast.eval.fewshot import TASKS, EvalTask
from flamingo_fast.eval.text_generation import generate_text
from flamingo_fast.eval.vqa import vqa_accuracy

__all__ = [
    "TASKS",
    "EvalResult",
    "EvalTask",
    "cider_d",
    "compute_metrics",
    "evaluate",
    "generate_text",
    "summarize",
    "vqa_accuracy",
]
