"""CIDEr-D (Vedantam et al. 2015), as computed by the COCO caption evaluation code (pycocoevalcap).

For every image, the candidate and each reference become TF-IDF vectors of their n-grams, n = 1..4:
weight(g) = count(g) * (log(#images) - log(max(1, df(g)))), where df(g) is the number of images whose
reference set contains g (document frequencies come from the references only). Per n:

    sim_n(c, r) = sum_g min(w_c(g), w_r(g)) * w_r(g) / (|w_c| |w_r|)      (clipped, "-D")
                  * exp(-(len_c - len_r)^2 / (2 * 6^2))                     (Gaussian length penalty)

(|w| is the L2 norm of the n-gram weights; a side with no n-grams of that order gives 0). An image's score
is 10 * mean_n(sum_r sim_n(c, r)) / #refs, and CIDEr-D is the mean over images. As in pycocoevalcap the
"length" in the penalty counts the bigrams of a sentence (words - 1); the difference of lengths is the
same as with words except for one-word sentences.

Tokenisation approximates the PTB tokenizer the COCO code runs (Stanford CoreNLP): lowercase, split
clitics ("dog's" -> "dog 's", "don't" -> "do n't"), split punctuation off words and drop punctuation
tokens (. , ? ! : ; ' " ( ) etc.); inner hyphens and decimal points stay ("ice-cream", "3.5"). Tokenisation is applied to candidates and references alike.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

MAX_N = 4
SIGMA = 6.0

_CLITICS = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Words keep inner hyphens ("ice-cream") and decimal points ("3.5"), as PTB does; clitics are their own tokens.
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+|\.[0-9]+|'[a-z]+)*|n't|'(?:s|re|ve|ll|d|m)\b")


def tokenize(text: str) -> list[str]:
    """PTB-like tokens of a caption (see the module docstring); punctuation is dropped."""
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}")
    text = _CLITICS.sub(r" \1", text.lower())
    return _WORD.findall(text)


def _ngram_counts(words: Sequence[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, MAX_N + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start:start + n])] += 1
    return counts


def _tfidf(counts: Counter, df: Counter, log_num_images: float):
    """-> (per-order weight dicts, per-order L2 norms, length = number of bigrams as in pycocoevalcap)."""
    vectors = [dict() for _ in range(MAX_N)]
    norms = [0.0] * MAX_N
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = tf * (log_num_images - math.log(max(1.0, df[gram])))
        vectors[order][gram] = weight
        norms[order] += weight * weight
        if order == 1:
            length += tf
    return vectors, [math.sqrt(x) for x in norms], length


def _similarity(cand, ref) -> list[float]:
    (vec_c, norm_c, len_c), (vec_r, norm_r, len_r) = cand, ref
    penalty = math.exp(-((len_c - len_r) ** 2) / (2 * SIGMA**2))
    scores = []
    for order in range(MAX_N):
        value = sum(min(w, vec_r[order].get(g, 0.0)) * vec_r[order].get(g, 0.0) for g, w in vec_c[order].items())
        if norm_c[order] != 0 and norm_r[order] != 0:
            value /= norm_c[order] * norm_r[order]
        scores.append(value * penalty)
    return scores


def _check_inputs(candidates: Mapping, references: Mapping) -> None:
    if not isinstance(candidates, Mapping) or not isinstance(references, Mapping):
        raise TypeError("candidates and references must be dicts: id -> str and id -> [str]")
    if not candidates:
        raise ValueError("candidates is empty")
    if set(candidates) != set(references):
        missing = sorted(map(str, set(candidates) - set(references)))[:5]
        extra = sorted(map(str, set(references) - set(candidates)))[:5]
        raise ValueError(f"candidates and references need the same ids; only in candidates: {missing}, "
                         f"only in references: {extra}")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"references[{key!r}] must be a non-empty list of str, got {refs!r}")


def cider_d_per_image(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> dict:
    """CIDEr-D of each image: id -> score (the corpus score is their mean)."""
    _check_inputs(candidates, references)
    ref_counts = {key: [_ngram_counts(tokenize(r)) for r in refs] for key, refs in references.items()}
    df: Counter = Counter()
    for counts in ref_counts.values():
        df.update(set().union(*(c.keys() for c in counts)))
    log_num_images = math.log(float(len(references)))
    scores = {}
    for key, text in candidates.items():
        cand = _tfidf(_ngram_counts(tokenize(text)), df, log_num_images)
        total = [0.0] * MAX_N
        for counts in ref_counts[key]:
            sims = _similarity(cand, _tfidf(counts, df, log_num_images))
            total = [t + s for t, s in zip(total, sims)]
        scores[key] = 10.0 * (sum(total) / MAX_N) / len(ref_counts[key])
    return scores


def cider_d(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> float:
    """Corpus CIDEr-D (x10 scale as in the COCO code, so a perfect match of a long caption scores 10):
    candidates id -> generated caption, references id -> list of reference captions."""
    per_image = cider_d_per_image(candidates, references)
    return sum(per_image.values()) / len(per_image)
