"""The embedded shapes generator: determinism, splits, rendering, canonical captions, answerable questions."""

import hashlib
import random

import numpy as np
import pytest

from flamingo_fast.data import EOC_TOKEN, IMAGE_TOKEN, shapes_dataset, shapes_eval_split, shapes_tokenizer
from flamingo_fast.data.shapes import (
    COLOURS,
    KINDS,
    NUMBER_WORDS,
    Shape,
    askable_questions,
    random_scene,
    render_scene,
    scene_caption,
)


def _digest(sample):
    return hashlib.sha1(b"".join(np.asarray(im).tobytes() for im in sample.images) + sample.text.encode()).hexdigest()


def test_same_seed_same_samples_other_seed_differs():
    a = [_digest(s) for s in shapes_dataset("train", 30, seed=3, image_size=32)]
    b = [_digest(s) for s in shapes_dataset("train", 30, seed=3, image_size=32)]
    c = [_digest(s) for s in shapes_dataset("train", 30, seed=4, image_size=32)]
    assert a == b
    assert len(set(a) & set(c)) == 0
    # Random access gives the same sample as iteration (needed by shuffling samplers / workers).
    ds = shapes_dataset("train", 30, seed=3, image_size=32)
    assert _digest(ds[17]) == a[17] and _digest(ds[-1]) == a[-1]


def test_train_and_heldout_splits_are_disjoint():
    train = {_digest(s) for s in shapes_dataset("train", 300, seed=0, image_size=32)}
    held_out = {_digest(s) for s in shapes_eval_split(n=300, seed=0, image_size=32, task="mixed")}
    assert len(train) == 300 and len(held_out) == 300
    assert not train & held_out


def test_task_formats_and_mixture():
    ds = shapes_dataset("train", 400, seed=1, image_size=32)
    tasks = [s.task for s in ds]
    assert {"caption", "vqa", "interleaved"} == set(tasks)
    assert 0.3 < tasks.count("caption") / 400 < 0.5 and 0.1 < tasks.count("interleaved") / 400 < 0.3
    for sample in ds:
        assert sample.text.count(IMAGE_TOKEN) == len(sample.images) == sample.text.count(EOC_TOKEN)
        if sample.task == "caption":
            assert sample.text == f"{IMAGE_TOKEN}Output:{sample.references[0]}{EOC_TOKEN}"
            assert sample.prompt == f"{IMAGE_TOKEN}Output:"
        elif sample.task == "vqa":
            assert sample.prompt.startswith(f"{IMAGE_TOKEN}Question:") and sample.prompt.endswith(" Short answer:")
            assert sample.text == f"{sample.prompt}{sample.answers[0]}{EOC_TOKEN}"
            assert sample.answers == [sample.answers[0]] * 10
        else:
            assert 2 <= len(sample.images) <= 3 and sample.loss_start is None


def test_every_text_uses_only_the_small_vocabulary():
    tok = shapes_tokenizer()
    for sample in shapes_dataset("train", 300, seed=2, image_size=32):
        assert tok.unk_id not in tok.encode(sample.text), sample.text
    assert tok.vocab_size <= 45


@pytest.mark.parametrize("image_size", [32, 64])
def test_rendering_matches_the_scene(image_size):
    rng = random.Random(0)
    for _ in range(60):
        shapes = random_scene(rng)
        image = np.asarray(render_scene(shapes, image_size)).astype(int)
        assert image.shape == (image_size, image_size, 3)
        for shape in shapes:
            # The centroid of every kind (triangle: 2/3 down) is filled with the shape's colour.
            cx = (shape.x + shape.size / 2) * image_size
            cy = (shape.y + shape.size * (2 / 3 if shape.kind == "triangle" else 0.5)) * image_size
            pixel = image[int(cy), int(cx)]
            assert np.abs(pixel - np.array(COLOURS[shape.colour])).max() < 40, (shape, pixel)
        # Horizontal extents are disjoint and ordered left to right (so "left of" is unambiguous) and a
        # column of mostly background (under half covered, after anti-aliasing) separates neighbours.
        for left, right in zip(shapes, shapes[1:]):
            assert left.x + left.size < right.x
            gap = int(((left.x + left.size) + right.x) / 2 * image_size)
            assert image[:, gap].max() < 128
        assert all(0 <= s.x and s.x + s.size <= 1 and 0 <= s.y and s.y + s.size <= 1 for s in shapes)


