"""Content-addressed, append-only JSONL archive of every LLM request and response.

The key of a request is the SHA-256 of its canonical JSON (model, messages, sampling
parameters), so the same prompt is never sent twice and replay re-derives outputs exactly.
Each record is flushed and fsynced under an exclusive lock (two stages may append at once); a
torn last line from a killed process is ignored on load and cut off by the next append.

One generator per archive: a live stage holds an flock on the archive file itself (so the kernel
lets go when the process dies, however, and a symlink or hard link to the archive reaches the
same lock) for its whole life, and writes who it is into `<archive>.lock`. A second process
waits for it, saying in its log which pid, host and command hold it, so that an orphaned job
(its Snakemake killed) and a rerun never both pay for the same requests, and the two splits'
stages take turns.

Every record is checked when the archive is read (`checked_record`): a record that is not what
this code writes (no key, a JSON list, negative or fractional usage, a line of NULs) stops the
run with one line naming the file and line, and a billed record without usage is charged at its
request's worst case, so an edited archive cannot lower what the budget counts.

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
import re
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

from asclepius_r.errors import InputError

log = logging.getLogger(__name__)


# Chat formatting tokens per message and for the reply's start; OpenAI's chat models use 3-4 and 3.
MESSAGE_OVERHEAD_TOKENS = 8
# What a local server's chat template adds once per request: open models' templates put in a default
# system prompt when a request has none (SmolLM2's makes an empty message 30 tokens; Llama 3.1's dated
# preamble is about as long). A long prompt's bytes cover it; a short one's do not, and the server's
# honest usage would be refused as a lie.
TEMPLATE_PREAMBLE_TOKENS = 64


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

    def worst_case_usage(self) -> dict[str, int]:
        """Tokens no reply to this request can be billed beyond: one prompt token per UTF-8 byte (a
        byte-level BPE token holds at least one byte) plus the chat formatting and a template's
        default system prompt, and `max_tokens`. Spending is reserved at this before sending, and
        charged at it when a reply reports none."""
        size = sum(len(content.encode("utf-8")) for _, content in self.messages)
        return {
            "prompt_tokens": size + MESSAGE_OVERHEAD_TOKENS * (len(self.messages) + 1) + TEMPLATE_PREAMBLE_TOKENS,
            "completion_tokens": self.max_tokens,
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
    usage_estimated: bool = False  # the reply reported no usage: `usage` is the request's worst case
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


@dataclass
class _Hold:
    """An archive this process generates into: its file, open and flocked, shared by the process's
    clients of it (a stage and its rerun in a test), whose appends go through it one at a time."""

    file: BinaryIO
    users: int = 1
    writing: threading.Lock = field(default_factory=threading.Lock)


# (device, inode) of each archive this process holds: the file itself, whatever path names it.
_HELD: dict[tuple[int, int], _Hold] = {}


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def holder_note(path: str | os.PathLike) -> Path:
    """Where the holder of an archive writes who it is, for a process waiting on it."""
    return Path(str(Path(path).resolve()) + ".lock")


def hold_archive(path: str | os.PathLike) -> tuple[int, int]:
    """Hold the archive until `let_go_of_archive(identity)`, waiting (and saying who holds it) if
    busy. The lock is an flock on the archive file itself (created if missing), so a symlink or a
    hard link to it reaches the same lock. Returns the file's identity (device, inode)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")
    status = os.fstat(handle.fileno())
    identity = (status.st_dev, status.st_ino)
    if identity in _HELD:
        _HELD[identity].users += 1
        handle.close()
        return identity
    note = holder_note(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = (note.read_text().strip() if note.exists() else "") or "another process (see `fuser` on the archive)"
        log.warning(
            "the LLM archive %s is in use by %s; waiting for it to finish (two generators on one archive would "
            "send and pay for the same requests twice). If that process is left over from a killed Snakemake "
            "and should not finish, end it (kill PID).",
            path,
            holder,
        )
        fcntl.flock(handle, fcntl.LOCK_EX)
        log.info("the LLM archive %s is free; continuing", path)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    note.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)[:200]})\n")
    _HELD[identity] = _Hold(handle)
    return identity


def let_go_of_archive(identity: tuple[int, int]) -> None:
    held = _HELD.get(identity)
    if held is None:
        return
    held.users -= 1
    if held.users == 0:
        del _HELD[identity]
        held.file.close()  # closing the last descriptor releases the flock


def append_line(path: Path, line: bytes) -> int:
    """Append complete lines durably: exclusive lock, torn-tail repair, write, flush, fsync. Returns
    the offset at which they start. An archive this process holds is written through its held
    file (its flock is the lock); any other file is flocked for the append."""
    held = _HELD.get(_identity(path))
    if held is not None:
        with held.writing:
            return _append(held.file, line)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        try:
            return _append(out, line)
        finally:
            fcntl.flock(out, fcntl.LOCK_UN)


def _append(out, line: bytes) -> int:
    _heal_torn_tail(out)
    start = out.seek(0, os.SEEK_END)
    out.write(line)
    out.flush()
    os.fsync(out.fileno())
    return start


