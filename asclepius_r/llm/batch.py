"""The Batch API mode (OpenAI and Azure OpenAI): the same requests at about half the price.

Requests not in the archive are written as JSONL (one line per request, `custom_id` = archive
key), uploaded, and run as batches of at most `llm.batch_max_requests` lines and
`llm.batch_max_bytes` bytes. Results come back in any order and go into the same archive as
online responses, so online, batch and replay runs are interchangeable. Unusable lines
(errors, `length` / `content_filter` finish reasons, lines a batch never returned) are retried
in a further batch until `llm.max_attempts`, then recorded as failed.

A journal next to the archive (`<archive>.batches.jsonl`) records each input file once it is
uploaded, its batch once created, its collection and the deletion of its files. A client first
finishes whatever an earlier run left there (killed, crashed): a batch that holds requests a
batch-mode run still wants is waited for, any other (any at all, for an online run) is
cancelled; either way every line it answered is archived, whether or not this run wants it (the
requests this run does not hold are rebuilt from the batch's input file), so no answered request
is paid for twice, and then its files are deleted. Only then is anything new sent, so the budget
counts what those batches cost. Batch input files hold the prompts, that is the notes: they are deleted after collecting
(`llm.batch_delete_files`), at once when the batch cannot be created, and, named after their
archive, also when an earlier run uploaded one and died before the journal said so.

Every batch API call goes through `_call` (retries) and `_object` (the reply must be a JSON
object; identifiers must be short names holding no secret, or the run stops with ProviderError):
nothing a server sends reaches the journal, the log or an error message unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

from asclepius_r.llm.archive import ChatRequest, append_line, damaged, read_records
from asclepius_r.llm.backends import MalformedReply, ProviderError, RetryableError, parse_json, parse_reply
from asclepius_r.llm.guard import REPLY_MAX_BYTES, refusal
from asclepius_r.llm.redact import is_name

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
STATUSES = (*TERMINAL, "validating", "in_progress", "finalizing", "cancelling")
# A listing longer than this is not read on (a server may claim `has_more` forever).
LIST_MAX_ITEMS = 10_000


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
    """Each input file's life (uploaded, submitted, collected, cleaned), appended durably like the
    archive; `entries` holds those not cleaned yet, by input file id."""

    EVENTS = ("uploaded", "submitted", "collected", "cleaned")

    def __init__(self, archive_path: Path | None):
        self.path = archive_path.with_name(archive_path.name + ".batches.jsonl") if archive_path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.exists():
            for number, record in read_records(self.path):
                self._apply(number, record)

    def _apply(self, number: int, record) -> None:
        if not isinstance(record, dict) or record.get("event") not in self.EVENTS:
            raise damaged(self.path, number, "not a batch journal event")
        file_id, keys, files = record.get("input_file_id"), record.get("keys", []), record.get("files", [])
        names = [file_id, *(record[k] for k in ("batch_id", "model") if k in record), *files]
        if not all(map(is_name, names)) or not isinstance(keys, list) or not all(map(is_name, keys)):
            raise damaged(self.path, number, "its input file, batch, model, keys or files are not named")
        if record["event"] == "cleaned":
            self.entries.pop(file_id, None)
        else:
            self.entries.setdefault(file_id, {"keys": []}).update(record)

    def _write(self, record: dict) -> None:
        record["time"] = time.time()
        self._apply(0, record)
        if self.path:
            append_line(self.path, (json.dumps(record, sort_keys=True) + "\n").encode())

    def uploaded(self, input_file_id: str, keys: list[str], model: str) -> None:
        self._write({"event": "uploaded", "input_file_id": input_file_id, "keys": keys, "model": model})

    def submitted(self, input_file_id: str, batch_id: str) -> None:
        self._write({"event": "submitted", "input_file_id": input_file_id, "batch_id": batch_id})

    def collected(self, input_file_id: str, status: str, files: list[str]) -> None:
        self._write({"event": "collected", "input_file_id": input_file_id, "status": status, "files": files})

    def cleaned(self, input_file_id: str) -> None:
        self._write({"event": "cleaned", "input_file_id": input_file_id})


class BatchRunner:
    """Runs one list of requests through batches, with the client's archive, accounting and budget."""

    def __init__(self, client):
        self.client = client
        self.settings = client.settings
        self.backend = client.backend
        self.api = client.backend.client
        self.journal = BatchJournal(client.archive.path)
        self.input_name = input_file_name(client.archive.path)
        # The run's state: requests still wanted (by key), attempts and last failure of each, results.
        self.todo: dict[str, ChatRequest] = {}
        self.attempts: dict[str, int] = {}
        self.last_error: dict[str, tuple[str, str]] = {}
        self.results: dict[str, object] = {}
        self.weights: dict[str, int] = {}

    async def run(self, requests: list[ChatRequest], weights: dict[str, int]) -> list:
        """One result per request (None if the budget left it unsent); `weights` advance the bar."""
        self.weights = weights
        self.todo = todo = {r.key: r for r in requests}
        self.attempts = dict.fromkeys(todo, 0)
        if self.journal.path is not None and self.settings.batch_delete_files:
            await self._remove_unjournaled_inputs()
        while todo and not self.client._budget_hit:
            affordable, reserved = [], 0.0
            for request in todo.values():
                worst = self.client.worst_case_cost(request, batch=True)
                if not self.client.reserve(worst):  # the budget stops here; what was chosen still runs
                    break
                affordable.append(request)
                reserved += worst
            if not affordable:
                break
            submitted = [await self._submit(chunk) for chunk in self._chunks(affordable)]
            for input_file_id in submitted:
                await self._finish(input_file_id, cancel=False)
            self.client.release(reserved)  # the real usage is accounted by now
            self._give_up()
        return [self.results.get(r.key) for r in requests]

    async def finish_earlier(self, wanted: list[ChatRequest]) -> None:
        """Finish every batch and file an earlier run left in the journal: wait for a batch that
        holds `wanted` requests, cancel any other; archive every line they answered, whether
        wanted or not; delete their files."""
        self.todo = {r.key: r for r in wanted}
        self.attempts = dict.fromkeys(self.todo, 0)
        log.info("finishing %d batch input file(s) an earlier run left", len(self.journal.entries))
        for input_file_id, entry in list(self.journal.entries.items()):
            if "batch_id" not in entry and not await self._adopt(input_file_id):
                await self._clean(input_file_id, [input_file_id])
                continue
            await self._finish(input_file_id, cancel=not set(entry["keys"]) & self.todo.keys())

    def _give_up(self) -> None:
        for key in [k for k in self.todo if self.attempts[k] >= self.settings.max_attempts]:
            kind, error = self.last_error.get(key, ("batch_missing", "not returned by the batch"))
            failed = self.client.record_failure(self.todo.pop(key), kind, error, self.attempts[key], time.time())
            self.results[key] = failed
            self.client._advance(self.weights[key])

    def _line(self, request: ChatRequest) -> bytes:
        line = {
            "custom_id": request.key,
            "method": "POST",
            "url": self.backend.batch_endpoint,
            "body": self.backend.body(request),
        }
        return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    def _chunks(self, requests: list[ChatRequest]):
        """Lines in chunks within the batch limits, one model a chunk (the journal names it)."""
        chunk, size = [], 0
        for request in requests:
            line = self._line(request)
            if chunk and (
                len(chunk) >= self.settings.batch_max_requests
                or size + len(line) > self.settings.batch_max_bytes
                or request.model != chunk[0][0].model
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append((request, line))
            size += len(line)
        if chunk:
            yield chunk

    # -- the calls -----------------------------------------------------------------------------
    async def _call(self, make_call, deadline: bool = True):
        """One files/batches API call, retried on transient errors like chat requests are, each
        attempt within `llm.timeout_s` in all unless it is a download (`deadline`); what still
        fails leaves through the client's exit (ProviderError)."""
        openai = self.backend.openai
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                async with asyncio.timeout(self.settings.timeout_s if deadline else None):
                    return await make_call()
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError, TimeoutError) as err:
                if refusal(err):
                    raise refusal(err) from None
                if attempt == self.settings.max_attempts:
                    if isinstance(err, TimeoutError):
                        raise ProviderError(
                            f"the Batch API did not answer within llm.timeout_s, {attempt} times"
                        ) from None
                    raise
                log.warning("batch API call failed (%s); retrying", type(err).__name__)
                await asyncio.sleep(self.client.backoff(attempt, None))

    async def _object(self, make_raw_call, what: str) -> dict:
        """The JSON object a raw-response call returns, or ProviderError naming the call."""
        raw = await self._call(make_raw_call)
        try:
            payload = parse_json(raw.content)
        except MalformedReply:
            payload = None
        if not isinstance(payload, dict):
            raise self._unusable(what, "is not a JSON object")
        return payload

    def _name(self, value, what: str) -> str:
        """An identifier from the provider: a short name that holds no secret (it goes into the
        journal and the log), or ProviderError."""
        if not is_name(value) or self.client.redact.contains_secret(value):
            raise self._unusable(what, "is not an identifier")
        return value

    @staticmethod
    def _unusable(what: str, how: str) -> ProviderError:
        return ProviderError(f"the Batch API's reply to {what} {how}; stopping rather than guessing")

    async def _listing(self, resource, what: str, **params) -> list[dict]:
        """Every item of a paginated list (files or batches), at most LIST_MAX_ITEMS."""
        items, after = [], None
        while len(items) < LIST_MAX_ITEMS:
            page = await self._object(lambda: resource.with_raw_response.list(after=after, **params), what)
            data = page.get("data")
            if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
                raise self._unusable(what, "has no list of items")
            items += data
            if page.get("has_more") is not True or not data or not is_name(after := data[-1].get("id")):
                break
        return items

    async def _delete(self, file_id: str) -> None:
        try:
            await self._call(lambda: self.api.files.with_raw_response.delete(file_id))
        except self.backend.openai.NotFoundError:
            pass  # already gone

    async def _lines(self, file_id: str, line_max: int, lines_max: int) -> list[bytes]:
        """A batch file's lines, streamed: each at most `line_max` bytes, at most `lines_max` of them."""

        async def download() -> list[bytes]:
            lines, pending = [], bytearray()
            async with self.api.files.with_streaming_response.content(file_id) as response:
                async for piece in response.iter_bytes():
                    pending += piece
                    *complete, rest = bytes(pending).split(b"\n")
                    lines += [line for line in complete if line.strip()]
                    pending = bytearray(rest)
                    if len(pending) > line_max or len(lines) > lines_max:
                        raise self._unusable("files.content", "has a line or lines beyond what its batch can hold")
            return lines + ([bytes(pending)] if pending.strip() else [])

        return await self._call(download, deadline=False)

    # -- submitting ----------------------------------------------------------------------------
    async def _submit(self, chunk: list[tuple[ChatRequest, bytes]]) -> str:
        data = b"".join(line for _, line in chunk)
        upload = await self._object(
            lambda: self.api.files.with_raw_response.create(file=(self.input_name, data), purpose="batch"),
            "files.create",
        )
        if not is_name(upload.get("id")) or self.client.redact.contains_secret(upload["id"]):
            if is_name(upload.get("id")):  # the notes must not stay there; the id goes nowhere else
                await self._delete(upload["id"])
            raise self._unusable("files.create", "is not an identifier")
        input_file_id = upload["id"]
        self.journal.uploaded(input_file_id, [r.key for r, _ in chunk], chunk[0][0].model)
        batch: dict = {}
        try:
            batch = await self._object(
                lambda: self.api.batches.with_raw_response.create(
                    input_file_id=input_file_id, endpoint=self.backend.batch_endpoint, completion_window="24h"
                ),
                "batches.create",
            )
            batch_id = self._name(batch.get("id"), "batches.create")
        except BaseException:
            # No batch will read it (or none this run can name): the notes in it go now, or at the
            # next run (the journal still lists the upload) if deleting fails too.
            if is_name(batch.get("id")):
                with contextlib.suppress(Exception):
                    await self._call(lambda: self.api.batches.with_raw_response.cancel(batch["id"]))
            with contextlib.suppress(Exception):
                await self._clean(input_file_id, [input_file_id])
            raise
        self.journal.submitted(input_file_id, batch_id)
        self.client.counts["batches_submitted"] += 1
        log.info("submitted batch %s: %d requests, %.1f MB", batch_id, len(chunk), len(data) / 1e6)
        return input_file_id

    async def _adopt(self, input_file_id: str) -> bool:
        """An input file uploaded by a run that died before it journaled the batch: find that
        batch by its input file; False if there is none."""
        for batch in await self._listing(self.api.batches, "batches.list"):
            if batch.get("input_file_id") == input_file_id:
                self.journal.submitted(input_file_id, self._name(batch.get("id"), "batches.list"))
                return True
        return False

    async def _remove_unjournaled_inputs(self) -> None:
        """Delete this archive's input files that the journal does not know of (uploaded by a run
        that died before journaling them)."""
        listed = await self._listing(self.api.files, "files.list", purpose="batch")
        leftovers = [
            f["id"]
            for f in listed
            if f.get("filename") == self.input_name and is_name(f.get("id")) and f["id"] not in self.journal.entries
        ]
        if leftovers:
            log.warning("deleting %d batch input file(s) an earlier run left on the provider", len(leftovers))
            for file_id in leftovers:
                await self._delete(file_id)

    # -- waiting and collecting ----------------------------------------------------------------
    async def _finish(self, input_file_id: str, cancel: bool) -> None:
        """Wait for (or cancel, then wait for) the batch of `input_file_id`, archive every line it
        answered, delete its files."""
        entry = self.journal.entries[input_file_id]
        if "status" not in entry:  # not collected yet
            batch_id = entry["batch_id"]
            if cancel:
                batch = await self._status(batch_id)
                if batch["status"] not in TERMINAL:
                    log.info("cancelling batch %s: this run does not want its requests", batch_id)
                    await self._call(lambda: self.api.batches.with_raw_response.cancel(batch_id))
            batch = await self._wait(batch_id)
            await self._collect(entry, batch)
        await self._clean(input_file_id, self.journal.entries[input_file_id]["files"])

    async def _status(self, batch_id: str) -> dict:
        batch = await self._object(lambda: self.api.batches.with_raw_response.retrieve(batch_id), "batches.retrieve")
        if batch.get("status") not in STATUSES:
            raise self._unusable("batches.retrieve", "has no status the Batch API has")
        for name in ("output_file_id", "error_file_id"):
            if batch.get(name) is not None:
                self._name(batch[name], "batches.retrieve")
        return batch

    async def _wait(self, batch_id: str) -> dict:
        while True:
            batch = await self._status(batch_id)
            counts = batch.get("request_counts")
            if self.client.bar is not None and isinstance(counts, dict):
                done, total = counts.get("completed"), counts.get("total")
                if type(done) is int and type(total) is int:
                    self.client.bar.set_postfix(batch=batch["status"], done=f"{done}/{total}")
            if batch["status"] in TERMINAL:
                return batch
            await asyncio.sleep(self.settings.batch_poll_s)

    async def _collect(self, entry: dict, batch: dict) -> None:
        keys, todo = entry["keys"], self.todo
        requests = {key: todo[key] for key in keys if key in todo}
        if len(requests) < len(keys):
            requests.update(await self._rebuild(entry, set(keys) - requests.keys()))
        output_files = [batch[name] for name in ("output_file_id", "error_file_id") if batch.get(name)]
        returned: set[str] = set()
        for file_id in output_files:
            for raw in await self._lines(file_id, REPLY_MAX_BYTES, 2 * len(keys)):
                returned.add(self._settle_line(raw, entry["batch_id"], requests, returned))
        for key in (set(keys) - returned) & todo.keys():  # expired, cancelled or failed before this line ran
            self.attempts[key] += 1
            self.client.counts["retry_batch_missing"] += 1
            self.last_error[key] = ("batch_missing", f"batch {entry['batch_id']} ended '{batch['status']}' without it")
        self.journal.collected(entry["input_file_id"], batch["status"], [entry["input_file_id"], *output_files])
        self.client.counts[f"batches_{batch['status']}"] += 1

    async def _rebuild(self, entry: dict, keys: set[str]) -> dict[str, ChatRequest]:
        """The requests of `keys` (which this run does not hold) from the batch's input file, so
        that their answers are archived too; held in memory while the batch is collected."""
        rebuilt = {}
        for raw in await self._lines(entry["input_file_id"], self.settings.batch_max_bytes, len(entry["keys"])):
            try:
                line = json.loads(raw)
                body = line["body"]
                request = ChatRequest(
                    model=entry["model"],
                    messages=tuple((m["role"], m["content"]) for m in body["messages"]),
                    temperature=body["temperature"],
                    max_tokens=body["max_tokens"],
                    meta={"batch": entry["batch_id"]},
                )
                key = request.key  # what the lines was made from, or it was changed on the way
            except (ValueError, RecursionError, KeyError, TypeError):
                continue
            if key in keys and key == line.get("custom_id"):
                rebuilt[key] = request
        if len(rebuilt) < len(keys):
            raise self._unusable(
                "files.content",
                f"(input file {entry['input_file_id']}) does not hold the requests the journal "
                f"{self.journal.path} lists for it",
            )
        return rebuilt

    def _settle_line(self, raw: bytes, batch_id: str, requests: dict[str, ChatRequest], returned: set[str]):
        """Archive one line of a batch's results (account it, and settle its request if this run
        wants it); the key it answered, or None for a line that answers none of the batch's."""
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            line = None
        key = line.get("custom_id") if isinstance(line, dict) else None
        request = requests.get(key) if isinstance(key, str) else None
        if request is None or key in returned:  # no request of this batch, or answered twice
            self.client.counts["batch_lines_ignored"] += 1
            return None
        archived = self.client.archive.get(request)
        if archived is not None and archived.provider.get("batch") == batch_id:
            return key  # archived by a run that died while collecting this batch
        wanted = key in self.todo
        if wanted:
            self.attempts[key] += 1
        response = line.get("response")
        status = response.get("status_code") if isinstance(response, dict) else None
        try:
            if line.get("error") or status != 200:
                status = status if type(status) is int else 500
                kind = "batch_error" if status >= 500 or status == 429 else f"http_{status}"
                raise RetryableError(kind, f"HTTP {status} in batch {batch_id}")
            provider = {**self.backend.provider(), "batch": batch_id}
            result = parse_reply(request, response.get("body"), provider, time.time())
        except RetryableError as err:
            self.client.counts[f"retry_{err.kind}"] += wanted
            if err.billed:
                charged = self.client.charge_unanswered(request, err, self.attempts.get(key, 0), batch=True)
                self.client.archive.append(request, charged)
            self.last_error[key] = (err.kind, str(err))
            return key
        result.attempts = self.attempts.get(key, 0)
        record, usable = self.client.settle(request, result, batch=True)
        if wanted and usable:
            self.results[key] = record
            del self.todo[key]
            self.client._advance(self.weights.get(key, 0))  # none while finishing an earlier run's
        elif wanted:
            self.last_error[key] = (f"finish_{result.finish_reason}", f"finish_reason={result.finish_reason}")
        return key

    async def _clean(self, input_file_id: str, files: list[str]) -> None:
        if self.settings.batch_delete_files:
            for file_id in files:
                await self._delete(file_id)
        self.journal.cleaned(input_file_id)
