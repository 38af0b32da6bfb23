"""Chat-completions client for ZeroKey's MLLM calls, on the ``openai`` SDK, with a run-wide failure budget.

Everything ZeroKey asks of a multimodal LLM is one user message made of text and images, answered by
one text: a namer call per shape (GPT-4o in arXiv:2412.06292) and a pointing call per (view, name)
(Molmo served by vLLM, ``vllm serve allenai/Molmo-7B-D-0924 --trust-remote-code``). The SDK does the
HTTP work: connection pooling, timeouts, retries with backoff on connection errors / 408 / 409 / 429 /
5xx. This module adds only what ZeroKey needs on top:

* images travel inline as base64 PNG ``image_url`` parts, so no file server is needed;
* :meth:`ChatClient.ping` -- one cheap request before the first shape, so a server that is down or
  serves another model stops the run in seconds with one clear line instead of after a minute of
  per-call retries;
* :class:`CallBudget` -- counts calls and failures over the whole run (thread-safe: pointers send
  requests from a bounded pool). Once failures pass the budget, every further call fails at once
  without touching the network, and the prediction loop stops with a non-zero exit.

The API key is read from the environment variable named by ``api_key_env`` when the client is built;
it is never stored in configs, logged or written anywhere. A local server without ``--api-key``
needs no key: the SDK then sends the placeholder ``EMPTY``, which vLLM ignores.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ChatClient",
    "ChatError",
    "BudgetExceeded",
    "CallBudget",
    "MLLMRole",
    "encode_png_base64",
    "plain_settings",
]

log = logging.getLogger(__name__)


class ChatError(RuntimeError):
    """A chat request failed for good (after the SDK's retries): HTTP error, unreachable server,
    a response that is not a chat completion."""


class BudgetExceeded(ChatError):
    """The run's failed-call budget is spent: the call was not sent."""


class CallBudget:
    """Run-wide count of MLLM calls and failures, shared by the namer's and the pointer's clients.

    Two rules, one budget (``max_failed_fraction=1`` disables both):

    * **while the run goes** (:attr:`exceeded`, the run stops): ``failed > max_failed_fraction *
      max(calls, min_calls)``. With the defaults (2 %, 100) two failures are tolerated among the first
      100 calls, a dead server is detected at the third failure, and a long run may lose 2 % of its calls.
    * **at the end** (:attr:`exceeded_at_end`, the run is marked failed and exits non-zero): the same
      fraction of the calls actually made, without the 100-call floor, but never less than one failed
      call: ``failed > max(max_failed_fraction * calls, 1)`` (a fraction of 0 tolerates none). A
      2-shape run whose every call failed is therefore a failed run, while one flaky call in a small
      run only marks its shape failed (listed, and predicted again on resume).
    """

    def __init__(self, max_failed_fraction: float = 0.02, min_calls: int = 100) -> None:
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
        self.max_failed_fraction, self.min_calls = float(max_failed_fraction), int(min_calls)
        self.calls = 0
        self.failed = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def record(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            self.calls += 1
            if not ok:
                self.failed += 1
                self.last_error = error

    @property
    def exceeded(self) -> bool:
        if self.max_failed_fraction >= 1.0:
            return False
        return self.failed > self.max_failed_fraction * max(self.calls, self.min_calls)

    @property
    def exceeded_at_end(self) -> bool:
        return self.over_final_budget(self.calls, self.failed)

    def over_final_budget(self, calls: int, failed: int) -> bool:
        """The end-of-run rule (class docstring) for ``calls`` / ``failed`` summed over every process."""
        if self.max_failed_fraction >= 1.0:
            return False
        allowed = self.max_failed_fraction * calls
        return failed > (max(allowed, 1.0) if self.max_failed_fraction > 0 else allowed)

    def reason(self) -> str:
        return (
            f"{self.failed} of {self.calls} MLLM calls failed (budget {self.max_failed_fraction:.0%}); "
            f"last error: {self.last_error}"
        )


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
    """Blocking chat-completions client (``openai.OpenAI``) for one model on one server.

    Args:
        base_url: server root including the API prefix, e.g. ``http://localhost:8000/v1``.
        model: model name the server expects.
        api_key_env: environment variable holding the API key (read once here, never stored in a
            config). Unset or None: the placeholder ``EMPTY`` is sent (local vLLM without a key).
        timeout: seconds per request attempt.
        max_retries: the SDK's extra attempts on connection errors, timeouts, 408/409/429/5xx
            (exponential backoff from 0.5 s). Other HTTP errors fail at once.
        max_tokens / temperature: sampling settings sent with every request (temperature 0: the
            answers should be reproducible).
        extra_body: extra JSON fields merged into every request (server-specific options).
        budget: the run's :class:`CallBudget` (set by the prediction loop; None counts nothing).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 2,
        max_tokens: int = 512,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        budget: CallBudget | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.budget = budget
        key = os.environ.get(api_key_env) if api_key_env else None
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout, max_retries=self.max_retries
        )
        self._lock = threading.Lock()
        self.calls = 0  # requests answered or failed (one per complete(); SDK retries not counted)
        self.failed_calls = 0

    def settings(self) -> dict[str, Any]:
        """What identifies this client's answers (for a run's config hash): the model and sampling,
        not where it is served (a server restarted on another port answers the same); never the key."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "extra_body": self.extra_body,
        }

    def build_messages(self, prompt: str, images: Sequence[torch.Tensor | np.ndarray] = ()) -> list[dict]:
        """One user message: the prompt text, then each image as a PNG data URL."""
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        for image in images:
            url = "data:image/png;base64," + encode_png_base64(image)
            content.append({"type": "image_url", "image_url": {"url": url}})
        return [{"role": "user", "content": content}]

    def _count(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            self.calls += 1
            self.failed_calls += 0 if ok else 1
        if self.budget is not None:
            self.budget.record(ok, error)

    def _create(self, messages: list[dict], max_tokens: int, client: Any = None) -> str:
        import openai

        try:
            response = (client or self._client).chat.completions.create(
                model=self.model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=self.temperature,
                extra_body=self.extra_body or None,
            )
        except openai.APIStatusError as err:
            raise ChatError(f"HTTP {err.status_code} from {self.base_url}: {str(err)[:300]}") from err
        except openai.APIConnectionError as err:  # includes timeouts
            raise ChatError(f"cannot reach {self.base_url}: {err}") from err
        except openai.OpenAIError as err:  # e.g. a body that is not a chat completion
            raise ChatError(f"bad response from {self.base_url}: {str(err)[:300]}") from err
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as err:
            raise ChatError(f"not a chat completion from {self.base_url}: {response!r:.200}") from err
        return content or ""

    def complete(self, prompt: str, images: Sequence[torch.Tensor | np.ndarray] = ()) -> str:
        """Send one request and return the answer text ('' when the server returns no content).

        Raises :class:`ChatError` when the request fails after the SDK's retries (counted as a failed
        call), or :class:`BudgetExceeded` without sending anything once the run's budget is spent.
        """
        if self.budget is not None and self.budget.exceeded:
            raise BudgetExceeded(self.budget.reason())
        try:
            answer = self._create(self.build_messages(prompt, images), self.max_tokens)
        except ChatError as err:
            self._count(False, str(err))
            raise
        self._count(True)
        return answer

    def ping(self, timeout: float = 30.0) -> None:
        """One cheap request (a one-token text completion, no retries) before a run starts.

        Raises :class:`ChatError` with the server's own message when it is down, refuses the model
        name, or answers something that is not a chat completion. Not counted in the budget.
        """
        client = self._client.with_options(timeout=timeout, max_retries=0)
        try:
            self._create([{"role": "user", "content": "Reply with OK."}], 1, client)
        except ChatError as err:
            raise ChatError(f"server check failed for model {self.model!r}: {err}") from err


class MLLMRole:
    """What a namer or a pointer offers the prediction loop besides answering:

    * ``check()`` -- called once before the first shape; raise with one clear line when it cannot
      work (server down, weights missing) so a run fails in seconds, not per shape;
    * ``attach_budget(budget)`` -- the run's :class:`CallBudget` for its calls;
    * ``settings()`` -- what determines its answers (hashed into each run's config hash).
    """

    def check(self) -> None:  # noqa: B027 - optional hook
        """Pre-flight check before the first shape (default: nothing to check)."""

    def attach_budget(self, budget: CallBudget) -> None:  # noqa: B027 - optional hook
        """Count this part's calls in the run's failure budget (default: it makes no calls)."""

    def settings(self) -> dict[str, Any]:
        """Public plain-valued attributes (what a config sets), for the run's config hash."""
        return plain_settings(self)


def plain_settings(obj: Any) -> dict[str, Any]:
    """``obj``'s public attributes that are plain values (numbers, strings, lists, dicts), plus a
    ``ChatClient``'s own settings -- never an API key (clients do not keep one as an attribute)."""
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_"):
            continue
        if isinstance(value, ChatClient):
            out[key] = value.settings()
        elif value is None or isinstance(value, (bool, int, float, str, list, tuple, dict)):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
