"""The Batch API mode (OpenAI and Azure OpenAI): the same requests at about half the price.

Requests not in the archive are written as JSONL (one line per request, `custom_id` = archive
key), uploaded, and run as batches of at most `llm.batch_max_requests` lines and
`llm.batch_max_bytes` bytes. Results come back in any order and go into the same archive as
online responses, so online, batch and replay runs are interchangeable. Unusable lines
(errors, `length` / `content_filter` finish reasons, lines a batch never returned) are retried
in a further batch until `llm.max_attempts`, then recorded as failed.

A journal next to the archive (`<archive>.batches.jsonl`) records every submitted batch before
the run waits on it, so a rerun after a crash resumes polling that batch instead of paying for
it again. Batch input files hold the prompts, that is the notes: they stay on the provider's
side until deleted, which this module does after collecting (`llm.batch_delete_files`), and at
once when the batch cannot be created. Each is named after its archive, so that input files an
earlier run could not delete (killed, network down) are found by name and removed at the start
of the next run (with `llm.batch_delete_files`), unless a batch in the journal still waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

from asclepius_r.llm.archive import ChatRequest, append_line, read_records
from asclepius_r.llm.backends import RetryableError, result_from_payload
from asclepius_r.llm.guard import refusal

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")


def warn_provider_storage(settings) -> None:
    """Said once per client, before anything is uploaded."""
    log.warning(
        "llm.mode is 'batch': each batch input file holds the prompts, i.e. the notes, and is stored on the "
        "provider's side (files API) until deleted. This run deletes input and output files after collecting "
        "them%s; check that the endpoint's data-retention terms cover stored files.",
        "" if settings.batch_delete_files else " only if llm.batch_delete_files is true (it is false)",
    )


def input_file_name(archive_path: Path | None) -> str:
    """The provider-side name of this archive's batch input files (one generator per archive)."""
    if archive_path is None:
        return "asclepius-batch.jsonl"
    tag = hashlib.sha256(str(Path(archive_path).resolve()).encode()).hexdigest()[:12]
    return f"asclepius-batch-{tag}.jsonl"


class BatchJournal:
    """Submitted and collected batches, appended durably like the archive."""

    def __init__(self, archive_path: Path | None):
        self.path = archive_path.with_name(archive_path.name + ".batches.jsonl") if archive_path else None
        self.open: dict[str, dict] = {}
        if self.path and self.path.exists():
            for record in read_records(self.path):
                if record is None:
                    continue
                if record["event"] == "submitted":
                    self.open[record["batch_id"]] = record
                else:
                    self.open.pop(record["batch_id"], None)

    def _write(self, record: dict) -> None:
        if self.path:
            append_line(self.path, (json.dumps(record, sort_keys=True) + "\n").encode())

    def submitted(self, batch_id: str, input_file_id: str, keys: list[str]) -> None:
        record = {
            "event": "submitted",
            "batch_id": batch_id,
            "input_file_id": input_file_id,
            "keys": keys,
            "time": time.time(),
        }
        self.open[batch_id] = record
        self._write(record)

    def collected(self, batch_id: str, status: str) -> None:
        self.open.pop(batch_id, None)
        self._write({"event": "collected", "batch_id": batch_id, "status": status, "time": time.time()})


