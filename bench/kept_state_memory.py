"""Bytes the instruction stage keeps per request and per question, against the layouts before.

What a note leaves behind for later notes: its two requests in the archive's index (a SHA-256
digest -> file offset) and its accepted question in the pool of its task. Each layout is filled
with the same entries under tracemalloc; the baseline is the layout the stage used before (a
dict of digests, a list of str). The near-duplicate filter has its own bench
(bench/near_duplicate_filter.py --memory).

    python bench/kept_state_memory.py --notes 57000

Last line: RESULT index_bytes_per_request=<b> baseline=<b> pool_bytes_per_question=<b> baseline=<b>
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asclepius_r.instructions.generate import _Texts  # noqa: E402
from asclepius_r.llm.digest_index import DigestIndex  # noqa: E402


def traced_bytes(fill) -> int:
    """Bytes still allocated after `fill()` builds and returns its container."""
    tracemalloc.start()
    try:
        kept = fill()
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return size


def fill_index(container, keys: list[str]):
    for offset, key in enumerate(keys):
        # as the archive indexes a record: its hex key read back as a digest, where it starts, answered
        container[bytes.fromhex(key)] = (offset * 3000) << 1 | 1
    return container


def fill_pool(container, questions: list[bytes]):
    for question in questions:
        container.append(question.decode())  # a new str, as each answer brings one
    return container


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=57000)
    args = parser.parse_args(argv)
    requests = 2 * args.notes
    keys = [hashlib.sha256(f"request {i}".encode()).hexdigest() for i in range(requests)]
    rng = random.Random(0)
    words = [f"term{i:04d}" for i in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in the stage bench
    questions = [
        ("What " + " ".join(rng.choices(words, weights, k=rng.randint(5, 13))) + "?").encode()
        for _ in range(args.notes)
    ]
    index = traced_bytes(lambda: fill_index(DigestIndex(), keys)) / requests
    index_before = traced_bytes(lambda: fill_index({}, keys)) / requests
    pool = traced_bytes(lambda: fill_pool(_Texts(), questions)) / args.notes
    pool_before = traced_bytes(lambda: fill_pool([], questions)) / args.notes
    print(f"{requests} requests in the archive's index: {index:.0f} bytes each (dict of digests: {index_before:.0f})")
    print(f"{args.notes} pool questions: {pool:.0f} bytes each (list of str: {pool_before:.0f})")
    print(
        f"RESULT index_bytes_per_request={index:.0f} baseline={index_before:.0f} "
        f"pool_bytes_per_question={pool:.0f} baseline={pool_before:.0f}"
    )


if __name__ == "__main__":
    main()
