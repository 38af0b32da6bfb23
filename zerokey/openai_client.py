"""A minimal OpenAI-compatible chat-completions client (stdlib ``urllib`` only).

Enough for what ZeroKey needs from a multimodal LLM -- one user message made of text and images,
one text answer -- and usable against OpenAI itself, vLLM / SGLang servers (e.g. ``vllm serve
allenai/Molmo-7B-D-0924``) or any other server speaking ``POST {base_url}/chat/completions``. We avoid
the ``openai`` package on purpose: it is not a dependency and the protocol subset is tiny.

Images travel inline as base64 PNG ``image_url`` parts (``data:image/png;base64,...``), so no file
server is needed and the request is self-contained.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["ChatClient", "ChatError", "encode_png_base64"]

log = logging.getLogger(__name__)


class ChatError(RuntimeError):
    """A chat request failed for good (after retries): HTTP error, unreachable server, bad JSON."""


def encode_png_base64(image: torch.Tensor | np.ndarray) -> str:
    """(H,W,3) float in [0,1] or uint8 image -> base64 PNG string (no ``data:`` prefix)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H,W,3|4), got {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ChatClient:
    """Blocking client for ``/chat/completions`` with retries on transient failures.

    Args:
        base_url: server root including the API prefix, e.g. ``http://localhost:8000/v1``.
        model: model name the server expects.
        api_key_env: name of the environment variable holding the API key. The key is read at request
            time (never stored in configs / logs); if the variable is unset no ``Authorization`` header
            is sent, which is what a local vLLM server without ``--api-key`` expects.
        timeout: seconds per request.
        max_retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx (exponential
            backoff starting at ``retry_backoff`` seconds). Other HTTP errors fail at once.
        max_tokens / temperature: sampling settings sent with every request (temperature 0: the
            answers should be reproducible).
        extra_body: extra JSON fields merged into every request (server-specific options).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.calls = 0  # requests sent (including retries); benchmarks report it

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions"

    def build_request(self, prompt: str, images: Sequence[torch.Tensor | np.ndarray] = ()) -> dict[str, Any]:
        """The JSON body for one user message: the prompt text, then each image as a PNG data URL."""
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        for image in images:
            url = "data:image/png;base64," + encode_png_base64(image)
            content.append({"type": "image_url", "image_url": {"url": url}})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        body.update(self.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, prompt: str, images: Sequence[torch.Tensor | np.ndarray] = ()) -> str:
        """Send one request and return the answer text ('' when the server returns no content).

        Raises :class:`ChatError` when the request keeps failing or the response is not a
        chat-completion; callers count that as a failed call instead of crashing the run.
        """
        data = json.dumps(self.build_request(prompt, images)).encode("utf-8")
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            self.calls += 1
            request = urllib.request.Request(self.endpoint, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace") if err.fp else ""
                last_error = ChatError(f"HTTP {err.code} from {self.endpoint}: {detail}")
                if err.code == 429 or err.code >= 500:
                    continue
                raise last_error from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_error = ChatError(f"cannot reach {self.endpoint}: {err}")
                continue
            return self._answer_text(payload)
        raise ChatError(f"giving up after {self.max_retries + 1} attempts: {last_error}") from last_error

    def _answer_text(self, payload: bytes) -> str:
        try:
            response = json.loads(payload)
            message = response["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ChatError(
                f"not a chat-completion response from {self.endpoint}: {payload[:200]!r}"
            ) from err
        content = message.get("content") if isinstance(message, dict) else None
        if content is None:
            return ""
        if isinstance(content, list):  # some servers return content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