class BatchRunner:
    """Runs one list of requests through batches, with the client's archive, accounting and budget."""

    def __init__(self, client):
        self.client = client
        self.settings = client.settings
        self.backend = client.backend
        self.api = client.backend.client
        self.journal = BatchJournal(client.archive.path)
        self.input_name = input_file_name(client.archive.path)

    async def run(self, requests: list[ChatRequest], weights: dict[str, int]) -> list:
        """One result per request (None if the budget left it unsent); `weights` advance the bar."""
        self.weights = weights
        todo = {r.key: r for r in requests}
        attempts = dict.fromkeys(todo, 0)
        last_error: dict[str, tuple[str, str]] = {}
        results: dict[str, object] = {}
        if self.journal.path is not None and self.settings.batch_delete_files:
            await self._remove_leftovers()
        while todo and not self.client._budget_hit:
            waiting = {bid: rec for bid, rec in self.journal.open.items() if set(rec["keys"]) & todo.keys()}
            in_flight = {k for rec in waiting.values() for k in rec["keys"]}
            if waiting:
                log.info("resuming %d batch(es) submitted by an earlier run", len(waiting))
            affordable, reserved = [], 0.0
            for request in (r for k, r in todo.items() if k not in in_flight):
                worst = self.client.worst_case_cost(request, batch=True)
                if not self.client.reserve(worst):  # the budget stops here; what was chosen still runs
                    break
                affordable.append(request)
                reserved += worst
            for chunk in self._chunks(affordable):
                batch_id = await self._submit(chunk)
                waiting[batch_id] = self.journal.open[batch_id]
            if not waiting:
                break
            for batch_id in waiting:
                await self._collect(batch_id, await self._wait(batch_id), todo, attempts, last_error, results)
            self.client.release(reserved)  # the real usage is accounted by now
            for key in [k for k in todo if attempts[k] >= self.settings.max_attempts]:
                kind, error = last_error.get(key, ("batch_missing", "not returned by the batch"))
                results[key] = self.client.record_failure(todo.pop(key), kind, error, attempts[key], time.time())
                self.client._advance(self.weights[key])
        return [results.get(r.key) for r in requests]

    def _line(self, request: ChatRequest) -> bytes:
        line = {
            "custom_id": request.key,
            "method": "POST",
            "url": self.backend.batch_endpoint,
            "body": self.backend.body(request),
        }
        return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    def _chunks(self, requests: list[ChatRequest]):
        chunk, size = [], 0
        for request in requests:
            line = self._line(request)
            if chunk and (
                len(chunk) >= self.settings.batch_max_requests or size + len(line) > self.settings.batch_max_bytes
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append((request, line))
            size += len(line)
        if chunk:
            yield chunk

    async def _remove_leftovers(self) -> None:
        """Delete this archive's input files that no batch in the journal waits on."""
        waited_on = {record["input_file_id"] for record in self.journal.open.values()}
        try:
            leftovers = [
                f.id
                async for f in self.api.files.list(purpose="batch")
                if f.filename == self.input_name and f.id not in waited_on
            ]
        except self.backend.openai.APIConnectionError as err:
            if refusal(err):
                raise refusal(err) from None
            raise
        if leftovers:
            log.warning("deleting %d batch input file(s) an earlier run left on the provider", len(leftovers))
            for file_id in leftovers:
                await self._call(lambda file_id=file_id: self.api.files.delete(file_id))

    async def _submit(self, chunk: list[tuple[ChatRequest, bytes]]) -> str:
        data = b"".join(line for _, line in chunk)
        upload = await self._call(lambda: self.api.files.create(file=(self.input_name, data), purpose="batch"))
        try:
            batch = await self._call(
                lambda: self.api.batches.create(
                    input_file_id=upload.id, endpoint=self.backend.batch_endpoint, completion_window="24h"
                )
            )
        except BaseException:
            # No batch will ever read it: the notes in it go now (or, if this fails too, at the next run).
            with contextlib.suppress(Exception):
                await self._call(lambda: self.api.files.delete(upload.id))
            raise
        self.journal.submitted(batch.id, upload.id, [r.key for r, _ in chunk])
        self.client.counts["batches_submitted"] += 1
        log.info("submitted batch %s: %d requests, %.1f MB", batch.id, len(chunk), len(data) / 1e6)
        return batch.id

    async def _wait(self, batch_id: str):
        while True:
            batch = await self._call(lambda: self.api.batches.retrieve(batch_id))
            if self.client.bar is not None and batch.request_counts is not None:
                counts = batch.request_counts
                self.client.bar.set_postfix(
                    batch=batch.status, done=f"{counts.completed + counts.failed}/{counts.total}"
                )
            if batch.status in TERMINAL:
                return batch
            await asyncio.sleep(self.settings.batch_poll_s)

    async def _collect(self, batch_id, batch, todo, attempts, last_error, results) -> None:
        keys = set(self.journal.open[batch_id]["keys"])
        returned = set()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._call(lambda file_id=file_id: self.api.files.content(file_id))
            for raw in content.content.splitlines():
                if raw.strip():
                    returned.add(self._settle_line(json.loads(raw), batch_id, todo, attempts, last_error, results))
        for key in (keys - returned) & todo.keys():  # expired, cancelled or failed before this line ran
            attempts[key] += 1
            self.client.counts["retry_batch_missing"] += 1
            last_error[key] = ("batch_missing", f"batch {batch_id} ended '{batch.status}' without this request")
        self.journal.collected(batch_id, batch.status)
        self.client.counts[f"batches_{batch.status}"] += 1
        if self.settings.batch_delete_files:
            for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
                if file_id:
                    await self._call(lambda file_id=file_id: self.api.files.delete(file_id))

    def _settle_line(self, line: dict, batch_id: str, todo, attempts, last_error, results) -> str:
        key = line.get("custom_id")
        request = todo.get(key)
        if request is None:  # already settled, or another run's request in a resumed batch
            return key
        attempts[key] += 1
        response = line.get("response") or {}
        status = response.get("status_code")
        try:
            if line.get("error") or status != 200:
                kind = {429: "rate_limited"}.get(status, "server_error" if (status or 500) >= 500 else f"http_{status}")
                raise RetryableError(kind, self.client.redact(json.dumps(line.get("error") or response.get("body"))))
            result = result_from_payload(
                request, response.get("body"), {**self.backend.provider(), "batch": batch_id}, started=time.time()
            )
        except RetryableError as err:
            kind = "batch_error" if err.kind in ("server_error", "rate_limited") else err.kind
            self.client.counts[f"retry_{kind}"] += 1
            last_error[key] = (kind, str(err))
            return key
        result.attempts = attempts[key]
        if self.client.settle(request, result, batch=True):
            results[key] = result
            del todo[key]
            self.client._advance(self.weights[key])
        else:
            last_error[key] = (f"finish_{result.finish_reason}", f"finish_reason={result.finish_reason}")
        return key

    async def _call(self, make_call):
        """One files/batches API call, retried on transient errors like chat requests are."""
        openai = self.backend.openai
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return await make_call()
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
                if refusal(err):
                    raise refusal(err) from None
                if attempt == self.settings.max_attempts:
                    raise
                log.warning("batch API call failed (%s); retrying", type(err).__name__)
                await asyncio.sleep(self.client.backoff(attempt, None))
