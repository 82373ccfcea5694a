"""Content-addressed, append-only JSONL archive of every LLM request and response.

The key of a request is the SHA-256 of its canonical JSON (model, messages, sampling
parameters), so the same prompt is never sent twice and replay re-derives outputs exactly.
Each record is flushed and fsynced under an exclusive lock; a torn last line from a killed
process is ignored on load and overwritten cleanly by the next append.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        return {"model": self.model, "messages": [list(m) for m in self.messages],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in sorted(self.meta.items()))
        return f"request {self.key[:12]} ({where or 'no metadata'})"


@dataclass
class ChatResult:
    key: str
    status: str  # "ok" or "failed"
    text: str | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    error: str | None = None
    provider: dict = field(default_factory=dict)  # model, deployment, api_version, system_fingerprint
    attempts: int = 0
    started: float = 0.0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Archive:
    """The JSONL archive at `path`: last record per key wins; only 'ok' records are reused."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict] = {}
        if self.path and self.path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as lines:
            raw_lines = lines.read().split(b"\n")
        for number, raw in enumerate(raw_lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                if number == len(raw_lines):  # a torn final write from a killed run
                    log.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(raw))
                    continue
                raise ValueError(f"{self.path}:{number}: not valid JSON; the archive is damaged") from None
            self.records[record["key"]] = record

    def get(self, request: ChatRequest) -> ChatResult | None:
        record = self.records.get(request.key)
        if record is None or record["result"]["status"] != "ok":
            return None
        return ChatResult(**record["result"])

    def failed_attempts(self, request: ChatRequest) -> int:
        record = self.records.get(request.key)
        return record["result"]["attempts"] if record and record["result"]["status"] != "ok" else 0

    def append(self, request: ChatRequest, result: ChatResult) -> None:
        record = {"key": request.key, "request": request.identity(), "meta": request.meta,
                  "result": asdict(result), "archived": time.time()}
        self.records[request.key] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with open(self.path, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            try:
                self._heal_torn_tail(out)
                out.write(line)
                out.flush()
                os.fsync(out.fileno())
            finally:
                fcntl.flock(out, fcntl.LOCK_UN)

    @staticmethod
    def _heal_torn_tail(out) -> None:
        """Cut off a partial last line left by a killed writer, so the file stays valid JSONL."""
        size = out.seek(0, os.SEEK_END)
        end = size
        with open(out.name, "rb") as check:
            while end > 0:
                start = max(0, end - (1 << 16))
                check.seek(start)
                chunk = check.read(end - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
        if end != size:
            log.warning("%s: dropping a torn last line (%d bytes)", out.name, size - end)
            os.ftruncate(out.fileno(), end)
