"""Per-latent top activations and statistics as one exactly mergeable accumulator (pure numpy, no Ray).

`LatentRecord.update(sample_ids, acts)` takes the latent activations of a batch of samples
(`[B, tokens, latents]`); `a.merge(b)` combines two records built on disjoint samples. Whatever the
split into shards, batches or workers, the result is the same as one pass over all samples:

- `top["max"]` / `top["mean"]`: per latent the `k` samples with the highest max (or mean) activation
  over their tokens, ordered by score descending then by sample id ascending (ties are broken by
  id), each with its per-token activation map. Samples scoring <= 0 are not kept.
- `reservoir`: per latent a uniform random sample of up to `m` samples on which it fires, chosen by
  the lowest hash of `(seed, latent, sample id)` (a bottom-m sketch, so merging is exact), with their
  max activation: the activation histogram and quantiles of the dashboard, and random examples.
- `negatives`: per latent up to `n` samples on which it never fires, the lowest sample hashes (shared
  by all latents, so few distinct images): the non-activating images of detection scoring.
- sums: samples, tokens, firing tokens (per token kind), firing samples and the activation total.
- `text` (multimodal language models only): per latent the top text tokens of the prompts
  (`texttop.TextTop`); the maps and sums above are over the image tokens (each image's base view).
- `crops` (LLaVA-NeXT's high-resolution crops): per ranking, the top samples' maps on the crop view's tokens,
  entry for entry beside `top` (ranked by the base view, as `top`; `tiles` draws them).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field, replace

import numpy as np

from prisma_ray.errors import InvalidRequest

from .ranking import best_order, check_range
from .texttop import PromptTokens, TextTop

RANKINGS = ("max", "mean")
N_KINDS = 4  # TokenKind CLS, REGISTER, PATCH, DISTILLATION
_EMPTY_PRIORITY = np.iinfo(np.uint64).max


@dataclass
class TopK:
    """Per latent the best `k` entries: scores `float32[L, k]` (-inf where empty), sample ids `str[L, k]`
    ("" where empty) and per-token activation maps `float16[L, k, tokens]`."""

    scores: np.ndarray
    ids: np.ndarray
    maps: np.ndarray

    @classmethod
    def empty(cls, n_latents: int, k: int, n_tokens: int) -> TopK:
        return cls(
            np.full((n_latents, k), -np.inf, np.float32),
            np.full((n_latents, k), "", dtype="<U1"),
            np.zeros((n_latents, k, n_tokens), np.float16),
        )

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def merge(self, scores: np.ndarray, ids: np.ndarray, maps: np.ndarray) -> TopK:
        """The best `k` of these entries and the candidates `scores [L, n]`, `ids [L, n]`, `maps [L, n, tokens]`."""
        order, all_scores, all_ids = best_order(self.scores, self.ids, scores, ids)
        take = np.take_along_axis
        mine = order < self.k
        own = take(self.maps, np.where(mine, order, 0)[..., None], axis=1)
        new = take(maps, np.where(mine, 0, order - self.k)[..., None], axis=1).astype(np.float16)
        return TopK(take(all_scores, order, axis=1), take(all_ids, order, axis=1), np.where(mine[..., None], own, new))

    def count(self) -> np.ndarray:
        """`int64[L]`: the entries filled per latent."""
        return np.isfinite(self.scores).sum(1)


@dataclass
class Reservoir:
    """Per latent the `m` firing samples of lowest priority: priorities `uint64[L, m]`, ids, max activations."""

    priority: np.ndarray
    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, n_latents: int, m: int) -> Reservoir:
        return cls(
            np.full((n_latents, m), _EMPTY_PRIORITY, np.uint64),
            np.full((n_latents, m), "", dtype="<U1"),
            np.zeros((n_latents, m), np.float32),
        )

    def merge(self, priority: np.ndarray, ids: np.ndarray, values: np.ndarray) -> Reservoir:
        all_p = np.concatenate([self.priority, priority], axis=1)
        all_ids = np.concatenate([self.ids, ids.astype(str)], axis=1)
        order = np.lexsort((all_ids, all_p), axis=-1)[:, : self.priority.shape[1]]
        take = np.take_along_axis
        values = np.concatenate([self.values, values], axis=1)
        return Reservoir(take(all_p, order, axis=1), take(all_ids, order, axis=1), take(values, order, axis=1))

    def filled(self) -> np.ndarray:
        return self.priority != _EMPTY_PRIORITY


def sample_hashes(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """`uint64[B]`: a stable hash of each sample id under `seed`."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}\t{s}".encode(), digest_size=8).digest(), "little")
            for s in sample_ids
        ],
        dtype=np.uint64,
    )


