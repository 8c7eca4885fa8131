"""A real, local OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

    with FakeOpenAI(latency=0.1, faults=["429", "500", "stall", "bad_json"]) as fake:
        config = LLMConfig(base_url=fake.base_url, model="fake-model")
        ...
        assert fake.count == 5  # chat requests received, faults included

It listens on 127.0.0.1 on an ephemeral port and serves

* ``POST /v1/chat/completions``: waits ``latency`` seconds, then answers with
  ``reply(messages)`` (``reply(messages, body=...)`` when it takes a ``body``) and a ``usage`` block, unless the next entry of the fault script
  says otherwise;
* ``GET /v1/models``: one model.

The fault script is a queue consumed one entry per chat request, in arrival order; when
it is empty ``default_fault`` applies (None: answer normally). Entries:

* ``"429"``: HTTP 429 with ``Retry-After: 0`` and an OpenAI-style error body;
* ``"500"``: HTTP 500 with an OpenAI-style error body;
* ``"stall"``: wait ``stall_seconds`` (meant to be longer than the client timeout), then
  drop the connection without a response;
* ``"bad_json"``: HTTP 200, ``Content-Type: application/json``, a body that is not JSON;
* ``"ok"`` (or None): a normal answer.

Every request is recorded (``requests``: method, path, headers, body); ``count`` is the
number of chat requests and ``max_in_flight`` the most chat requests handled at once.
All waits end early when the server stops, so ``stop()`` (or leaving the ``with``
block) returns promptly: it stops the accept loop, closes open connections and joins
every thread it started.
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "stall", "bad_json", "ok")
DEFAULT_REPLY_TEXT = "The answer is 42"


def default_reply(messages: list[dict]) -> str:
    return DEFAULT_REPLY_TEXT


def word_count(text: str) -> int:
    return len(str(text).split())


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON body, or the raw text when it is not JSON, or None
    fault: str | None = None  # the fault applied (chat requests only)
    received_at: float = field(default_factory=time.monotonic)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(), so stop() leaves no thread behind
    block_on_close = True
    request_queue_size = 256  # the default (5) drops connections under a burst of concurrent calls
    allow_reuse_address = True

    def __init__(self, address, handler, fake: FakeOpenAI):
        self.fake = fake
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server does
    # headers and body go out as two writes: without TCP_NODELAY, Nagle's algorithm holds the
    # body back until the client's delayed ACK (~40 ms), adding that to every call's latency
    disable_nagle_algorithm = True
    timeout = 30  # an idle keep-alive connection is closed after this long
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read the records instead
        pass

    def setup(self):
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    # ---- helpers ------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, value: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), extra=extra)

    def _error(self, status: int, message: str, kind: str, extra: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, extra)

    # ---- routes -------------------------------------------------------------------

    def do_GET(self):
        fake = self.server.fake
        fake._record(RecordedRequest("GET", self.path, _headers(self.headers), None))
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake-openai"}]})
        else:
            self._error(404, f"no route GET {self.path}", "not_found")

    def do_POST(self):
        fake = self.server.fake
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            fake._record(RecordedRequest("POST", self.path, _headers(self.headers), body))
            self._error(404, f"no route POST {self.path}", "not_found")
            return
        fault = fake._next_fault()
        fake._record(RecordedRequest("POST", self.path, _headers(self.headers), body, fault=fault))
        fake._enter()
        try:
            self._chat(fake, body, fault)
        finally:
            fake._leave()

    def _chat(self, fake: FakeOpenAI, body: Any, fault: str | None) -> None:
        if fake.only_its_model and isinstance(body, dict) and body.get("model") != fake.model:
            self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return
        if fake.latency > 0 and fake._stopping.wait(fake.latency):
            self.close_connection = True
            return
        if fault == "429":
            self._error(429, "Rate limit reached (fake)", "rate_limit_error", {"Retry-After": "0"})
        elif fault == "500":
            self._error(500, "The server had an error (fake)", "server_error")
        elif fault == "stall":
            fake._stopping.wait(fake.stall_seconds)
            self.close_connection = True  # no response at all: the client sees a timeout or a drop
        elif fault == "bad_json":
            self._send(200, b'{"id": "chatcmpl-fake", "choices": [ this is not JSON')
        else:
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._error(400, "the body must be a JSON object with a list of messages", "invalid_request_error")
                return
            messages = body["messages"]
            # a reply that takes a `body` argument also sees the request's parameters (temperature, seed)
            wants_body = "body" in inspect.signature(fake.reply).parameters
            text = fake.reply(messages, body=body) if wants_body else fake.reply(messages)
            if fake.usage is not None:
                prompt_tokens, completion_tokens = fake.usage
            else:
                prompt_tokens = sum(word_count(m.get("content") or "") for m in messages if isinstance(m, dict))
                completion_tokens = word_count(text)
            self._send_json(200, {
                "id": f"chatcmpl-fake-{fake.count}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or fake.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True  # the client went away (e.g. after its own timeout)


class FakeOpenAI:
    """See the module docstring. Attributes may be changed while the server runs."""

    def __init__(self, latency: float = 0.0, reply: Callable[[list[dict]], str] | None = None,
                 faults: Iterable[str | None] = (), default_fault: str | None = None,
                 stall_seconds: float = 5.0, usage: tuple[int, int] | None = None, model: str = "fake-model"):
        for fault in [*faults, default_fault]:
            _check_fault(fault)
        self.latency = float(latency)
        self.reply = reply or default_reply
        self.default_fault = default_fault
        self.stall_seconds = float(stall_seconds)
        self.usage = usage  # None: tokens are counted as words of the messages and of the reply
        self.model = model
        self.only_its_model = False  # True: a chat request for another model gets vLLM's 404 "does not exist"
        self._faults: deque[str | None] = deque(faults)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self._max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        if self._server is not None:
            raise RuntimeError("the fake server is already running")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-openai-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # ends every latency and stall wait at once
        server.shutdown()  # stops the accept loop (waits for serve_forever to return)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handlers blocked reading an idle keep-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # closes the socket and joins the handler threads
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake server is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- script and records -------------------------------------------------------

    def add_faults(self, faults: Iterable[str | None]) -> None:
        faults = list(faults)
        for fault in faults:
            _check_fault(fault)
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> list[str | None]:
        with self._lock:
            return list(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.rstrip("/").endswith("/chat/completions")]

    @property
    def count(self) -> int:
        """Chat completion requests received (each retry counts)."""
        return len(self.chat_requests)

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def reset(self) -> None:
        """Forget the records (the fault script is kept)."""
        with self._lock:
            self._requests.clear()
            self._max_in_flight = self._in_flight

    # ---- called by the handler threads --------------------------------------------

    def _next_fault(self) -> str | None:
        with self._lock:
            fault = self._faults.popleft() if self._faults else self.default_fault
        return None if fault == "ok" else fault

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def _headers(message) -> dict[str, str]:
    """Header names in lower case, so tests need not guess the client's spelling."""
    return {name.lower(): value for name, value in message.items()}


def _check_fault(fault: str | None) -> None:
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (choose from: {', '.join(FAULTS)})")
