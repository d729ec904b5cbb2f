"""One built model kept per process while `reuse_models` is on, so that the stages a campaign actor runs for one
model (extraction of each split, evaluation with splicing, the dashboard's pass) build it once, not once per stage.

`models.loading.load_model` asks `cached(key, build)`: within `reuse_models` the model of the last `key` is
returned as it is (the same object) and another key drops it before building its own (at most one model held, so
memory stays bounded by the largest model); outside, `build()` runs every time. The key is everything a build
depends on: the entry, the weights (published, a file and its SHA-256, or random from a seed), the device and the
dtype. The stages use the model read-only (eval mode, hooks added and removed within each call).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ReuseStats:
    """What `reuse_models` did: `builds` (models built) and `reused` (loads answered with the model held)."""

    builds: int = 0
    reused: int = 0


class _Held:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.key: Hashable | None = None
        self.model: Any = None
        self.stats = ReuseStats()

    def drop(self) -> None:
        if self.model is None:
            return
        on_cuda = any(p.is_cuda for p in self.model.parameters())
        self.key = self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


_HELD = _Held()


@contextlib.contextmanager
def reuse_models() -> Iterator[ReuseStats]:
    """Within this block (in this process, any thread), `load_model` returns the model it built last for the same
    entry, weights, device and dtype instead of building it again; a different model replaces it (one held at a
    time). On leaving the outermost block the held model is dropped. Yields the block's `ReuseStats`."""
    with _HELD.lock:
        if _HELD.depth == 0:
            _HELD.stats = ReuseStats()
        _HELD.depth += 1
        stats = _HELD.stats
    try:
        yield stats
    finally:
        with _HELD.lock:
            _HELD.depth -= 1
            if _HELD.depth == 0:
                _HELD.drop()


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """`build()`, or within `reuse_models` the model held for `key` (built now if another one, or none, is held:
    the other one is dropped first, so two models are never held at once)."""
    with _HELD.lock:
        reuse = _HELD.depth > 0
    if not reuse:
        return build()
    with _HELD.lock:
        if _HELD.key == key:
            _HELD.stats.reused += 1
            return _HELD.model
        _HELD.drop()
        model = build()
        _HELD.key, _HELD.model = key, model
        _HELD.stats.builds += 1
        return model


def device_key(device: str | torch.device | None) -> str | None:
    """`device` as one string per physical device (`cuda` and `cuda:0` alike where 0 is the current one)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)
