"""A local OpenAI-compatible chat server for tests and offline benchmarks (stdlib ``http.server``).

It stands in for an MLLM endpoint (vLLM, OpenAI) on 127.0.0.1: every ``POST .../chat/completions``
is decoded (prompt text + base64 PNG images) and answered by a Python function, so the client,
namer and pointer protocols are exercised for real -- HTTP, JSON, image encoding, answer parsing --
without a model. Requests are recorded for assertions.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

__all__ = ["ChatRequest", "FakeChatServer"]


@dataclass
class ChatRequest:
    """One decoded request: the model name, the user's text, its images (H,W,3 uint8), raw body, headers."""

    model: str
    text: str
    images: list[np.ndarray]
    body: dict
    headers: dict[str, str]


def _decode(body: dict, headers: dict[str, str]) -> ChatRequest:
    texts, images = [], []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                data = base64.b64decode(url.split(",", 1)[1])
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return ChatRequest(body.get("model", ""), "\n".join(texts), images, body, headers)


class FakeChatServer:
    """Serve ``answer(request) -> str`` as an OpenAI-compatible endpoint on 127.0.0.1 (random port).

    ``answer`` may instead return an int HTTP status (e.g. 500) to simulate a server error, or raise
    to produce a 500. Use as a context manager; ``base_url`` is ``http://127.0.0.1:<port>/v1``.
    """

    def __init__(self, answer: Callable[[ChatRequest], str | int]) -> None:
        self.answer = answer
        self.requests: list[ChatRequest] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict | str) -> None:
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length))
                    request = _decode(body, {k.lower(): v for k, v in self.headers.items()})
                except (ValueError, KeyError, IndexError) as err:
                    self._send(400, {"error": {"message": f"bad request: {err}"}})
                    return
                with server._lock:
                    server.requests.append(request)
                try:
                    reply = server.answer(request)
                except Exception as err:  # the stand-in model crashed: a 500 like a real server
                    self._send(500, {"error": {"message": repr(err)}})
                    return
                if isinstance(reply, int):
                    self._send(reply, {"error": {"message": "simulated failure"}})
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "model": request.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
