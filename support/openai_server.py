"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks, with fault injection.

It speaks enough of the OpenAI and Azure OpenAI REST APIs for the openai SDK: chat completions
(`/v1/chat/completions`, `/openai/deployments/{name}/chat/completions`), files (upload, content,
delete) and batches (create, retrieve, cancel). Written on the standard library (http.server),
so the SDK's own HTTP stack is exercised for real, with no interception.

    with OpenAIServer(latency_s=0.3) as server:
        server.add_fault("rate_limit", times=2, retry_after=0.1)
        client = openai.OpenAI(base_url=server.url, api_key="test")
        ...
        server.requests          # the request log: one LoggedRequest per HTTP request
        server.delivered()       # Counter: request identity -> completions delivered

Faults (`add_fault(kind, ...)`), each applied to chat requests whose prompt contains `match`
(any when None), `times` times (unlimited when None), with `probability` (seeded):
  rate_limit      429 with Retry-After (`retry_after` seconds; None: none), and `headers`
  server_error    500 (`status` to change the code)
  http_error      any status (`status`) with a JSON error `body`; `echo_request` puts the
                  request's Authorization header and prompt into the body, as a careless proxy would
  stall           answers only after `stall_s` seconds (past the client's timeout)
  malformed       200 with a body that is not JSON
  no_choices      200 with JSON that has no choices
  length          a completion cut short: finish_reason "length"
  content_filter  finish_reason "content_filter" and no content
  redirect        307 to `location` (another server), as a hijacked or misconfigured gateway would
  reply           200 with `body`: bytes sent as they are, a JSON value, or a function of the
                  reply the server would have sent (to lie about usage, nest, reshape); `headers`
                  are added (e.g. Content-Encoding: gzip over a bomb)
  trickle         sends the reply one byte every `stall_s` seconds (no read ever times out)
Faults apply to the requests inside batches too (as per-line errors or finish reasons).

`hostile=True` is a server, or a proxy in front of one, that echoes what it was sent: the
request's Authorization header and its prompt (the note) go into every field of every reply and
error body that a client does not need to read the answer (ids, fingerprints, model, object,
refusal, logprobs, extra fields, error message, type, code and param, batch and file objects,
batch output lines), into response headers and the HTTP reason phrase; the key also goes into
the answer itself. `ids_echo_key=True` puts the key into file and batch ids too.

`latency_sigma` makes the latency log-normal: `latency_s` is then the median, each request's
delay is drawn from the seeded generator (so `seed` changes the pattern) and capped at
`latency_max_s`, as chat APIs answer (a long tail, then the provider's own timeout).

`fail_route(method, path)` answers a files or batches call with a 500 (e.g. `batches.create` after
the upload). `hold(after=n)` keeps every chat request after the first n waiting until `release()` (or
`release(drop=True)`: never answered), to stop a client at a known point; `rpm_limit` makes the server enforce a
request-per-minute limit itself, with x-ratelimit headers, as providers do.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = (
    "rate_limit",
    "server_error",
    "http_error",
    "stall",
    "malformed",
    "no_choices",
    "length",
    "content_filter",
    "redirect",
    "reply",
    "trickle",
)


def request_identity(body: dict) -> str:
    """The identity of a chat request: SHA-256 of its model, messages and sampling parameters."""
    core = {k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def prompt_text(body: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def default_responder(body: dict) -> str:
    """A deterministic reply: a question for a question-generation prompt, a statement otherwise."""
    digest = request_identity(body)[:10]
    if "[Example Questions Begin]" in prompt_text(body):
        return f"Which finding {digest} does the discharge summary document?"
    return f"The discharge summary documents finding {digest}."


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    match: str | None = None
    probability: float = 1.0
    retry_after: float | None = 1.0
    status: int = 500
    stall_s: float = 5.0
    echo_request: bool = False
    message: str = "request rejected"
    location: str | None = None
    body: object = None
    headers: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}")


@dataclass
class LoggedRequest:
    """One HTTP request as the server saw it; `outcome` is what it answered."""

    method: str
    path: str
    received: float
    body: dict | None = None
    identity: str | None = None
    outcome: str = "pending"
    authorization: str | None = None
    answered: float | None = None
    deployment: str | None = None
    query: dict = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self):
        super().setup()
        # headers and body go out as two writes: without this, Nagle's algorithm and delayed
        # ACKs add ~40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # the request log replaces stderr chatter
        pass

    def _route(self) -> tuple[str, str | None, dict]:
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        deployment = None
        match = re.match(r"^/openai/deployments/([^/]+)(/.*)$", path)
        if match:
            deployment, path = match.groups()
        elif path.startswith("/openai/"):
            path = path[len("/openai") :]
        elif path.startswith("/v1/"):
            path = path[len("/v1") :]
        return path, deployment, params

    def do_POST(self):
        self._dispatch("POST")

    def do_GET(self):
        self._dispatch("GET")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str):
        owner = self.server.owner
        path, deployment, params = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = LoggedRequest(
            method=method,
            path=path,
            received=time.time(),
            deployment=deployment,
            authorization=self.headers.get("Authorization") or self.headers.get("api-key"),
            query=params,
        )
        owner._log(entry)
        try:
            if owner._route_fails(method, path):
                status, headers, payload = 500, {}, _error("injected failure", "server_error")
            elif method == "POST" and path == "/chat/completions":
                body = json.loads(raw)
                entry.body, entry.identity = body, request_identity(body)
                status, headers, payload = owner._chat(body, entry)
            elif method == "POST" and path == "/files":
                status, headers, payload = owner._upload(self.headers.get("Content-Type", ""), raw, entry.authorization)
            elif method == "GET" and re.fullmatch(r"/files/[^/]+/content", path):
                status, headers, payload = owner._file_content(path.split("/")[2])
            elif method == "GET" and re.fullmatch(r"/files/[^/]+", path):
                status, headers, payload = owner._file_info(path.split("/")[2])
            elif method == "DELETE" and re.fullmatch(r"/files/[^/]+", path):
                status, headers, payload = owner._file_delete(path.split("/")[2])
            elif method == "GET" and path == "/files":
                status, headers, payload = owner._file_list(params.get("purpose"), params.get("after"))
            elif method == "GET" and path == "/batches":
                status, headers, payload = owner._batch_list(params.get("after"))
            elif method == "POST" and path == "/batches":
                status, headers, payload = owner._batch_create(json.loads(raw), entry.authorization)
            elif method == "GET" and re.fullmatch(r"/batches/[^/]+", path):
                status, headers, payload = owner._batch_get(path.split("/")[2])
            elif method == "POST" and re.fullmatch(r"/batches/[^/]+/cancel", path):
                status, headers, payload = owner._batch_cancel(path.split("/")[2])
            else:
                status, headers, payload = 404, {}, _error(f"no route {method} {path}")
                entry.outcome = "not_found"
        except _Abandon:
            entry.outcome = "abandoned"
            self.close_connection = True
            return
        if entry.outcome == "pending":
            entry.outcome = "ok" if status == 200 else f"http_{status}"
        if owner.hostile and not isinstance(payload, bytes):
            payload = owner._plant(payload, entry.authorization)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        echo = owner._echo_header(entry.authorization)
        if echo:
            headers.update({"x-request-id": echo, "openai-organization": echo, "x-echo": echo})
        trickle_s = headers.pop("x-trickle-s", None)
        try:
            self.send_response(status, echo or None)
            self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
            for name, value in headers.items():
                self.send_header(name, str(value))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if trickle_s is None:
                self.wfile.write(data)
            for byte in data if trickle_s is not None else b"":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if owner._stopping.wait(trickle_s):
                    break
            entry.answered = time.time()
        except (BrokenPipeError, ConnectionResetError):
            entry.outcome = f"{entry.outcome}_undelivered"


class _Abandon(Exception):
    """A held request that is dropped without an answer."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    owner: OpenAIServer


def _error(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": None}}


def _page(items: list[dict], after: str | None, limit: int = 20) -> dict:
    """One page of a list, after the item whose id is `after`, as the API pages them."""
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    return {"object": "list", "data": items[start : start + limit], "has_more": start + limit < len(items)}


class OpenAIServer:
    """The server. `url` is the OpenAI base URL, `endpoint` the Azure endpoint (same server)."""

    def __init__(
        self,
        latency_s: float = 0.0,
        latency_sigma: float = 0.0,
        latency_max_s: float = float("inf"),
        responder: Callable[[dict], str] = default_responder,
        rpm_limit: float | None = None,
        rpm_window_s: float = 60.0,
        seed: int = 0,
        batch_delay_s: float = 0.0,
        chars_per_token: int = 4,
        hostile: bool = False,
        ids_echo_key: bool = False,
    ):
        self.latency_s = latency_s
        self.latency_sigma = latency_sigma
        self.latency_max_s = latency_max_s
        self.responder = responder
        self.rpm_limit = rpm_limit
        self.rpm_window_s = rpm_window_s
        self.batch_delay_s = batch_delay_s
        self.chars_per_token = chars_per_token  # how the server bills: fewer characters per token cost more
        self.hostile = hostile
        self.ids_echo_key = ids_echo_key
        self.last_prompt = ""  # what a hostile server echoes where a reply has no prompt of its own
        self.faults: list[Fault] = []
        self.requests: list[LoggedRequest] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._window: deque[float] = deque()
        self._stopping = threading.Event()
        self._release = threading.Event()
        self._drop_held = False
        self._hold_after: int | None = None
        self._route_faults: dict[tuple[str, str], int | None] = {}
        self._chat_count = 0
        self._httpd: _HTTPServer | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> OpenAIServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.release(drop=True)
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting -------------------------------------------------------------------------
    def add_fault(self, kind: str, **options) -> Fault:
        fault = Fault(kind, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail_route(self, method: str, path: str, times: int | None = 1) -> None:
        """Answer the next `times` (None: all) requests of `method` to a path matching the regular
        expression `path` (e.g. "POST", "/batches") with a 500."""
        with self._lock:
            self._route_faults[(method, path)] = times

    def _route_fails(self, method: str, path: str) -> bool:
        with self._lock:
            for (fault_method, pattern), left in self._route_faults.items():
                if fault_method == method and re.fullmatch(pattern, path) and (left is None or left > 0):
                    if left is not None:
                        self._route_faults[(fault_method, pattern)] = left - 1
                    return True
        return False

    def hold(self, after: int) -> None:
        """Answer the first `after` chat requests; keep every later one waiting until `release`."""
        with self._lock:
            self._hold_after = after
            self._drop_held = False
            self._release.clear()

    def release(self, drop: bool = False) -> None:
        """Stop holding; requests held so far are answered, or dropped unanswered when `drop`
        (their client is gone). Later requests pass."""
        with self._lock:
            self._hold_after = None
            self._drop_held = drop
        self._release.set()

    def held(self) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.outcome == "held")

    def wait_for(self, predicate: Callable[[OpenAIServer], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not reach the expected state")
            time.sleep(0.01)

    # -- the request log -------------------------------------------------------------------
    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    def chat_requests(self) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == "/chat/completions"]

    def delivered(self) -> Counter:
        """Request identity -> completions delivered (HTTP or batch) with a usable answer."""
        with self._lock:
            counts = Counter(r.identity for r in self.requests if r.path == "/chat/completions" and r.outcome == "ok")
            for batch in self.batches.values():
                counts.update(batch["delivered"])
        return counts

    def outcomes(self) -> Counter:
        with self._lock:
            return Counter(r.outcome for r in self.requests if r.path == "/chat/completions")

    # -- a hostile server ------------------------------------------------------------------
    def _echo(self, authorization: str | None, prompt: str | None = None) -> str:
        return f"{authorization} {self.last_prompt if prompt is None else prompt}"

    def _echo_header(self, authorization: str | None) -> str | None:
        """The echo as one line of header-safe text, or None when the server is not hostile."""
        if not self.hostile:
            return None
        return " ".join(self._echo(authorization).split()).encode("ascii", "replace").decode()[:2000]

    def _plant(self, payload, authorization: str | None):
        """`payload` with the echo in every field a client does not need, recursively."""
        echo = self._echo(authorization)
        if isinstance(payload, list):
            return [self._plant(item, authorization) for item in payload]
        if not isinstance(payload, dict):
            return payload
        planted = {key: self._plant(value, authorization) for key, value in payload.items()}
        planted["echo"] = echo
        if isinstance(payload.get("error"), dict):
            planted["error"] = {"message": echo, "type": echo, "code": authorization, "param": echo}
        if payload.get("object") == "batch":
            planted["errors"] = {"object": "list", "data": [{"message": echo, "code": authorization}]}
            planted["metadata"] = {"echo": echo}
        if payload.get("object") == "file":
            planted["status_details"] = echo
        return planted

    def _new_id(self, prefix: str, authorization: str | None) -> str:
        token = (authorization or "").removeprefix("Bearer ")
        return f"{prefix}{token}-{uuid.uuid4().hex[:16]}" if self.ids_echo_key else f"{prefix}{uuid.uuid4().hex[:16]}"

    # -- chat completions ------------------------------------------------------------------
    def _pick_fault(self, body: dict) -> Fault | None:
        prompt = prompt_text(body)
        with self._lock:
            for fault in self.faults:
                if fault.times is not None and fault.times <= 0:
                    continue
                if fault.match is not None and fault.match not in prompt:
                    continue
                if fault.probability < 1.0 and self._random.random() >= fault.probability:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def _over_rpm(self) -> tuple[bool, dict]:
        if self.rpm_limit is None:
            return False, {}
        allowed = max(1, int(self.rpm_limit * self.rpm_window_s / 60))
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0] <= now - self.rpm_window_s:
                self._window.popleft()
            over = len(self._window) >= allowed
            if not over:
                self._window.append(now)
            reset = self._window[0] + self.rpm_window_s - now if self._window else 0.0
            headers = {
                "x-ratelimit-limit-requests": int(self.rpm_limit),
                "x-ratelimit-remaining-requests": max(0, allowed - len(self._window)),
                "x-ratelimit-reset-requests": f"{max(reset, 0):.3f}s",
            }
        return over, headers

    def _latency(self) -> float:
        if not self.latency_sigma:
            return self.latency_s
        with self._lock:
            draw = self._random.lognormvariate(0.0, self.latency_sigma)
        return min(self.latency_s * draw, self.latency_max_s)

    def _wait_if_held(self) -> None:
        with self._lock:
            self._chat_count += 1
            held = self._hold_after is not None and self._chat_count > self._hold_after
        if held:
            self._release.wait()
            if self._drop_held:
                raise _Abandon()

    def _chat(self, body: dict, entry: LoggedRequest) -> tuple[int, dict, object]:
        self.last_prompt = prompt_text(body)
        entry.outcome = "held"
        self._wait_if_held()
        entry.outcome = "pending"
        over, headers = self._over_rpm()
        if over:
            entry.outcome = "over_rpm"
            return 429, {**headers, "retry-after": "1"}, _error("Rate limit reached for requests", "requests")
        if self.latency_s:
            self._stopping.wait(self._latency())
        fault = self._pick_fault(body)
        status, payload = self._complete(body, fault, entry.authorization)
        if fault is not None:
            entry.outcome = fault.kind
        if fault is not None and fault.kind == "redirect":
            headers["Location"] = fault.location
        if fault is not None and fault.kind == "rate_limit":
            if fault.retry_after is not None:
                headers["retry-after"] = f"{fault.retry_after:g}"
            headers["x-ratelimit-remaining-requests"] = 0
        if fault is not None:
            headers.update(fault.headers)
        if fault is not None and fault.kind == "trickle":
            headers["x-trickle-s"] = fault.stall_s
        return status, headers, payload

    def _complete(self, body: dict, fault: Fault | None, authorization: str | None) -> tuple[int, object]:
        """Status and payload of one chat completion, with `fault` applied (shared with batches)."""
        kind = fault.kind if fault else None
        if kind == "rate_limit":
            return 429, _error("Rate limit reached", "rate_limit_exceeded")
        if kind == "server_error":
            return fault.status, _error("The server had an error while processing your request", "server_error")
        if kind == "redirect":
            return 307, _error("moved")
        if kind == "http_error":
            message = fault.message
            if fault.echo_request:
                message += f" (authorization: {authorization}; prompt: {prompt_text(body)[:200]})"
            return fault.status, _error(message)
        if kind == "stall":
            self._stopping.wait(fault.stall_s)
        if kind == "malformed":
            return 200, b'{"id": "chatcmpl-broken", "choices": [{"message": '
        text = self.responder(body)
        if self.hostile:
            text += f" {authorization}"
        finish = "stop"
        if kind == "length":
            text, finish = text[: max(1, len(text) // 3)], "length"
        elif kind == "content_filter":
            text, finish = None, "content_filter"
        prompt_tokens = len(prompt_text(body)) // self.chars_per_token + 1
        completion_tokens = len(text or "") // self.chars_per_token + 1
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "fp_test",
            "choices": []
            if kind == "no_choices"
            else [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        if self.hostile:
            echo = self._echo(authorization, prompt_text(body))
            payload.update(id=echo, object=echo, model=echo, system_fingerprint=echo, service_tier=echo)
            for choice in payload["choices"]:
                choice["message"]["refusal"] = echo
                choice["logprobs"] = {"content": [{"token": echo, "logprob": 0.0}]}
            payload["usage"]["prompt_tokens_details"] = {"echo": echo}
        if kind == "reply":
            return 200, fault.body(payload) if callable(fault.body) else fault.body
        return 200, payload

    # -- files -----------------------------------------------------------------------------
    def _upload(self, content_type: str, raw: bytes, authorization: str | None) -> tuple[int, dict, object]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        fields, content, filename = {}, b"", "upload"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                content = part.get_payload(decode=True) or b""
                filename = part.get_filename() or filename
            else:
                fields[name] = part.get_content().strip()
        first = content.split(b"\n", 1)[0]
        if first.strip().startswith(b"{"):
            self.last_prompt = prompt_text(json.loads(first).get("body", {}))
        return 200, {}, self._store_file(content, filename, fields.get("purpose", "batch"), authorization)

    def _store_file(self, content: bytes, filename: str, purpose: str, authorization: str | None = None) -> dict:
        info = {
            "id": self._new_id("file-", authorization),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        with self._lock:
            self.files[info["id"]] = {"info": info, "content": content}
        return info

    def _file_info(self, file_id: str):
        with self._lock:
            stored = self.files.get(file_id)
        return (200, {}, stored["info"]) if stored else (404, {}, _error(f"no file {file_id}"))

    def _file_list(self, purpose: str | None, after: str | None):
        with self._lock:
            infos = [f["info"] for f in self.files.values() if purpose in (None, f["info"]["purpose"])]
        return 200, {}, _page(infos, after)

    def _batch_list(self, after: str | None):
        with self._lock:
            public = [dict(state["public"]) for state in self.batches.values()]
        return 200, {}, _page(public, after)

    def _file_content(self, file_id: str):
        with self._lock:
            stored = self.files.get(file_id)
        if not stored:
            return 404, {}, _error(f"no file {file_id}")
        return 200, {"Content-Type": "application/octet-stream"}, stored["content"]

    def _file_delete(self, file_id: str):
        with self._lock:
            existed = self.files.pop(file_id, None) is not None
        return (
            (200, {}, {"id": file_id, "object": "file", "deleted": True})
            if existed
            else (404, {}, _error(f"no file {file_id}"))
        )

    # -- batches ---------------------------------------------------------------------------
    def _batch_create(self, body: dict, authorization: str | None):
        with self._lock:
            stored = self.files.get(body.get("input_file_id"))
        if stored is None:
            return 400, {}, _error(f"no input file {body.get('input_file_id')}")
        batch = {
            "id": self._new_id("batch_", authorization),
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        with self._lock:
            self.batches[batch["id"]] = {"public": batch, "delivered": Counter(), "cancel": False}
        threading.Thread(
            target=self._run_batch, args=(batch["id"], stored["content"], authorization), daemon=True
        ).start()
        return 200, {}, dict(batch)

    def _run_batch(self, batch_id: str, content: bytes, authorization: str | None) -> None:
        state = self.batches[batch_id]
        batch = state["public"]
        lines = [json.loads(line) for line in content.splitlines() if line.strip()]
        batch["request_counts"]["total"] = len(lines)
        batch["status"] = "in_progress"
        outputs, errors = [], []
        for line in lines:
            if state["cancel"] or self._stopping.is_set():
                break
            if self.batch_delay_s:
                self._stopping.wait(self.batch_delay_s / max(1, len(lines)))
            body = line["body"]
            fault = self._pick_fault(body)
            if fault is not None and fault.kind == "stall":
                fault = None  # a batch has no per-request timeout
            status, payload = self._complete(body, fault, authorization)
            if isinstance(payload, bytes):  # a batch line is JSON: an unparsable body is the server's error
                payload = {"error": {"message": "malformed output", "type": "server_error"}}
                status = 500
            record = {
                "id": f"batch_req_{uuid.uuid4().hex[:12]}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": payload},
                "error": None,
            }
            if self.hostile:
                echo = self._echo(authorization, prompt_text(body))
                record.update(id=echo, echo=echo)
                record["response"]["request_id"] = echo
                if status != 200:
                    record["error"] = {"message": echo, "code": authorization}
                    payload["error"] = {"message": echo, "type": echo, "code": authorization, "param": echo}
            if status == 200:
                outputs.append(record)
                batch["request_counts"]["completed"] += 1
                choices = payload.get("choices") if isinstance(payload, dict) else None
                choice = choices[0] if isinstance(choices, list) and choices else None
                if isinstance(choice, dict) and choice.get("finish_reason") == "stop":
                    state["delivered"][request_identity(body)] += 1
            else:
                errors.append(record)
                batch["request_counts"]["failed"] += 1
        self._random.shuffle(outputs)  # results come back in any order
        if outputs:
            batch["output_file_id"] = self._store_file(
                "".join(json.dumps(r) + "\n" for r in outputs).encode(),
                "batch_output.jsonl",
                "batch_output",
                authorization,
            )["id"]
        if errors:
            batch["error_file_id"] = self._store_file(
                "".join(json.dumps(r) + "\n" for r in errors).encode(),
                "batch_errors.jsonl",
                "batch_output",
                authorization,
            )["id"]
        batch["status"] = "cancelled" if state["cancel"] else "completed"
        batch["completed_at"] = int(time.time())

    def _batch_get(self, batch_id: str):
        with self._lock:
            state = self.batches.get(batch_id)
        return (200, {}, dict(state["public"])) if state else (404, {}, _error(f"no batch {batch_id}"))

    def _batch_cancel(self, batch_id: str):
        with self._lock:
            state = self.batches.get(batch_id)
        if not state:
            return 404, {}, _error(f"no batch {batch_id}")
        state["cancel"] = True
        state["public"]["status"] = "cancelling"
        return 200, {}, dict(state["public"])
