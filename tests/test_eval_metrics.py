"""VQA accuracy and CIDEr-D against cases worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from flamingo_fast.eval import cider_d, vqa_accuracy
from flamingo_fast.eval.cider import cider_d_per_image, tokenize
from flamingo_fast.eval.vqa import normalize_answer

# -- VQA accuracy ----------------------------------------------------------------------------------------------


def test_vqa_accuracy_leave_one_out_average():
    # 3 "yes" + 7 "no", prediction "yes". Leaving out one of the 3 "yes" leaves 2 matches -> 2/3;
    # leaving out one of the 7 "no" leaves 3 matches -> min(3/3, 1) = 1. Mean: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("yes", answers) == pytest.approx(0.9)
    # "no" has 7 matches: every subset keeps >= 6 -> 1.
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    # One match: leaving it out -> 0 (1 case); otherwise 1/3 (9 cases). Mean 9 * (1/3) / 10 = 0.3.
    assert vqa_accuracy("maybe", ["maybe"] + ["no"] * 9) == pytest.approx(0.3)
    # Two matches: 2 subsets keep 1 -> 1/3; 8 subsets keep 2 -> 2/3. (2/3 + 16/3) / 10 = 0.6.
    assert vqa_accuracy("red", ["red", "red"] + ["blue"] * 8) == pytest.approx(0.6)
    # Four or more matches: every subset keeps >= 3 -> 1.
    assert vqa_accuracy("4", ["4"] * 4 + ["5"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_vqa_normalisation_official_rules():
    # Case and a final period: "Yes." -> "yes".
    assert normalize_answer("Yes.") == "yes"
    # Number words become digits, articles go: "Two dogs" -> "2 dogs"; "the two" -> "2".
    assert normalize_answer("Two dogs") == "2 dogs"
    assert normalize_answer("the two") == "2"
    assert normalize_answer("a red circle") == "red circle"
    # Contractions without apostrophe get it: "dont" -> "don't".
    assert normalize_answer("dont know") == "don't know"
    # A hyphen inside a word becomes a space; punctuation next to a space is deleted.
    assert normalize_answer("ice-cream") == "ice cream"
    assert normalize_answer("yes !") == "yes"
    # A comma inside a number is deleted (and then every listed mark is deleted, not spaced).
    assert normalize_answer("1,000") == "1000"
    # A period followed by a digit stays.
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("  tab\there \n") == "tab here"


def test_vqa_accuracy_normalises_prediction_and_answers():
    # "Two." normalises to "2" like the humans' "2" / "two": 3 matches of 10 -> 0.9 (see above).
    answers = ["2", "two", "2"] + ["3"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("A Dog", ["dog"] * 10) == pytest.approx(1.0)


def test_vqa_accuracy_single_answer_and_errors():
    # With one human answer there is nobody to leave out: min(matches / 3, 1) = 1/3.
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="str"):
        vqa_accuracy(3, ["3"])


# -- CIDEr-D -----------------------------------------------------------------------------------------------------


def test_tokenize_ptb_like():
    assert tokenize("A dog's toy, isn't it?") == ["a", "dog", "'s", "toy", "is", "n't", "it"]
    assert tokenize("An ICE-CREAM cone.") == ["an", "ice-cream", "cone"]


def test_cider_identical_captions():
    # Two images with disjoint words, so every reference n-gram has df = 1 and weight
    # tf * (log 2 - log 1) = log 2. Candidate == reference -> per-order cosine 1 (clipping changes nothing:
    # min(w, w) * w = w^2), length penalty exp(0) = 1.
    # Image "a": 6 words have 1- to 4-grams -> sims [1, 1, 1, 1] -> 10 * mean = 10.
    # Image "b": "green star" has a unigram and a bigram but no 3/4-grams -> [1, 1, 0, 0] -> 10 * 0.5 = 5.
    # CIDEr-D = (10 + 5) / 2 = 7.5.
    candidates = {"a": "red circle left of blue square", "b": "green star"}
    references = {"a": ["red circle left of blue square"], "b": ["green star"]}
    per_image = cider_d_per_image(candidates, references)
    assert per_image["a"] == pytest.approx(10.0)
    assert per_image["b"] == pytest.approx(5.0)
    assert cider_d(candidates, references) == pytest.approx(7.5)


def test_cider_length_penalty_and_partial_overlap():
    # Image "a": candidate "red circle" vs reference "red circle left of blue square" (w = log 2 everywhere).
    # 1-grams: overlap red, circle -> 2 w^2 / (sqrt(2) w * sqrt(6) w) = 2 / sqrt(12) = 0.577350
    # 2-grams: overlap "red circle" -> w^2 / (w * sqrt(5) w) = 1 / sqrt(5) = 0.447214
    # 3/4-grams: candidate has none -> 0.
    # Lengths (bigram counts): 1 vs 5 -> delta -4 -> penalty exp(-16 / 72) = 0.800737.
    # Score: 10 * (0.577350 + 0.447214) * 0.800737 / 4 = 2.051017.
    candidates = {"a": "red circle", "b": "green star"}
    references = {"a": ["red circle left of blue square"], "b": ["green star"]}
    expected_a = 10 * (2 / math.sqrt(12) + 1 / math.sqrt(5)) * math.exp(-16 / 72) / 4
    assert expected_a == pytest.approx(2.051017, abs=1e-6)
    per_image = cider_d_per_image(candidates, references)
    assert per_image["a"] == pytest.approx(expected_a)
    assert cider_d(candidates, references) == pytest.approx((expected_a + 5.0) / 2)


def test_cider_clipping():
    # Image "a": candidate "red red red" vs reference "red circle" (w = log 2).
    # 1-grams: candidate red -> 3w; reference red -> w, circle -> w.
    #   clipped: min(3w, w) * w = w^2, divided by |c| |r| = 3w * sqrt(2) w -> 1 / (3 sqrt 2) = 0.235702
    #   (unclipped it would be 3 w^2 / (3 sqrt(2) w^2) = 0.7071).
    # 2-grams: "red red" never in the reference -> 0. Lengths 2 vs 1 -> penalty exp(-1 / 72) = 0.986207.
    # Score: 10 * 0.235702 * 0.986207 / 4 = 0.581128.
    candidates = {"a": "red red red", "b": "green star"}
    references = {"a": ["red circle"], "b": ["green star"]}
    expected_a = 10 * (1 / (3 * math.sqrt(2))) * math.exp(-1 / 72) / 4
    assert expected_a == pytest.approx(0.581128, abs=1e-6)
    assert cider_d_per_image(candidates, references)["a"] == pytest.approx(expected_a)


def test_cider_document_frequency_and_multiple_references():
    # "a" has two references; "red" appears in both images' references -> df = 2 -> weight
    # log 2 - log 2 = 0: it contributes nothing anywhere.
    # Image "a": candidate "red circle". Ref 1 "red circle": 1-grams red (0), circle (w): overlap circle
    #   -> w^2 / (w * w) = 1; 2-gram "red circle" (df 1, w) -> 1; penalty 1 -> sims [1, 1, 0, 0].
    #   Ref 2 "blue circle": 1-grams blue w, circle w: overlap circle -> w^2 / (w * sqrt(2) w) = 0.707107;
    #   2-grams: no overlap -> 0; penalty 1 -> [0.707107, 0, 0, 0].
    #   Score: 10 * (2 + 0.707107) / 4 / 2 refs = 3.383883.
    # Image "b": candidate "red star", reference "red star": 1-gram star (w) -> 1, bigram -> 1: score 5.
    candidates = {"a": "red circle", "b": "red star"}
    references = {"a": ["red circle", "blue circle"], "b": ["red star"]}
    expected_a = 10 * (2 + 1 / math.sqrt(2)) / 4 / 2
    per_image = cider_d_per_image(candidates, references)
    assert per_image["a"] == pytest.approx(expected_a)
    assert per_image["b"] == pytest.approx(5.0)


def test_cider_tokenisation_applied():
    # Case and punctuation do not matter: same as the identical-captions case.
    candidates = {"a": "Red circle, left of blue square.", "b": "GREEN STAR!"}
    references = {"a": ["red circle left of blue square"], "b": ["green star"]}
    assert cider_d(candidates, references) == pytest.approx(7.5)


def test_cider_input_errors():
    with pytest.raises(ValueError, match="same ids"):
        cider_d({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d({"a": "x"}, {"a": "x"})
    with pytest.raises(ValueError, match="empty"):
        cider_d({}, {})
