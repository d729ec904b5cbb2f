"""Which tokens of each sample an extraction keeps, for fixed token layouts and multimodal sequences."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prisma_ray.errors import InvalidRequest

from .spec import MultimodalLayout, TokenKind, TokenLayout

MULTIMODAL_ONLY = ("text", "image")
MAX_TOKENS = int(np.iinfo(np.int16).max)  # the store's `token` and `frame` columns are int16


class TokenSelection(BaseModel):
    """Which tokens of each sample are stored.

    `all`: every token (multimodal models: every token but padding); `cls`: the CLS token only;
    `patches`: every patch token (no CLS, register or distillation tokens; multimodal models: the
    image tokens without row separators); `random`: `k` patch tokens per sample, drawn without
    replacement from `(seed, sample_id)`, so the choice does not depend on shards, batches or
    actors. Multimodal models only: `text` (the prompt and chat-template tokens) and `image` (the
    image tokens with their row separators).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["all", "cls", "patches", "random", "text", "image"] = Field(
        "all", description="all, cls, patches, random (k patch tokens), text or image (the last two: multimodal models)"
    )
    k: int | None = Field(None, ge=1, description="patch tokens kept per sample (mode=random)")
    seed: int = Field(0, description="seed of the random token choice (mode=random), mixed with each sample id")

    @model_validator(mode="after")
    def _k_with_random(self) -> TokenSelection:
        if (self.mode == "random") != (self.k is not None):
            raise InvalidRequest("set `k` (patch tokens per sample) when, and only when, mode is 'random'")
        return self


def check_selection(layout: TokenLayout, selection: TokenSelection, model_name: str, multimodal: bool = False) -> None:
    """Raise if `selection` asks for tokens that the model does not have (`layout`: its `blocks.*` layout)."""
    if multimodal:
        if selection.mode == "cls":
            raise InvalidRequest(
                f"{model_name}'s sequences have no CLS token; use tokens.mode=all, text, image, patches or random."
            )
        return
    if layout.n_tokens > MAX_TOKENS or layout.time * layout.tubelet > MAX_TOKENS:
        raise InvalidRequest(
            f"{model_name}: {layout.n_tokens} tokens over {layout.time * layout.tubelet} frames per sample exceed "
            f"the store's int16 token and frame columns (at most {MAX_TOKENS})"
        )
    if selection.mode in MULTIMODAL_ONLY:
        raise InvalidRequest(
            f"tokens.mode={selection.mode} is for multimodal language models; {model_name} has no text tokens "
            "(use all, cls, patches or random)."
        )
    if selection.mode == "cls" and TokenKind.CLS not in layout.prefix:
        prefix = [TokenKind(k).name.lower() for k in layout.prefix] or "none"
        raise InvalidRequest(
            f"{model_name} has no CLS token (prefix tokens: {prefix}); use tokens.mode=patches, random or all."
        )
    if selection.mode == "random" and selection.k > layout.n_patches:
        raise InvalidRequest(
            f"tokens.k={selection.k} but {model_name} has only {layout.n_patches} patch tokens per sample."
        )


def fixed_positions(layout: TokenLayout, selection: TokenSelection) -> np.ndarray | None:
    """`int64[K]` token positions kept from every sample, or None when they differ per sample (random)."""
    if selection.mode == "all":
        return np.arange(layout.n_tokens)
    if selection.mode == "patches":
        return np.arange(layout.n_prefix, layout.n_tokens)
    if selection.mode == "cls":
        return np.flatnonzero(layout.kinds() == TokenKind.CLS)
    return None


def tokens_per_sample(layout: TokenLayout, selection: TokenSelection) -> int:
    fixed = fixed_positions(layout, selection)
    return selection.k if fixed is None else len(fixed)


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _draw(selection: TokenSelection, sample_id: str, n: int) -> np.ndarray:
    """`k` ascending indices out of `n`, fixed by `(seed, sample_id)`."""
    rng = np.random.default_rng([selection.seed, stable_hash(str(sample_id))])
    return np.sort(rng.choice(n, size=selection.k, replace=False))


def token_positions(layout: TokenLayout, selection: TokenSelection, sample_ids: Sequence[str]) -> np.ndarray:
    """`int64[B, K]`: the token positions kept from each sample, ascending."""
    fixed = fixed_positions(layout, selection)
    if fixed is not None:
        return np.broadcast_to(fixed, (len(sample_ids), len(fixed)))
    out = np.empty((len(sample_ids), selection.k), dtype=np.int64)
    for i, sid in enumerate(sample_ids):
        out[i] = layout.n_prefix + _draw(selection, sid, layout.n_patches)
    return out


def token_columns(layout: TokenLayout, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(token, frame, kind)` store columns for `int64[B, K]` positions, flattened sample-major.

    `frame` is the first model-input frame the token covers (tubelet index x tubelet size) for
    video patch tokens, -1 for prefix tokens and images.
    """
    flat = positions.reshape(-1)
    return flat.astype(np.int16), layout.frames()[flat], layout.kinds()[flat]


def multimodal_positions(
    layout: MultimodalLayout, attention_mask: np.ndarray, selection: TokenSelection, sample_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """`(sample, position)`, both `int64[N]`: the kept tokens of a batch of multimodal sequences,
    sample-major and ascending within a sample; padding (`attention_mask` 0) is never kept."""
    keep = np.asarray(attention_mask).astype(bool)
    if selection.mode in ("patches", "random"):
        keep &= layout.kind == TokenKind.PATCH
    elif selection.mode == "image":
        keep &= layout.kind != TokenKind.TEXT
    elif selection.mode == "text":
        keep &= layout.kind == TokenKind.TEXT
    if selection.mode == "random":
        for b, sid in enumerate(sample_ids):
            candidates = np.flatnonzero(keep[b])
            if len(candidates) < selection.k:
                raise InvalidRequest(
                    f"sample {sid!r} has {len(candidates)} image patch tokens, fewer than tokens.k={selection.k}"
                )
            keep[b] = False
            keep[b, candidates[_draw(selection, sid, len(candidates))]] = True
    samples, positions = np.nonzero(keep)
    return samples.astype(np.int64), positions.astype(np.int64)
