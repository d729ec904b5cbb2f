"""Your own weights (`weights:`): a checkpoint file loaded strictly into a registry architecture.

A checkpoint is a URI (plain path, `file://` or `s3://`, reached with `prisma_ray.storage`) of either a
safetensors file (`.safetensors`) or a torch file read with `torch.load(weights_only=True)` (no pickled
code runs): a state dict, or a dict holding one under `state_dict` or `model` (Lightning, most training
scripts). Its keys are those of the module the registry builds (`HookedVisionModel.model`: the timm model,
the OpenCLIP vision tower `model.visual`, the `transformers` model), optionally all behind one prefix of
`PREFIXES` (DDP, Lightning, `torch.compile`), which is stripped and logged. Position embeddings of another
patch grid are resampled (bicubic, timm's `resample_abs_pos_embed`, the same math for every source) and
logged; any other difference (missing keys, unexpected keys, shapes) raises `InvalidRequest` naming the URI.
The file's SHA-256 is recorded with each store (`WeightsRef`), so evaluation rebuilds the same model and a
changed file is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..storage import StorageOptions

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model")  # a torch file's dict holding the state dict under one of these keys
PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, Lightning, torch.compile
POSITION_KEY = re.compile(r"(^|\.)(pos_embed|position_embeddings|positional_embedding|position_embedding\.weight)$")
SHOWN = 5  # keys listed per kind of mismatch


@dataclass(frozen=True)
class WeightsRef:
    """A checkpoint URI and the SHA-256 (hex) its bytes must have (None: not checked)."""

    uri: str
    sha256: str | None = None

    @classmethod
    def of(cls, uri: str, options: StorageOptions | None = None) -> WeightsRef:
        """`uri` (local paths made absolute, so that Ray workers find them) with the SHA-256 of its bytes now;
        a missing file raises `MissingInputError` naming it."""
        uri = storage.absolute(uri)
        return cls(uri, hashlib.sha256(_read(uri, options)).hexdigest())

    def record(self) -> dict[str, Any]:
        """`{"uri", "sha256"}`, as stores and results record it."""
        return {"uri": self.uri, "sha256": self.sha256}


def _read(uri: str, options: StorageOptions | None) -> bytes:
    storage.require_exists(uri, options)
    return storage.read_bytes(uri, options)


def read_weights(ref: WeightsRef | str, options: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the checkpoint `ref` (see the module docstring for the formats).

    Raises `InvalidRequest` naming the URI when its SHA-256 is not `ref.sha256` (naming both hashes), when
    the file is neither safetensors nor a torch file `weights_only=True` reads, or when it holds no state dict.
    """
    ref = WeightsRef(ref) if isinstance(ref, str) else ref
    data = _read(ref.uri, options)
    got = hashlib.sha256(data).hexdigest()
    if ref.sha256 is not None and got != ref.sha256:
        raise InvalidRequest(
            f"{ref.uri}: SHA-256 {got} is not the {ref.sha256} recorded for it (with the store, at extraction, "
            "or when this job started): the weights file changed; restore it, or extract again with the new file"
        )
    try:
        if ref.uri.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise InvalidRequest(
            f"{ref.uri}: not a safetensors file (name it *.safetensors) or a torch file that "
            f"torch.load(weights_only=True) reads: {type(e).__name__}: {e}"
        ) from None
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InvalidRequest(
            f"{ref.uri}: holds no state dict (a dict of tensors, or one under {' or '.join(WRAPPER_KEYS)})"
        )
    return loaded


def _strip_prefix(tensors: dict[str, torch.Tensor], expected: set[str], uri: str) -> dict[str, torch.Tensor]:
    """`tensors` without a prefix of `PREFIXES` that every key has and the module's keys have not (logged)."""
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in tensors) and not all(k.startswith(prefix) for k in expected):
            log.info("%s: stripped the prefix %r from every key", uri, prefix)
            return _strip_prefix({k.removeprefix(prefix): v for k, v in tensors.items()}, expected, uri)
    return tensors


def _grid(tokens: int, prefix: int) -> int | None:
    side = math.isqrt(max(tokens - prefix, 0))
    return side if side > 0 and side * side == tokens - prefix else None


def resample_position(key: str, given: torch.Tensor, shape: torch.Size, uri: str) -> torch.Tensor | None:
    """`given` (a position embedding `[1, prefix + g*g, D]` or `[prefix + g*g, D]`) resampled to `shape` (the
    model's, with the same prefix tokens and width), or None when they differ otherwise. Bicubic with
    antialiasing, as timm resamples checkpoints; logged with both grids."""
    if not POSITION_KEY.search(key) or given.dim() != len(shape) or given.dim() not in (2, 3):
        return None
    if given.shape[-1] != shape[-1] or (given.dim() == 3 and given.shape[0] != 1):
        return None
    from timm.layers import resample_abs_pos_embed

    for prefix in range(0, 9):  # CLS, distillation and register tokens: the prefix that leaves two square grids
        old, new = _grid(given.shape[-2], prefix), _grid(shape[-2], prefix)
        if old and new:
            resampled = resample_abs_pos_embed(
                given.reshape(1, *given.shape[-2:]), [new, new], num_prefix_tokens=prefix
            )
            log.info("%s: resampled %s from a %dx%d to a %dx%d patch grid", uri, key, old, old, new, new)
            return resampled.reshape(shape)
    return None


def _listed(kind: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{len(items)} {kind}: {', '.join(items[:SHOWN])}{more}"


def fit_weights(module: nn.Module, tensors: dict[str, torch.Tensor], uri: str, name: str) -> dict[str, torch.Tensor]:
    """`tensors` (read from `uri`) made to fit `module` (`name`'s architecture; a `meta` module checks without
    memory): a common prefix stripped and position embeddings of another grid resampled (both logged). Missing
    keys, unexpected keys and other shape differences raise `InvalidRequest` listing the first few of each with
    their counts."""
    expected = module.state_dict()
    tensors = _strip_prefix(tensors, set(expected), uri)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = []
    for key in sorted(set(expected) & set(tensors)):
        if tensors[key].shape != expected[key].shape:
            resampled = resample_position(key, tensors[key], expected[key].shape, uri)
            if resampled is None:
                shapes.append(f"{key} {tuple(tensors[key].shape)} vs {tuple(expected[key].shape)}")
            else:
                tensors[key] = resampled
    if missing or unexpected or shapes:
        parts = [
            _listed(kind, items)
            for kind, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise InvalidRequest(
            f"{uri} does not fit {name}: {'; '.join(parts)} (checkpoint vs model). The keys must be those of the "
            "module the registry builds (timm model, OpenCLIP vision tower, transformers model)"
        )
    return tensors


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], uri: str, name: str) -> None:
    """Copy `tensors` (read from `uri`) into `module` (`name`'s architecture) strictly, in place (`fit_weights`)."""
    module.load_state_dict(fit_weights(module, tensors, uri, name), strict=True)


def checked_weights(uri: str | None, options: StorageOptions | None, module: nn.Module, name: str) -> WeightsRef | None:
    """A job's `weights:` before any work starts: its `WeightsRef` (SHA-256 now), once the checkpoint is read and
    found to fit `module` (`name`'s architecture, e.g. `describe_model(...).model` on `meta`); None without `uri`."""
    if uri is None:
        return None
    ref = WeightsRef.of(uri, options)
    fit_weights(module, read_weights(ref, options), ref.uri, name)
    return ref
