"""Per-latent top text tokens of a multimodal language model's sequences (pure numpy, exactly mergeable).

Each sample is an image asked one prompt. Its candidate for a latent is its most active text token (the
prompt's and the chat template's tokens; image tokens are read by `topk.LatentRecord`'s maps). Per latent the
`k` samples whose candidate scores highest are kept, ordered by score descending then sample id ascending
(`ranking.best_order`, as the top images), each with the token's text, its position in the sequence and its
context: a window of `WINDOW` pieces either side of it, the token marked `[[...]]`, where a run of image
tokens reads as one `<image>` (the image the prompt asked about). Samples scoring <= 0 are not kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prisma_ray.errors import InvalidRequest

from ..models.spec import TokenKind
from .ranking import best_order, check_range

WINDOW = 12
MARK = ("[[", "]]")
IMAGE_PIECE = "<image>"
FIELDS = ("scores", "ids", "positions", "tokens", "contexts")


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token id of `ids`, decoded alone by `tokenizer` (a transformers tokenizer; a byte of a
    multi-byte character decodes to U+FFFD, special tokens read as their names, e.g. `<image>`)."""
    return tokenizer.batch_decode([[int(i)] for i in ids])


@dataclass(frozen=True)
class PromptTokens:
    """The text tokens of one sample's sequence: `positions int64[n]` (their places in the sequence), `tokens`
    (each one's text) and `contexts` (each in its window, marked)."""

    positions: np.ndarray
    tokens: list[str]
    contexts: list[str]


def prompt_tokens(strings: Sequence[str], kinds: np.ndarray, mask: np.ndarray, window: int = WINDOW) -> PromptTokens:
    """The `PromptTokens` of one sequence: `strings[seq]` the text of each token, `kinds int8[seq]` its
    `TokenKind`, `mask bool[seq]` its attention mask (padding is left out). A run of image tokens (patches
    and row newlines) is one `<image>` piece of the contexts; `...` marks a cut window."""
    if not (len(strings) == len(kinds) == len(mask)):
        raise ValueError(f"prompt_tokens: {len(strings)} strings, {len(kinds)} kinds and {len(mask)} mask values")
    pieces: list[str] = []
    text_piece: list[int] = []
    positions: list[int] = []
    in_image = False
    for i in np.flatnonzero(mask):
        if kinds[i] == TokenKind.TEXT:
            positions.append(int(i))
            text_piece.append(len(pieces))
            pieces.append(strings[i])
        elif not in_image:
            pieces.append(IMAGE_PIECE)
        in_image = kinds[i] != TokenKind.TEXT
    contexts = []
    for j in text_piece:
        lo, hi = max(0, j - window), min(len(pieces), j + 1 + window)
        before = ("..." if lo > 0 else "") + "".join(pieces[lo:j])
        after = "".join(pieces[j + 1 : hi]) + ("..." if hi < len(pieces) else "")
        contexts.append(f"{before}{MARK[0]}{pieces[j]}{MARK[1]}{after}")
    return PromptTokens(np.asarray(positions, np.int64), [pieces[j] for j in text_piece], contexts)


@dataclass
class TextTop:
    """Per latent the best `k` samples by their most active text token: `scores float32[L, k]` (-inf where
    empty), sample `ids`, `positions int32[L, k]` (the token's place in the sequence, -1 where empty), `tokens`
    (its text) and `contexts` (its marked window), all `[L, k]`, "" where empty."""

    scores: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    tokens: np.ndarray
    contexts: np.ndarray

    @classmethod
    def empty(cls, n_latents: int, k: int) -> TextTop:
        blank = np.full((n_latents, k), "", dtype="<U1")
        return cls(
            np.full((n_latents, k), -np.inf, np.float32), blank, np.full((n_latents, k), -1, np.int32), blank, blank
        )

    def merge(self, other: TextTop) -> TextTop:
        """The best `k` of these entries and `other`'s (entries of other samples, any number per latent)."""
        order, scores, ids = best_order(self.scores, self.ids, other.scores, other.ids)
        take = np.take_along_axis
        rest = {
            name: take(np.concatenate([getattr(self, name), getattr(other, name)], axis=1), order, axis=1)
            for name in FIELDS[2:]
        }
        return TextTop(take(scores, order, axis=1), take(ids, order, axis=1), **rest)

    def update(self, sample_ids: Sequence[str], acts: Sequence[np.ndarray], prompts: Sequence[PromptTokens]) -> TextTop:
        """This top with a batch added: per sample `acts[b] float32[n_b, L]`, the latents of the text tokens of
        `prompts[b]` (in its order). Raises `InvalidRequest` naming the samples where `acts` hold NaN or inf."""
        n = self.scores.shape[0]
        if len(acts) != len(sample_ids) or len(prompts) != len(sample_ids):
            raise ValueError(f"{len(sample_ids)} samples but {len(acts)} activations and {len(prompts)} prompts")
        scores = np.full((n, len(sample_ids)), -np.inf, np.float32)
        positions = np.full((n, len(sample_ids)), -1, np.int32)
        tokens = np.full((n, len(sample_ids)), "", dtype=object)
        contexts = np.full((n, len(sample_ids)), "", dtype=object)
        for b, (a, prompt) in enumerate(zip(acts, prompts)):
            a = np.asarray(a, dtype=np.float32)
            if a.shape != (len(prompt.positions), n):
                raise InvalidRequest(
                    f"sample {sample_ids[b]!r}: text-token latents {list(a.shape)}, expected "
                    f"[{len(prompt.positions)} text tokens, {n} latents]"
                )
            if not len(a):
                continue
            check_range(a[None], np.asarray(sample_ids[b : b + 1]))
            best = a.argmax(0)
            peak = a[best, np.arange(n)]
            fired = peak > 0
            scores[fired, b] = peak[fired]
            positions[:, b] = np.where(fired, prompt.positions[best], -1)
            tokens[:, b] = np.where(fired, np.asarray(prompt.tokens, dtype=object)[best], "")
            contexts[:, b] = np.where(fired, np.asarray(prompt.contexts, dtype=object)[best], "")
        ids = np.broadcast_to(np.asarray(sample_ids, dtype=str)[None, :], scores.shape)
        return self.merge(TextTop(scores, ids, positions, tokens.astype(str), contexts.astype(str)))

    def arrays(self) -> dict[str, np.ndarray]:
        """The `.npz` arrays of this top (`text_<field>`; `from_arrays` reads them back)."""
        return {f"text_{name}": getattr(self, name) for name in FIELDS}

    @classmethod
    def from_arrays(cls, z) -> TextTop | None:
        """The top saved by `arrays` in `z` (an `np.load` of an `.npz`), None where it holds none."""
        if "text_scores" not in z:
            return None
        return cls(**{name: z[f"text_{name}"] for name in FIELDS})
