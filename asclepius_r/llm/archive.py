"""Content-addressed, append-only JSONL archive of every LLM request and response.

The key of a request is the SHA-256 of its canonical JSON (model, messages, sampling
parameters), so the same prompt is never sent twice and replay re-derives outputs exactly.
Each record is flushed and fsynced under an exclusive lock (two stages may append at once); a
torn last line from a killed process is ignored on load and cut off by the next append.

One generator per archive: a live stage holds `<archive>.lock` (an flock, so the kernel lets go
when the process dies, however) for its whole life. A second process waits for it, saying in its
log which pid, host and command hold it, so that an orphaned job (its Snakemake killed) and a
rerun never both pay for the same requests, and the two splits' stages take turns.

Record statuses: `ok` (a usable response, reused forever), `failed` (attempts ran out; a live
rerun tries again, replay reproduces the failure) and `retry` (a billed response that was not
usable, e.g. finish_reason `length`; kept for audit and accounting, never reused).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from asclepius_r.errors import InputError
from asclepius_r.llm.digest_index import DigestIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request. `meta` (note ROW_ID, phase) is provenance, not identity."""

    model: str
    messages: tuple[tuple[str, str], ...]
    temperature: float = 1.0
    max_tokens: int = 512
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def identity(self) -> dict:
        return {
            "model": self.model,
            "messages": [list(m) for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def describe(self) -> str:
        """Names the request by key and provenance only: safe to log (no note text)."""
        where = ", ".join(f"{k}={v}" for k, v in sorted(self.meta.items()))
        return f"request {self.key[:12]} ({where or 'no metadata'})"


@dataclass
class ChatResult:
    key: str
    status: str  # "ok", "failed" or "retry" (see the module docstring)
    text: str | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    error: str | None = None
    provider: dict = field(default_factory=dict)  # model, deployment, api_version, system_fingerprint, id, batch
    attempts: int = 0
    started: float = 0.0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_record(cls, result: dict) -> ChatResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in result.items() if k in known})


# Archive lock files this process holds -> [open file, users]: two clients of one archive in one
# process (a stage and its rerun in a test) share the hold; other processes wait.
_HELD: dict[Path, list] = {}


def hold_archive(path: str | os.PathLike) -> None:
    """Hold the archive's lock until `let_go_of_archive`, waiting (and saying who holds it) if busy."""
    lock = Path(str(path) + ".lock").resolve()
    if lock in _HELD:
        _HELD[lock][1] += 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        log.warning(
            "the LLM archive %s is in use by %s; waiting for it to finish (two generators on one archive would "
            "send and pay for the same requests twice). If that process is left over from a killed Snakemake "
            "and should not finish, end it (kill PID).",
            path,
            holder,
        )
        fcntl.flock(handle, fcntl.LOCK_EX)
        log.info("the LLM archive %s is free; continuing", path)
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)[:200]})\n")
    handle.flush()
    _HELD[lock] = [handle, 1]


def let_go_of_archive(path: str | os.PathLike) -> None:
    lock = Path(str(path) + ".lock").resolve()
    held = _HELD.get(lock)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[lock]
        held[0].close()  # closing the last descriptor releases the flock


