"""VQA accuracy (VQAv2's metric) with the official answer normalisation.

Accuracy of one prediction against the (usually 10) human answers: for each way of leaving one human
out, the prediction scores min(#remaining humans who gave it / 3, 1); the result is the mean over those
leave-one-out subsets. So a prediction that 3 or more of 10 humans gave scores 1 (if exactly 3: 0.9),
2 humans: 0.6, 1 human: 0.3.

Normalisation follows the official evaluation script (`processPunctuation`, `processDigitArticle`):
punctuation is deleted (or replaced by a space when it sits inside a word, e.g. "ice-cream" ->
"ice cream"), commas inside numbers go ("1,000" -> "1000"), a period not followed by a digit goes
("yes." -> "yes", "3.5" stays), text is lowercased, number words become digits ("two" -> "2"), the
articles a/an/the are dropped, and apostrophe-less contractions get their apostrophe ("dont" -> "don't").

One deliberate difference: the official script normalises only when the humans disagree (more than one
distinct answer) and otherwise compares raw strings. We always normalise both sides, which differs only
when all answers are identical and not already normal (e.g. ten "two" vs a prediction "2": official 0,
here 1); on VQAv2 the human answers are already lowercase so this is rare.
"""

from __future__ import annotations

import re
from typing import Sequence

# Apostrophe-less spellings of contractions -> their standard form (the official script's table).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# "(?!<=\d)" in the official pattern is a typo for a lookbehind and matches nothing special: the effect is
# "a period not followed by a digit". The official call passes re.UNICODE (= 32) as the count argument,
# so at most 32 periods are removed; we keep that for identical results.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = 32


def normalize_punctuation(text: str) -> str:
    """The official `processPunctuation`."""
    out = text
    for mark in PUNCTUATION:
        # A mark next to a space (or any comma inside a number in the text) is deleted; one inside a
        # word becomes a space.
        if (mark + " " in text or " " + mark in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def normalize_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Whitespace cleanup, then punctuation, then digits/articles/contractions (the official order)."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] of one predicted answer against the human answers (module docstring)."""
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of str (the human answers), got {answers!r}")
    predicted = normalize_answer(prediction)
    humans = [normalize_answer(answer) for answer in answers]
    if len(humans) == 1:  # nobody to leave out: plain min(matches / 3, 1)
        return min(1.0, float(humans[0] == predicted) / 3.0)
    matches = sum(human == predicted for human in humans)
    total = 0.0
    for left_out in humans:
        others_matching = matches - (left_out == predicted)
        total += min(1.0, others_matching / 3.0)
    return total / len(humans)