def test_caption_is_canonical_left_to_right():
    shapes = [Shape("red", "circle", 0.05, 0.1, 0.2), Shape("blue", "square", 0.4, 0.5, 0.2), Shape("orange", "star", 0.7, 0.2, 0.2)]
    assert scene_caption(shapes) == "a red circle left of a blue square left of an orange star"
    assert scene_caption(shapes[:1]) == "a red circle"


def _answer(shapes, question):
    """Independent oracle: answer a generated question from the scene, or None if ambiguous."""
    words = question.rstrip("?").split()
    if question == "how many shapes?":
        return NUMBER_WORDS[len(shapes)]
    if question.startswith("what colour is the "):
        matches = [s for s in shapes if s.kind == words[-1]]
        return matches[0].colour if len(matches) == 1 else None
    if question.startswith("what shape is "):
        matches = [s for s in shapes if s.colour == words[-1]]
        return matches[0].kind if len(matches) == 1 else None
    side, colour, kind = words[2], words[-2], words[-1]
    targets = [i for i, s in enumerate(shapes) if (s.colour, s.kind) == (colour, kind)]
    if len(targets) != 1:
        return None
    t = targets[0]
    others = shapes[:t] if side == "left" else shapes[t + 1 :]
    names = {f"{s.colour} {s.kind}" for s in others}
    return names.pop() if len(others) == 1 else None


def test_questions_are_answerable_and_unambiguous():
    rng = random.Random(5)
    seen_types = set()
    for _ in range(500):
        shapes = random_scene(rng)
        for question_type, pairs in askable_questions(shapes).items():
            seen_types.add(question_type)
            for question, answer in pairs:
                assert _answer(shapes, question) == answer, (shapes, question, answer)
    assert seen_types == {"colour", "shape", "count", "left", "right"}


def test_ambiguous_questions_are_never_asked():
    twins = [Shape("red", "circle", 0.05, 0.1, 0.2), Shape("red", "circle", 0.4, 0.1, 0.2), Shape("blue", "circle", 0.7, 0.1, 0.2)]
    questions = {q for pairs in askable_questions(twins).values() for q, _ in pairs}
    assert "what colour is the circle?" not in questions  # three circles
    assert "what shape is red?" not in questions  # two red shapes
    assert "what is left of the red circle?" not in questions  # two red circles
    assert "what shape is blue?" in questions and "how many shapes?" in questions
    three = [Shape("red", "circle", 0.05, 0.1, 0.2), Shape("green", "star", 0.4, 0.1, 0.2), Shape("blue", "cross", 0.7, 0.1, 0.2)]
    asked = dict(q for pairs in askable_questions(three).values() for q in pairs)
    assert "what is left of the blue cross?" not in asked  # two shapes lie left of it
    assert asked["what is left of the green star?"] == "red circle"
    assert asked["what is right of the green star?"] == "blue cross"


def test_vqa_dataset_covers_all_question_types_and_argument_checks():
    types = {s.meta["question_type"] for s in shapes_dataset("train", 200, seed=0, image_size=32, task="vqa")}
    assert types == {"colour", "shape", "count", "left", "right"}
    assert len(KINDS) >= 5 and len(COLOURS) >= 6
    with pytest.raises(ValueError, match="task"):
        shapes_dataset(task="poetry")
    with pytest.raises(ValueError, match="image_size"):
        shapes_dataset(image_size=8)
    with pytest.raises(IndexError):
        shapes_dataset(n=3)[3]