def append_line(path: Path, line: bytes) -> int:
    """Append complete lines durably: exclusive lock, torn-tail repair, write, flush, fsync. Returns
    the offset at which they start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        try:
            _heal_torn_tail(out)
            start = out.seek(0, os.SEEK_END)
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        finally:
            fcntl.flock(out, fcntl.LOCK_UN)
    return start


def _heal_torn_tail(out) -> None:
    """Cut off a partial last line left by a killed writer, so the file stays valid JSONL."""
    size = out.seek(0, os.SEEK_END)
    if size == 0:
        return
    end = size
    with open(out.name, "rb") as check:
        check.seek(size - 1)
        if check.read(1) == b"\n":
            return
        while end > 0:
            start = max(0, end - (1 << 16))
            check.seek(start)
            newline = check.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
    log.warning("%s: dropping a torn last line (%d bytes)", out.name, size - end)
    os.ftruncate(out.fileno(), end)


def read_records(path: Path):
    """Yield the JSON records of a JSONL journal, skipping a torn last line; other damage is an error."""
    for _, record in read_records_at(path):
        yield record


def read_records_at(path: Path):
    """`read_records` with the byte offset at which each record starts."""
    with open(path, "rb") as lines:
        previous: tuple[int, int, bytes] | None = None
        offset = 0
        for number, raw in enumerate(lines, start=1):
            if previous is not None:
                yield previous[0], _parse(path, *previous[1:])
            previous = (offset, number, raw)
            offset += len(raw)
        if previous is not None:
            start, number, raw = previous
            if raw.endswith(b"\n"):
                yield start, _parse(path, number, raw)
            else:  # every record is written with its newline: without one, the write was cut short
                log.warning("%s: ignoring a torn last line (%d bytes)", path, len(raw))


def _parse(path: Path, number: int, raw: bytes) -> dict | None:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path}:{number}: not valid JSON; the archive is damaged") from None


class Archive:
    """The JSONL archive at `path` (in memory only when None): the last final record per key wins.

    In memory it keeps an index, not the records: for each key's SHA-256 digest, where its last
    final record starts in the file (times 2, plus 1 if it is a success), under 40 bytes a request
    whatever the notes and answers hold (digest_index.py), so a 57k-note archive costs ~5 MB; `get`
    reads the one record it needs back from the file and checks its key.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.index = DigestIndex()
        self.lines: list[bytes] = []  # the records of an archive without a file
        self.billed_retries = 0
        # (model, batch) -> tokens of every billed response archived, for the budget across runs
        self.billed: dict[tuple[str, bool], Counter] = defaultdict(Counter)
        self._reader = None
        if self.path and self.path.exists():
            for offset, record in read_records_at(self.path):
                if record is not None:
                    self._note(record, offset)

    def _note(self, record: dict, where: int) -> None:
        result = record["result"]
        if result.get("usage"):
            self.billed[(record["request"]["model"], "batch" in (result.get("provider") or {}))].update(result["usage"])
        if result["status"] == "retry":
            self.billed_retries += 1
        else:
            self.index[bytes.fromhex(record["key"])] = where << 1 | (result["status"] == "ok")

    def __len__(self) -> int:
        return len(self.index)

    def answered(self) -> int:
        """How many keys have a success."""
        return int((self.index.values() & 1).sum())

    def _record(self, entry: int) -> dict:
        where = entry >> 1
        if self.path is None:
            return json.loads(self.lines[where])
        if self._reader is None:
            self._reader = open(self.path, "rb")  # appends go through other handles; this one only reads
        self._reader.seek(where)
        return json.loads(self._reader.readline())

    def results(self):
        """Yield (key, result record) for every key, its last final record, in the file's order."""
        for entry in np.sort(self.index.values()).tolist():
            record = self._record(entry)
            yield record["key"], record["result"]

    def get(self, request: ChatRequest, include_failed: bool = False) -> ChatResult | None:
        """The archived outcome: successes always; recorded failures only when asked (replay)."""
        entry = self.index.get(bytes.fromhex(request.key))
        if entry is None or not (entry & 1 or include_failed):
            return None
        record = self._record(entry)
        if record["key"] != request.key:  # another key with the same first 8 bytes (digest_index.py)
            return None
        return ChatResult.from_record(record["result"])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def append(self, request: ChatRequest, result: ChatResult) -> None:
        self.append_many([(request, result)])

    def append_many(self, pairs: list[tuple[ChatRequest, ChatResult]]) -> None:
        """Append several records with one lock and one fsync (group commit); index them once written."""
        records, lines = [], []
        for request, result in pairs:
            record = {
                "key": request.key,
                "request": request.identity(),
                "meta": request.meta,
                "result": asdict(result),
                "archived": time.time(),
            }
            records.append(record)
            lines.append((json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        if self.path is None:
            for record, line in zip(records, lines):
                self.lines.append(line)
                self._note(record, len(self.lines) - 1)
            return
        where = append_line(self.path, b"".join(lines))
        for record, line in zip(records, lines):
            self._note(record, where)
            where += len(line)