def _heal_torn_tail(out) -> None:
    """Cut off a partial last line left by a killed writer, so the file stays valid JSONL."""
    size = out.seek(0, os.SEEK_END)
    if size == 0 or os.pread(out.fileno(), 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        newline = os.pread(out.fileno(), end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    log.warning("%s: dropping a torn last line (%d bytes)", out.name, size - end)
    os.ftruncate(out.fileno(), end)


def read_records(path: Path):
    """Yield (line number, JSON record) of a JSONL journal, skipping blank lines and a torn last
    line; other damage is an error naming the file and line."""
    for _, number, record in read_records_at(path):
        yield number, record


def read_records_at(path: Path):
    """`read_records` with the byte offset at which each record starts."""
    with open(path, "rb") as lines:
        previous: tuple[int, int, bytes] | None = None
        offset = 0
        for number, raw in enumerate(lines, start=1):
            if previous is not None and previous[2].strip():
                yield previous[0], previous[1], _parse(path, *previous[1:])
            previous = (offset, number, raw)
            offset += len(raw)
        if previous is not None and previous[2].strip():
            start, number, raw = previous
            if raw.endswith(b"\n"):
                yield start, number, _parse(path, number, raw)
            else:  # every record is written with its newline: without one, the write was cut short
                log.warning("%s: ignoring a torn last line (%d bytes)", path, len(raw))


def _parse(path: Path, number: int, raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise damaged(path, number, "not valid JSON") from None


def damaged(path: Path, number: int, what: str) -> InputError:
    return InputError(
        f"{path}:{number}: {what}; the file is damaged or was edited (restore it from a copy, or delete "
        "that line: the request it held is then sent, and paid for, again)"
    )


STATUSES = ("ok", "failed", "retry")
KEY = re.compile(r"[0-9a-f]{64}")
TOKEN_COUNTS = ("prompt_tokens", "completion_tokens")


def checked_record(path: Path, number: int, record) -> tuple[bytes, str, dict]:
    """An archive record's key digest, status and billed usage (empty if none: a failure), after
    checking every field this code reads. The usage is re-validated like a reply's (whole,
    non-negative counts); a billed record without it is charged at its request's worst case."""
    if not isinstance(record, dict):
        raise damaged(path, number, "not a JSON object")
    key, request, result = record.get("key"), record.get("request"), record.get("result")
    if not (isinstance(key, str) and KEY.fullmatch(key)):
        raise damaged(path, number, "its key is not a SHA-256 in hex")
    if not isinstance(request, dict) or not isinstance(request.get("model"), str):
        raise damaged(path, number, "its request has no model")
    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        raise damaged(path, number, "its result has no status (ok, failed or retry)")
    for name in ("text", "error", "finish_reason"):
        if not isinstance(result.get(name), str | None):
            raise damaged(path, number, f"its result's {name} is not text")
    usage = result.get("usage") or {}
    if not isinstance(usage, dict) or not isinstance(result.get("provider") or {}, dict):
        raise damaged(path, number, "its result's usage or provider is not an object")
    counts = {name: usage[name] for name in TOKEN_COUNTS if name in usage}
    if any(type(value) is not int or value < 0 for value in counts.values()):
        raise damaged(path, number, "its usage is not a whole, non-negative token count")
    if result["status"] != "failed" and len(counts) < len(TOKEN_COUNTS):
        counts = _worst_case(path, number, request)
    return bytes.fromhex(key), result["status"], counts if result["status"] != "failed" else {}


def _worst_case(path: Path, number: int, request: dict) -> dict[str, int]:
    try:
        messages = tuple((role, content) for role, content in request["messages"])
        rebuilt = ChatRequest(request["model"], messages, max_tokens=request["max_tokens"])
        if not all(isinstance(part, str) for pair in messages for part in pair) or type(rebuilt.max_tokens) is not int:
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise damaged(path, number, "a billed record without usage, whose request is incomplete") from None
    return rebuilt.worst_case_usage()


class Archive:
    """The JSONL archive at `path` (in memory only when None): the last final record per key wins.

    In memory it keeps an index, not the records: a dict from each key's SHA-256 digest to where
    its last final record starts in the file (times 2, plus 1 if it is a success), about 180 bytes
    a request whatever the notes and answers hold, so a 57k-note archive (two requests a note)
    costs about 20 MB; `get` reads the one record it needs back from the file.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.index: dict[bytes, int] = {}
        self.lines: list[bytes] = []  # the records of an archive without a file
        self.billed_retries = 0
        # (model, batch) -> tokens of every billed response archived, for the budget across runs
        self.billed: dict[tuple[str, bool], Counter] = defaultdict(Counter)
        self._reader = None
        if self.path and self.path.exists():
            for offset, number, record in read_records_at(self.path):
                self._note(record, offset, checked_record(self.path, number, record))

    def _note(self, record: dict, where: int, checked: tuple[bytes, str, dict]) -> None:
        digest, status, usage = checked
        if usage:
            self.billed[(record["request"]["model"], "batch" in (record["result"].get("provider") or {}))].update(usage)
        if status == "retry":
            self.billed_retries += 1
        else:
            self.index[digest] = where << 1 | (status == "ok")

    def __len__(self) -> int:
        return len(self.index)

    def answered(self) -> int:
        """How many keys have a success."""
        return sum(entry & 1 for entry in self.index.values())

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
        for entry in sorted(self.index.values()):
            record = self._record(entry)
            yield record["key"], record["result"]

    def get(self, request: ChatRequest, include_failed: bool = False) -> ChatResult | None:
        """The archived outcome: successes always; recorded failures only when asked (replay)."""
        entry = self.index.get(bytes.fromhex(request.key))
        if entry is None or not (entry & 1 or include_failed):
            return None
        return ChatResult.from_record(self._record(entry)["result"])

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
                self._note(record, len(self.lines) - 1, checked_record(Path("(in memory)"), len(self.lines), record))
            return
        where = append_line(self.path, b"".join(lines))
        for number, (record, line) in enumerate(zip(records, lines)):
            self._note(record, where, checked_record(self.path, number, record))
            where += len(line)
