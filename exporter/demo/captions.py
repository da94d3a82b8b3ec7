"""The demo's captions: several phrasings per digit in the project's own words, some held out for evaluation.

Training draws a random TRAIN phrasing for every image at every step; the yardstick prompts the pipeline with the
HELDOUT phrasings only, which recombine the training words in orders training never showed (so class accuracy
measures whether the text encoder learned the digit, not the sentence). The tokenizer's vocabulary is learned
from the training captions alone; every held-out word is a training word (checked by `vocabulary_gap`).
"""

from __future__ import annotations

import re

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN = (
    "a handwritten {word}",
    "the digit {n}",
    "number {word}, thick strokes",
    "the number {word}",
    "digit {word}",
    "{n}",
    "a {word} drawn by hand",
    "handwritten digit {n}",
    "a white {word} on black",
    "the numeral {n}, thin strokes",
)

HELDOUT = (
    "a handwritten number {n}",
    "the digit {word}, drawn by hand",
    "{word}",
    "number {n} on black",
)


def caption(template: str, label: int) -> str:
    return template.format(word=NAMES[label], n=label)


def heldout_prompts(labels: list[int]) -> list[str]:
    """One held-out phrasing per label, cycling through HELDOUT with the label's occurrence count, so that each
    class is prompted with every held-out phrasing equally often."""
    seen: dict[int, int] = {}
    out = []
    for label in labels:
        k = seen.get(label, 0)
        seen[label] = k + 1
        out.append(caption(HELDOUT[k % len(HELDOUT)], int(label)))
    return out


def training_captions() -> list[str]:
    """Every training caption (10 digits x the TRAIN phrasings), in a fixed order: the pipeline's prompts.txt."""
    return [caption(t, d) for t in TRAIN for d in range(len(NAMES))]


def words(texts: list[str]) -> list[str]:
    """CLIP's pre-tokenisation of lower-cased text, for ASCII captions: words, single digits, punctuation."""
    return [w for t in texts for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", t.lower())]


def vocabulary_gap() -> set[str]:
    """Held-out words the training captions never use (empty: the held-out phrasings only recombine)."""
    heldout = {w for t in HELDOUT for d in range(len(NAMES)) for w in words([caption(t, d)])}
    return heldout - set(words(training_captions()))
