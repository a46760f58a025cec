"""The embedded "shapes" data: procedurally generated scenes of coloured shapes, learnable on a CPU.

A scene holds 1-3 shapes (6 colours x 5 kinds, varied sizes and positions) rendered with Pillow. Shapes
never overlap and their horizontal extents are disjoint and separated, so "left of" is always clear.
Text is canonical given the scene, so a small model can reach exact-match:

    caption      "a red circle left of a blue square left of an orange star"  (shapes left to right)
    questions    "what colour is the circle?" -> "red"       (only if exactly one circle)
                 "what shape is blue?"        -> "square"    (only if exactly one blue shape)
                 "how many shapes?"           -> "two"
                 "what is left of the blue square?" -> "red circle"
                 "what is right of the red circle?" -> "blue square"
                 (position questions only about a shape unique by colour+kind that has exactly one
                 shape on the asked side, so every question has one short, unambiguous answer)

Samples use Flamingo's prompt formats: `<image>Output:{caption}<|endofchunk|>`,
`<image>Question:{q} Short answer:{a}<|endofchunk|>`, and "interleaved" samples that concatenate 2-3
such chunks about different scenes. Sample `i` of (split, seed) is a pure function of those values:
splits are different seeds of the same generator, so held-out data never repeats the training stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw

from flamingo_fast.data.sample import Sample, caption_text, vqa_text
from flamingo_fast.data.tokenizer import Tokenizer, build_word_tokenizer

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 215, 30),
    "purple": (155, 65, 205),
    "orange": (250, 140, 20),
}
KINDS = ("circle", "square", "triangle", "star", "cross")
NUMBER_WORDS = ("zero", "one", "two", "three")
BACKGROUND = (0, 0, 0)

MAX_SHAPES = 3
TASK_WEIGHTS = {"caption": 0.4, "vqa": 0.4, "interleaved": 0.2}
QUESTION_TYPES = ("colour", "shape", "count", "left", "right")
VQA_ANSWER_COPIES = 10  # VQAv2 has 10 human answers per question; the VQA metric expects that many

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges even at 32x32
_MARGIN = 0.04  # fraction of the image kept free at the borders
_GAP = 0.05  # minimum horizontal gap between neighbouring shapes, fraction of the image
_MIN_SIZE, _MAX_SIZE = 0.20, 0.40  # shape size range, fraction of the image


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    x: float  # left edge, fraction of the image width
    y: float  # top edge, fraction of the image height
    size: float  # side of the bounding box, fraction of the image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def with_article(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


def random_scene(rng: random.Random, num_shapes: int | None = None) -> list[Shape]:
    """1-3 shapes with disjoint, separated horizontal extents, returned left to right."""
    n = rng.randint(1, MAX_SHAPES) if num_shapes is None else num_shapes
    if not 1 <= n <= MAX_SHAPES:
        raise ValueError(f"num_shapes must be in [1, {MAX_SHAPES}], got {n}")
    usable = 1.0 - 2 * _MARGIN
    max_size = min(_MAX_SIZE, (usable - (n - 1) * _GAP) / n)
    sizes = [rng.uniform(_MIN_SIZE, max_size) for _ in range(n)]
    slack = usable - sum(sizes) - (n - 1) * _GAP
    # Split the slack over the n + 1 gaps (before, between, after) at random cut points.
    cuts = sorted(rng.uniform(0.0, slack) for _ in range(n))
    shapes, left = [], _MARGIN
    for i, size in enumerate(sizes):
        x = left + cuts[i] - (cuts[i - 1] if i else 0.0)
        y = rng.uniform(_MARGIN, 1.0 - _MARGIN - size)
        shapes.append(Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), x, y, size))
        left = x + size + _GAP
    return shapes


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16 for recognisable shapes, got {image_size!r}")


def render_scene(shapes: Sequence[Shape], image_size: int = 64) -> Image.Image:
    """Draw the shapes on a black RGB canvas of image_size x image_size."""
    _check_image_size(image_size)
    canvas = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        colour = COLOURS[shape.colour]
        x0, y0, s = shape.x * canvas, shape.y * canvas, shape.size * canvas
        x1, y1, cx, cy = x0 + s, y0 + s, x0 + s / 2, y0 + s / 2
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape.kind == "square":
            inset = 0.06 * s  # a full-box square looks much bigger than the other kinds
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=colour)
        elif shape.kind == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
        elif shape.kind == "star":
            draw.polygon(_star(cx, cy, s / 2, s * 0.22), fill=colour)
        elif shape.kind == "cross":
            t = s / 6  # half the bar thickness
            draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
            draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {KINDS}")
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def scene_caption(shapes: Sequence[Shape]) -> str:
    """Canonical caption: every shape, left to right, joined by "left of"."""
    return " left of ".join(shape.with_article for shape in shapes)


def askable_questions(shapes: Sequence[Shape]) -> dict[str, list[tuple[str, str]]]:
    """Every unambiguous (question, answer) pair about the scene, by question type."""
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    names = [s.name for s in shapes]
    questions: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    for shape in shapes:
        if kinds.count(shape.kind) == 1:
            questions["colour"].append((f"what colour is the {shape.kind}?", shape.colour))
        if colours.count(shape.colour) == 1:
            questions["shape"].append((f"what shape is {shape.colour}?", shape.kind))
    questions["count"].append(("how many shapes?", NUMBER_WORDS[len(shapes)]))
    # Shapes are sorted left to right: exactly one shape lies left of index 1 and right of index n - 2.
    if len(shapes) >= 2:
        target, neighbour = shapes[1], shapes[0]
        if names.count(target.name) == 1:
            questions["left"].append((f"what is left of the {target.name}?", neighbour.name))
        target, neighbour = shapes[-2], shapes[-1]
        if names.count(target.name) == 1:
            questions["right"].append((f"what is right of the {target.name}?", neighbour.name))
    return {t: qs for t, qs in questions.items() if qs}


def _question(rng: random.Random, shapes: Sequence[Shape],
              weights: dict[str, float] | None = None) -> tuple[str, str, str]:
    askable = askable_questions(shapes)
    types = sorted(askable)
    chances = None if weights is None else [weights.get(t, 1.0) for t in types]
    if chances is None or not any(chances):  # no askable type has a positive weight: uniform over the askable
        question_type = rng.choice(types)
    else:
        question_type = rng.choices(types, weights=chances)[0]
    question, answer = rng.choice(askable[question_type])
    return question_type, question, answer


def shapes_words() -> list[str]:
    """Every word the generator and the prompt formats can produce (the shapes tokenizer's vocabulary)."""
    prompt_words = ["output", "question", "short", "answer", ":", "?"]
    caption_words = ["a", "an", "left", "of", *COLOURS, *KINDS]
    question_words = ["what", "colour", "is", "the", "shape", "how", "many", "shapes", "right", *NUMBER_WORDS]
    return sorted(set(prompt_words + caption_words + question_words))


def shapes_tokenizer() -> Tokenizer:
    """The small word-level tokenizer covering all shapes text (base vocab 4 specials + words)."""
    return build_word_tokenizer(shapes_words())


class ShapesDataset:
    """A deterministic, indexable sequence of shapes `Sample`s (see module docstring).

    task: "caption" | "vqa" | "interleaved" | "mixed" (each sample draws its task with TASK_WEIGHTS).
    Caption samples carry `references=[caption]`; VQA samples carry `answers=[answer] * 10` and
    `meta["question_type"]`. Caption and VQA samples set `loss_start` after the prompt, so
    `sample.prompt` is the evaluation prompt; interleaved samples train on all text after the first image.
    question_weights: {question type: weight} for drawing a question's type among the scene's askable ones
    (unlisted types weigh 1; a scene whose askable types all weigh 0 draws uniformly; default: uniform).
    """

    def __init__(self, split: str = "train", n: int = 10000, seed: int = 0, image_size: int = 64, task: str = "mixed",
                 question_weights: dict[str, float] | None = None):
        if task not in ("caption", "vqa", "interleaved", "mixed"):
            raise ValueError(f"task must be 'caption', 'vqa', 'interleaved' or 'mixed', got {task!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string such as 'train' or 'val', got {split!r}")
        _check_image_size(image_size)
        if question_weights is not None:
            if not isinstance(question_weights, dict) or any(
                    t not in QUESTION_TYPES or isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                    for t, w in question_weights.items()):
                raise ValueError(f"question_weights must map question types {QUESTION_TYPES} to non-negative numbers, "
                                 f"got {question_weights!r}")
            question_weights = {t: float(w) for t, w in question_weights.items()}
            if not any(question_weights.get(t, 1.0) > 0 for t in QUESTION_TYPES):
                raise ValueError(f"question_weights must leave some question type a positive weight, got {question_weights!r}")
        self.split, self.n, self.seed, self.image_size, self.task = split, n, seed, image_size, task
        self.question_weights = question_weights

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> random.Random:
        # String seeds hash with SHA-512 inside `random`: stable across processes and Python runs.
        return random.Random(f"flamingo-fast/shapes/{self.split}/{self.seed}/{index}")

    def _chunk(self, rng: random.Random, task: str) -> tuple[str, int, Image.Image, dict]:
        shapes = random_scene(rng)
        image = render_scene(shapes, self.image_size)
        scene = [(s.colour, s.kind) for s in shapes]
        if task == "caption":
            caption = scene_caption(shapes)
            text, loss_start = caption_text(caption)
            return text, loss_start, image, {"caption": caption, "scene": scene}
        question_type, question, answer = _question(rng, shapes, self.question_weights)
        text, loss_start = vqa_text(question, answer)
        info = {"question": question, "answer": answer, "question_type": question_type, "scene": scene}
        return text, loss_start, image, info

    def __getitem__(self, index: int) -> Sample:
        if not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        rng = self._rng(index)
        task = self.task
        if task == "mixed":
            task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
        sample_id = f"shapes/{self.split}/{self.seed}/{index}"
        if task == "interleaved":
            chunks = [self._chunk(rng, rng.choice(("caption", "vqa"))) for _ in range(rng.randint(2, 3))]
            return Sample(
                text="".join(c[0] for c in chunks),
                images=[c[2] for c in chunks],
                id=sample_id,
                task="interleaved",
                meta={"chunks": [c[3] for c in chunks]},
            )
        text, loss_start, image, info = self._chunk(rng, task)
        if task == "caption":
            return Sample(text, [image], sample_id, "caption", references=[info["caption"]], loss_start=loss_start, meta=info)
        return Sample(
            text,
            [image],
            sample_id,
            "vqa",
            answers=[info["answer"]] * VQA_ANSWER_COPIES,
            loss_start=loss_start,
            meta=info,
        )

    def __iter__(self):
        return (self[i] for i in range(self.n))


def shapes_dataset(
    split: str = "train", n: int = 10000, seed: int = 0, image_size: int = 64, task: str = "mixed",
    question_weights: dict[str, float] | None = None,
) -> ShapesDataset:
    """Shapes samples of one split ("train", "val", ...): see ShapesDataset."""
    return ShapesDataset(split=split, n=n, seed=seed, image_size=image_size, task=task,
                         question_weights=question_weights)
