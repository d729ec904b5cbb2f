"""A small OpenAI-compatible chat-completions client (stdlib only), as served by vLLM or SGLang.

Requests go to `<base_url>/chat/completions`; images travel as `image_url` parts holding PNG data
URLs. At most `concurrency` requests are in flight per client, across threads. 429, 5xx, timeouts
and connection errors are retried with exponential backoff (honouring `Retry-After`); any other 4xx
and a malformed response fail at once with a `ChatError` naming the endpoint.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray.data.synthetic import encode_png
from prisma_ray.errors import PrismaRayError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class ChatError(PrismaRayError, ValueError):
    """A chat endpoint that cannot be used: unreachable, refusing the request, or answering nonsense."""


class ChatConfig(BaseModel):
    """Where and how to call a served multimodal model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible API root, e.g. vLLM's .../v1")
    model: str = Field("llava-hf/llava-onevision-qwen2-7b-ov-hf", description="the served model's name")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (None: no auth)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once per client")
    timeout_s: float = Field(120.0, gt=0, description="seconds before a request times out")
    max_retries: int = Field(5, ge=0, description="retries after the first attempt (429, 5xx, timeouts)")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(60.0, ge=0, description="longest retry delay, in seconds")
    max_tokens: int = Field(64, ge=1, description="most tokens generated per answer (OpenAI API: max_tokens)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")


def image_part(image: np.ndarray) -> dict:
    """A chat content part holding `uint8[H, W, 3]` as a PNG data URL."""
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


class ChatClient:
    """Calls `<base_url>/chat/completions` with retries, at most `concurrency` calls at a time."""

    def __init__(self, config: ChatConfig):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = None
        if config.api_key_env:
            self.api_key = os.environ.get(config.api_key_env)
            if not self.api_key:
                raise ChatError(f"api_key_env={config.api_key_env!r}: that environment variable is not set")
        self._slots = threading.BoundedSemaphore(config.concurrency)

    def complete(self, messages: list[dict]) -> str:
        """The text of the first choice of a chat completion of `messages`."""
        cfg = self.config
        body = json.dumps(
            {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(cfg.max_retries + 1):
            try:
                with self._slots:
                    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                    with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                        payload = response.read()
                return self._content(payload)
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                if e.code != 429 and e.code < 500:
                    raise ChatError(
                        f"{self.url}: HTTP {e.code} (not retried; check model, api_key_env and request): {detail}"
                    ) from e
                reason, retry_after = f"HTTP {e.code}: {detail}", _retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason, retry_after = f"{type(e).__name__}: {getattr(e, 'reason', e)}", None
            if attempt == cfg.max_retries:
                raise ChatError(
                    f"{self.url}: gave up after {attempt + 1} attempts; last error {reason}. "
                    "Check that the server is up (base_url) and not overloaded (concurrency)."
                )
            delay = min(cfg.max_backoff_s, retry_after if retry_after is not None else cfg.backoff_s * 2**attempt)
            log.warning("%s: %s; retry %d/%d in %.2fs", self.url, reason, attempt + 1, cfg.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ChatError(
                f"{self.url}: malformed chat completion ({type(e).__name__}: {e}): {payload[:300]!r}"
            ) from e
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ChatError(f"{self.url}: malformed chat completion: content is {type(content).__name__}")
        return content

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`fn` over `items` on `concurrency` threads, results in order."""
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            yield from pool.map(fn, items)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
