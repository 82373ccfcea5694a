"""A map from SHA-256 digests to non-negative integers in two flat arrays, for the archive's index.

A dict of 32-byte keys to ints costs about 140 bytes an entry (two objects and a slot), which a
paper-size archive (two requests a note, 57k notes, more across reruns) pays for the whole
stage. Here an entry is a slot of two 8-byte array cells, kept at most half full: under 40 bytes.
Slots are keyed by the digest's first 8 bytes (uniform, as any part of a SHA-256 digest) with
linear probing. Two digests that share those 8 bytes (about one chance in 10^10 at a million
entries) share a slot: the caller checks the full key of what it finds, so such a pair costs a
request sent twice, never a wrong answer.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1


class DigestIndex:
    FIRST_SLOTS = 1024

    def __init__(self):
        self.keys = np.zeros(self.FIRST_SLOTS, np.uint64)
        self.slots = np.full(self.FIRST_SLOTS, EMPTY, np.int64)  # the value, or EMPTY
        self.size = 0

    @staticmethod
    def _key(digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little")

    def _slot(self, key: int) -> int:
        """The slot holding `key`, or the empty one where it would go."""
        mask = len(self.keys) - 1
        slot = key & mask
        while self.slots[slot] != EMPTY and int(self.keys[slot]) != key:
            slot = (slot + 1) & mask
        return slot

    def __len__(self) -> int:
        return self.size

    def get(self, digest: bytes) -> int | None:
        value = int(self.slots[self._slot(self._key(digest))])
        return None if value == EMPTY else value

    def __setitem__(self, digest: bytes, value: int) -> None:
        if value < 0:
            raise ValueError(f"DigestIndex holds non-negative integers, not {value}")
        key = self._key(digest)
        slot = self._slot(key)
        if self.slots[slot] == EMPTY:
            if 2 * (self.size + 1) > len(self.keys):
                self._grow()
                slot = self._slot(key)
            self.size += 1
        self.keys[slot], self.slots[slot] = key, value

    def values(self) -> np.ndarray:
        return self.slots[self.slots != EMPTY]

    def _grow(self) -> None:
        used = self.slots != EMPTY
        keys, values = self.keys[used].tolist(), self.slots[used].tolist()
        self.keys = np.zeros(2 * len(self.keys), np.uint64)
        self.slots = np.full(len(self.keys), EMPTY, np.int64)
        for key, value in zip(keys, values):
            slot = self._slot(key)
            self.keys[slot], self.slots[slot] = key, value
