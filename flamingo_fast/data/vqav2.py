"""VQAv2 in its official format: a questions json, an optional annotations json, and COCO images.

questions:   {"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}, ...]}
annotations: {"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer"}, ...]}, ...]}
images:      image_root/COCO_{subtype}_{image_id:012d}.jpg (subtype from `data_subtype` or the argument)

Samples use Flamingo's VQA format `<image>Question:{q} Short answer:{a}<|endofchunk|>` with `a` the
multiple-choice answer, `loss_start` after "Short answer:" and `answers` = the 10 human answers (for
VQA accuracy). Without annotations (test-dev) the text is the prompt alone and `answers` is None.
"""

from __future__ import annotations

import os
from pathlib import Path

from flamingo_fast.data.sample import BadSampleError, Sample, vqa_text
from flamingo_fast.data.source import MapSource, read_annotation_json
from flamingo_fast.data.transforms import open_image


def _load(path: str | os.PathLike, field: str) -> dict:
    data = read_annotation_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise ValueError(f"{path}: expected a VQAv2 json with a {field!r} list")
    return data


def _is_id(value) -> bool:
    """A question or image id as VQAv2 writes them (ints; some tools write strings), never a bool."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


class VQAv2Dataset:
    """Indexable VQAv2 questions; `__getitem__` returns a Sample (BadSampleError for broken entries)."""

    def __init__(
        self,
        questions: str | os.PathLike,
        image_root: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        image_subtype: str | None = None,
    ):
        data = _load(questions, "questions")
        self.image_subtype = image_subtype or data.get("data_subtype")
        if not self.image_subtype:
            raise ValueError(f"{questions} has no 'data_subtype'; pass image_subtype (e.g. 'val2014')")
        self.questions_file = questions
        self.questions = data["questions"]
        self.image_root = Path(image_root)
        self.annotations = None
        if annotations is not None:
            self.annotations = {}
            for number, annotation in enumerate(_load(annotations, "annotations")["annotations"]):
                if not isinstance(annotation, dict) or not _is_id(annotation.get("question_id")):
                    raise ValueError(f"{annotations}: annotations[{number}] must be an object with an int or string "
                                     f"question_id, got {annotation!r:.120}")
                self.annotations[annotation["question_id"]] = annotation

    def __len__(self) -> int:
        return len(self.questions)

    def image_path(self, image_id: int) -> Path:
        return self.image_root / f"COCO_{self.image_subtype}_{int(image_id):012d}.jpg"

    def __getitem__(self, index: int) -> Sample:
        entry = self.questions[index]
        if not (isinstance(entry, dict) and _is_id(entry.get("question_id")) and _is_id(entry.get("image_id"))
                and not isinstance(entry["image_id"], str) and isinstance(entry.get("question"), str)):
            raise BadSampleError("bad_record", f"{self.questions_file}: questions[{index}] needs an int or string "
                                 f"question_id, an int image_id and a string question, got {entry!r:.120}")
        question_id, image_id, question = entry["question_id"], entry["image_id"], entry["question"]
        answer, answers, extra = None, None, {}
        if self.annotations is not None:
            annotation = self.annotations.get(question_id)
            if annotation is None or not isinstance(annotation.get("multiple_choice_answer"), str):
                raise BadSampleError("bad_record", f"question {question_id} has no annotation with a multiple_choice_answer")
            answer = annotation["multiple_choice_answer"]
            given = annotation.get("answers")
            answers = [a["answer"] for a in (given if isinstance(given, list) else [])
                       if isinstance(a, dict) and isinstance(a.get("answer"), str)] or [answer]
            extra = {k: annotation[k] for k in ("answer_type", "question_type") if k in annotation}
        image = open_image(self.image_path(image_id))
        text, loss_start = vqa_text(question, answer)
        return Sample(
            text,
            [image],
            id=str(question_id),
            task="vqa",
            answers=answers,
            loss_start=loss_start,
            meta={"question_id": question_id, "image_id": image_id, "question": question, **extra},
        )


class VQAv2Source(MapSource):
    """A VQAv2Dataset as a pipeline source (records are question indices)."""

    def __init__(
        self,
        questions: str | os.PathLike,
        image_root: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        image_subtype: str | None = None,
        name: str = "vqav2",
        shuffle: bool = True,
    ):
        super().__init__(VQAv2Dataset(questions, image_root, annotations, image_subtype), name, shuffle)
