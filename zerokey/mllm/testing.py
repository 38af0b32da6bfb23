"""A local OpenAI-compatible chat server for tests and offline benchmarks (stdlib ``http.server``).

It stands in for an MLLM endpoint (vLLM, OpenAI) on 127.0.0.1 only: every ``POST .../chat/completions``
is decoded (prompt text + base64 PNG images) and answered by a Python function, so the client,
namer and pointer protocols are exercised for real -- HTTP, JSON, image encoding, answer parsing --
without a model. Requests are recorded for assertions. Its loops are bounded: a request body is at
most ``max_body_bytes``, a connection waits at most ``socket_timeout`` seconds for its bytes, and
after ``max_requests`` answers every further request gets HTTP 503.

:func:`molmo_style_answer` writes points the way served Molmo-7B-D answers "Point to the {name} in
this image.": one ``<point>``, one ``<points>`` tag with several numbered coordinates, or a
"Counting the <points ...>...</points> shows a total of N." sentence; "There are none." when nothing
is there. :class:`MolmoStub` answers per (image, name) like that from a ``locate`` function, and can
be told to answer a name with a refusal, an echoed prompt or a malformed tag instead -- the answers
the parser must classify (the tests state the expected parse of each).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

__all__ = ["ChatRequest", "FakeChatServer", "MolmoStub", "molmo_style_answer", "MOLMO_FAILURE_ANSWERS"]


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

    def __init__(
        self,
        answer: Callable[[ChatRequest], str | int],
        max_requests: int = 100_000,
        max_body_bytes: int = 64 << 20,
        socket_timeout: float = 10.0,
        keep_requests: bool = True,
    ) -> None:
        self.answer = answer
        self.requests: list[ChatRequest] = []
        #: False: requests are counted (``served``) but not kept -- a benchmark's thousands of decoded
        #: images would otherwise pile up in memory (about 1 MB each at 512 px).
        self.keep_requests = keep_requests
        self.served = 0
        self.max_requests, self.max_body_bytes = max_requests, max_body_bytes
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = socket_timeout  # a silent client cannot hold a thread forever

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

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
                if length > server.max_body_bytes:
                    self._send(413, {"error": {"message": f"body over {server.max_body_bytes} bytes"}})
                    return
                with server._lock:
                    over = server.served >= server.max_requests
                if over:
                    self._send(503, {"error": {"message": f"stub served its {server.max_requests} requests"}})
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                    request = _decode(body, {k.lower(): v for k, v in self.headers.items()})
                except (ValueError, KeyError, IndexError) as err:
                    self._send(400, {"error": {"message": f"bad request: {err}"}})
                    return
                with server._lock:
                    server.served += 1
                    if server.keep_requests:
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


# ------------------------------------------------------------------------------------ Molmo-like answers
def _fmt(value: float) -> str:
    return f"{value:.1f}"


def molmo_style_answer(name: str, points: Sequence[tuple[float, float]], counting: bool = False) -> str:
    """How served Molmo answers "Point to the {name} in this image." for points in percent (x, y):
    ``<point x=".." y=".." alt="name">name</point>`` for one, ``<points x1=.. y1=.. x2=.. ...>`` for
    several (with ``counting`` wrapped as "Counting the <points ...>name</points> shows a total of N."),
    "There are none." for none."""
    if not points:
        return "There are none."
    if len(points) == 1:
        x, y = points[0]
        return f'<point x="{_fmt(x)}" y="{_fmt(y)}" alt="{name}">{name}</point>'
    coords = " ".join(f'x{i + 1}="{_fmt(x)}" y{i + 1}="{_fmt(y)}"' for i, (x, y) in enumerate(points))
    tag = f'<points {coords} alt="{name}">{name}</points>'
    return f"Counting the {tag} shows a total of {len(points)}." if counting else tag


#: Answers that carry no usable point, as served models give them (the parse each must get is
#: asserted in tests/test_zerokey_parsing.py).
MOLMO_FAILURE_ANSWERS: dict[str, str] = {
    "refusal_none": "There are none.",
    "refusal_sorry": "I'm sorry, but I cannot see a {name} in this image.",
    "echo": "Point to the {name} in this image.",
    "malformed_coordinate": '<point x="left" y="40.5" alt="{name}">{name}</point>',
    "truncated": '<points x1="12.5" y1="40.0" x2="61.0" y2="4',
    "empty": "",
}

#: ours ("Point to the {name} in this image.") and the authors' code's ("point to the {name} on this image").
_POINT_PROMPT = re.compile(r"^\s*Point to the (.+?) (?:in|on) this image\.?\s*$", re.IGNORECASE | re.DOTALL)


@dataclass
class MolmoStub:
    """``answer`` function for :class:`FakeChatServer` that answers per-name pointing requests like
    served Molmo.

    Args:
        locate: ``(image (H,W,3) uint8, name) -> [(x%, y%), ...]``: where the name is in that image.
        failures: ``{name: key of MOLMO_FAILURE_ANSWERS}``: answer that name with that failure instead.
        counting: write several points as a "Counting the ..." sentence (as Molmo often does).
        fail_images: answer every request that carries an image with this HTTP status (text-only
            requests such as the pre-flight check still succeed): a server that breaks mid-run.
    """

    locate: Callable[[np.ndarray, str], Sequence[tuple[float, float]]]
    failures: dict[str, str] = field(default_factory=dict)
    counting: bool = True
    fail_images: int | None = None

    def __call__(self, request: ChatRequest) -> str | int:
        if not request.images:
            return "OK"
        if self.fail_images is not None:
            return self.fail_images
        m = _POINT_PROMPT.match(request.text)
        if m is None:
            return "I can only point to one thing at a time."
        name = m.group(1)
        if name in self.failures:
            return MOLMO_FAILURE_ANSWERS[self.failures[name]].format(name=name)
        return molmo_style_answer(name, list(self.locate(request.images[0], name)), self.counting)
