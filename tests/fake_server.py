"""A local OpenAI-compatible HTTP server that misbehaves on purpose, for client tests."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[str, dict[str, Any] | None, int], tuple[int, dict[str, str], bytes]]


def completion_body(text: str, model: str = "fake") -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    ).encode()


def sse_body(pieces: list[str], done: bool = True) -> bytes:
    events = [
        {"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces
    ]
    if done:
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


MODELS = json.dumps({"data": [{"id": "fake", "max_model_len": 2048}]}).encode()


@contextmanager
def fake_server(handler: Handler) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """Serve ``handler(path, body, call_number)``; yields the base URL and the request log."""
    requests: list[tuple[str, Any]] = []
    lock = threading.Lock()

    class Handle(BaseHTTPRequestHandler):
        def _serve(self, body: dict[str, Any] | None) -> None:
            with lock:
                requests.append((self.path, body))
                number = len(requests)
            status, headers, payload = handler(self.path, body, number)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(None)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            self._serve(json.loads(self.rfile.read(length) or b"null"))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` (ASGI) under uvicorn in a thread; yields its base URL. The socket listens before
    the server starts, so requests wait in its backlog instead of the test waiting for it."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()