def mix(h: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """`uint64[L, B]`: splitmix64 of each sample hash `h [B]` combined with each latent index `[L]`."""
    with np.errstate(over="ignore"):
        z = h[None, :] + (latents.astype(np.uint64)[:, None] + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(kw_only=True)
class LatentRecord:
    """What one pass learns about every latent; see the module docstring. Merge records of disjoint samples."""

    top: dict[str, TopK]
    reservoir: Reservoir
    negatives: Reservoir
    n_samples: int = 0
    n_tokens: int = 0
    fire_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fire_by_kind: np.ndarray = field(default_factory=lambda: np.zeros((0, N_KINDS), np.int64))
    fire_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    act_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    seed: int = 0
    text: TextTop | None = None
    crops: dict[str, TopK] | None = None

    @classmethod
    def empty(
        cls,
        n_latents: int,
        n_tokens: int,
        k: int = 16,
        reservoir: int = 256,
        negatives: int = 8,
        seed: int = 0,
        text: bool = False,
        crop_tokens: int = 0,
    ) -> LatentRecord:
        """A record of no samples (`text`: it also keeps the top text tokens, see `update_text`; `crop_tokens`:
        the top samples' maps on that many crop-view tokens, see `update`)."""
        return cls(
            top={r: TopK.empty(n_latents, k, n_tokens) for r in RANKINGS},
            reservoir=Reservoir.empty(n_latents, reservoir),
            negatives=Reservoir.empty(n_latents, negatives),
            fire_tokens=np.zeros(n_latents, np.int64),
            fire_by_kind=np.zeros((n_latents, N_KINDS), np.int64),
            fire_samples=np.zeros(n_latents, np.int64),
            act_sum=np.zeros(n_latents, np.float64),
            seed=seed,
            text=TextTop.empty(n_latents, k) if text else None,
            crops={r: TopK.empty(n_latents, k, crop_tokens) for r in RANKINGS} if crop_tokens else None,
        )

    @property
    def n_latents(self) -> int:
        return len(self.fire_tokens)

    @property
    def n_tokens_per_sample(self) -> int:
        return self.top["max"].maps.shape[2]

    def update(
        self, sample_ids: np.ndarray, acts: np.ndarray, kinds: np.ndarray, crops: np.ndarray | None = None
    ) -> LatentRecord:
        """This record with a batch added: `acts float32[B, tokens, L]` of samples `sample_ids [B]`, token kinds `[tokens]`;
        `crops float32[B, crop tokens, L]` where the record keeps crop-view maps (given with them, else None).

        Raises `InvalidRequest` naming the samples and latents when `acts` hold NaN or inf, or magnitudes
        beyond `MAP_MAX` (the per-token maps are kept as float16, which would turn them into inf).
        """
        acts = np.asarray(acts, dtype=np.float32)
        if acts.ndim != 3 or acts.shape[1:] != (self.n_tokens_per_sample, self.n_latents):
            raise InvalidRequest(
                f"activations {list(acts.shape)} do not fit a record of {self.n_latents} latents and "
                f"{self.n_tokens_per_sample} tokens per sample: expected [samples, {self.n_tokens_per_sample}, "
                f"{self.n_latents}] (one sample's tokens per row, as the top samples rank samples)"
            )
        b, t, n = acts.shape
        check_range(acts, sample_ids)
        if (crops is None) != (self.crops is None):
            raise ValueError("give crop-view activations exactly when the record keeps crop maps (crop_tokens)")
        if crops is not None:
            crops = np.asarray(crops, dtype=np.float32)
            width = self.crops["max"].maps.shape[2]
            if crops.shape != (b, width, n):
                raise InvalidRequest(f"crop-view activations {list(crops.shape)}, expected {[b, width, n]}")
            check_range(crops, sample_ids)
        ids = np.broadcast_to(np.asarray(sample_ids, dtype=str)[None, :], (n, b))
        maps = acts.transpose(2, 0, 1)  # [L, B, T]
        peak = acts.max(1).T  # [L, B]
        mean = acts.astype(np.float64).mean(1).T.astype(np.float32)
        scores = {"max": peak, "mean": mean}
        kept = {r: np.where(scores[r] > 0, scores[r], -np.inf) for r in RANKINGS}
        top = {r: self.top[r].merge(kept[r], ids, maps) for r in RANKINGS}
        if crops is not None:  # the same candidates in the same order: entry for entry beside `top`
            crops = {r: self.crops[r].merge(kept[r], ids, crops.transpose(2, 0, 1)) for r in RANKINGS}
        hashes = sample_hashes(ids[0], self.seed)
        priority = np.where(peak > 0, mix(hashes, np.arange(n)), _EMPTY_PRIORITY)
        silent = np.where(peak > 0, _EMPTY_PRIORITY, np.broadcast_to(hashes, (n, b)))
        firing = acts > 0
        by_kind = np.stack([firing[:, np.asarray(kinds) == kind].sum((0, 1)) for kind in range(N_KINDS)], axis=1)
        return LatentRecord(
            top=top,
            reservoir=self.reservoir.merge(priority.astype(np.uint64), ids, peak),
            negatives=self.negatives.merge(silent.astype(np.uint64), ids, np.zeros_like(peak)),
            n_samples=self.n_samples + b,
            n_tokens=self.n_tokens + b * t,
            fire_tokens=self.fire_tokens + firing.sum((0, 1)),
            fire_by_kind=self.fire_by_kind + by_kind,
            fire_samples=self.fire_samples + (peak > 0).sum(1),
            act_sum=self.act_sum + acts.astype(np.float64).sum((0, 1)),
            seed=self.seed,
            text=self.text,
            crops=crops,
        )

    def update_text(self, sample_ids: np.ndarray, acts: list[np.ndarray], prompts: list[PromptTokens]) -> LatentRecord:
        """This record with a batch's text tokens added (`TextTop.update`: `acts[b] float32[n_b, L]` on the text
        tokens of `prompts[b]`); the counts are those `update` adds with the same batch's image tokens."""
        if self.text is None:
            raise ValueError("this record keeps no text tokens; make it with LatentRecord.empty(..., text=True)")
        return replace(self, text=self.text.update(list(sample_ids), acts, prompts))

    def merge(self, other: LatentRecord) -> LatentRecord:
        """The record of both sample sets (which must be disjoint)."""
        if (
            other.n_latents != self.n_latents
            or other.seed != self.seed
            or (other.text is None) != (self.text is None)
            or (other.crops is None) != (self.crops is None)
        ):
            raise ValueError("cannot merge records of different dictionaries, reservoir seeds or token kinds")
        o = other
        return LatentRecord(
            top={r: self.top[r].merge(o.top[r].scores, o.top[r].ids, o.top[r].maps) for r in RANKINGS},
            reservoir=self.reservoir.merge(o.reservoir.priority, o.reservoir.ids, o.reservoir.values),
            negatives=self.negatives.merge(o.negatives.priority, o.negatives.ids, o.negatives.values),
            n_samples=self.n_samples + o.n_samples,
            n_tokens=self.n_tokens + o.n_tokens,
            fire_tokens=self.fire_tokens + o.fire_tokens,
            fire_by_kind=self.fire_by_kind + o.fire_by_kind,
            fire_samples=self.fire_samples + o.fire_samples,
            act_sum=self.act_sum + o.act_sum,
            seed=self.seed,
            text=None if self.text is None else self.text.merge(o.text),
            crops=None
            if self.crops is None
            else {r: self.crops[r].merge(o.top[r].scores, o.top[r].ids, o.crops[r].maps) for r in RANKINGS},
        )

    def to_bytes(self) -> bytes:
        """An `.npz` (no pickle) of the record, to pass between Ray tasks as one value."""
        arrays = {f"top_{r}_{name}": getattr(self.top[r], name) for r in RANKINGS for name in ("scores", "ids", "maps")}
        for part in ("reservoir", "negatives"):
            arrays.update(
                {f"{part}_{name}": getattr(getattr(self, part), name) for name in ("priority", "ids", "values")}
            )
        counts = np.array([self.n_samples, self.n_tokens, self.seed], np.int64)
        buf = io.BytesIO()
        np.savez(
            buf,
            counts=counts,
            fire_tokens=self.fire_tokens,
            fire_by_kind=self.fire_by_kind,
            fire_samples=self.fire_samples,
            act_sum=self.act_sum,
            **arrays,
            **(self.text.arrays() if self.text is not None else {}),
            **({f"crops_{r}_maps": self.crops[r].maps for r in RANKINGS} if self.crops is not None else {}),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentRecord:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            top = {r: TopK(z[f"top_{r}_scores"], z[f"top_{r}_ids"], z[f"top_{r}_maps"]) for r in RANKINGS}
            reservoir, negatives = (
                Reservoir(z[f"{p}_priority"], z[f"{p}_ids"], z[f"{p}_values"]) for p in ("reservoir", "negatives")
            )
            n_samples, n_tokens, seed = (int(v) for v in z["counts"])
            return cls(
                top=top,
                reservoir=reservoir,
                negatives=negatives,
                n_samples=n_samples,
                n_tokens=n_tokens,
                fire_tokens=z["fire_tokens"],
                fire_by_kind=z["fire_by_kind"],
                fire_samples=z["fire_samples"],
                act_sum=z["act_sum"],
                seed=seed,
                text=TextTop.from_arrays(z),
                crops={r: TopK(top[r].scores, top[r].ids, z[f"crops_{r}_maps"]) for r in RANKINGS}
                if "crops_max_maps" in z
                else None,
            )
