"""ROUGE-L F-measure (longest common subsequence over lower-cased word tokens).

Written out rather than imported: the reference package pulls in nltk for a 20-line algorithm.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _lcs_length(a, b) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """F1 of ROUGE-L between two texts; 0.0 when either is empty."""
    return rouge_l_of_tokens(tokens(candidate), tokens(reference))


def rouge_l_of_tokens(c, r) -> float:
    """`rouge_l` of two token sequences (words, or any equality-comparable codes of them)."""
    if not c or not r:
        return 0.0
    lcs = _lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
