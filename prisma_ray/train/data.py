"""Training data from activation stores, without Ray: planning on the driver, shard reading in tasks.

`plan_data` checks the stores (they exist, widths, shared shards), counts the training rows per
shard and turns the manifests' statistics into the normalisation. `read_items` is the Ray Data
task body: for each `(epoch, shard)` item it reads that shard from every store, matches rows
across stores, keeps the configured token kinds, shuffles them (seeded by epoch and shard) and
yields float32 `x` (inputs, concatenated) and, for transcoders, `y` (targets) chunks.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from prisma_ray.errors import InvalidRequest

from .. import storage, store
from ..sae.dictionary import Site, Sites
from ..sae.trainer import Normalization, SiteStats
from .config import TrainData

CHUNK_ROWS = 16384


@dataclass(frozen=True, kw_only=True)
class Reader:
    """What a shard-reading task needs (picklable; storage options already resolved)."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    shards: tuple[str, ...]
    kinds: tuple[int, ...] | None
    seed: int
    options: storage.StorageOptions

    def read(self, shard: int, epoch: int) -> dict[str, np.ndarray]:
        """`{"x": float32[n, d_in]}` (+ `"y"` for transcoders) for one shard, matched, filtered and shuffled."""
        tables = [self._table(uri, self.shards[shard]) for uri in (*self.inputs, *self.targets)]
        tables = store.align(tables)
        if self.kinds is not None:
            keep = pc.is_in(tables[0].column("kind"), pa.array(self.kinds, pa.int8()))
            tables = [t.filter(keep) for t in tables]
        order = np.random.default_rng([self.seed, epoch, shard]).permutation(tables[0].num_rows)
        acts = [store.decode_acts(t.column("act"), store.store_dtype(t.schema))[order] for t in tables]
        out = {"x": _concat(acts[: len(self.inputs)])}
        if self.targets:
            out["y"] = _concat(acts[len(self.inputs) :])
        return out

    def _table(self, uri: str, name: str) -> pa.Table:
        fs, path = storage.resolve(uri, self.options)
        return pq.read_table(posixpath.join(path, name), filesystem=fs, columns=[*store.KEYS, "kind", "act"])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def read_items(batch: dict[str, np.ndarray], reader: Reader) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data `map_batches` body: `{"epoch", "shard"}` items -> chunks of training rows."""
    for epoch, shard in zip(batch["epoch"], batch["shard"]):
        rows = reader.read(int(shard), int(epoch))
        n = len(rows["x"])
        for start in range(0, n, CHUNK_ROWS):
            yield {k: v[start : start + CHUNK_ROWS] for k, v in rows.items()}


@dataclass(frozen=True, kw_only=True)
class DataPlan:
    """The checked training data: stores, shared shards, rows per shard, sites and normalisation."""

    reader: Reader
    rows: tuple[int, ...]
    sites: Sites
    normalization: Normalization

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def items(self, epochs: int) -> list[dict[str, int]]:
        """`(epoch, shard)` items, shards in a seeded random order per epoch."""
        items = []
        for epoch in range(epochs):
            order = np.random.default_rng([self.reader.seed, epoch]).permutation(len(self.rows))
            items += [{"epoch": epoch, "shard": int(s)} for s in order]
        return items

    def epochs_for(self, steps: int, batch_size: int) -> int:
        """Passes over the data that hold `steps` batches of `batch_size` rows."""
        return max(1, math.ceil(steps * batch_size / self.total_rows))


def plan_data(data: TrainData, options: storage.StorageOptions) -> DataPlan:
    """Check the stores of `data` and plan reading them; errors name the store and the fix."""
    options = options.resolved()
    uris = [storage.absolute(u) for u in (*data.inputs, *data.targets)]
    manifests = [store.read_manifest(uri, options) for uri in uris]
    names = [{posixpath.basename(p) for p in store.shard_paths(uri, options)} for uri in uris]
    shared = sorted(set.intersection(*names))
    if not shared:
        raise InvalidRequest(f"the stores {uris} have no shard in common; were they extracted from the same dataset?")
    n_in = len(data.inputs)
    kinds = tuple(store.KIND_CODES[k] for k in data.kinds) if data.kinds else None
    reader = Reader(
        inputs=tuple(uris[:n_in]),
        targets=tuple(uris[n_in:]),
        shards=tuple(shared),
        kinds=kinds,
        seed=data.shuffle_seed,
        options=options,
    )
    sites = [Site(name=m.hook, width=m.d_model, model=m.model) for m in manifests]
    stats = [SiteStats(torch.tensor(m.mean), torch.tensor(m.std) ** 2, m.mean_norm) for m in manifests]
    normalization = Normalization.from_stats(stats[:n_in], stats[n_in:] or None, data.normalize)
    return DataPlan(
        reader=reader,
        rows=_count_rows(reader),
        sites=Sites(inputs=tuple(sites[:n_in]), outputs=tuple(sites[n_in:])),
        normalization=normalization,
    )


def _count_rows(reader: Reader) -> tuple[int, ...]:
    """Training rows per shard of the first input store (footers only, or the `kind` column)."""
    fs, path = storage.resolve(reader.inputs[0], reader.options)
    counts = []
    for name in reader.shards:
        shard = posixpath.join(path, name)
        if reader.kinds is None:
            counts.append(pq.ParquetFile(shard, filesystem=fs).metadata.num_rows)
        else:
            kind = pq.read_table(shard, filesystem=fs, columns=["kind"]).column("kind")
            counts.append(int(pc.sum(pc.is_in(kind, pa.array(reader.kinds, pa.int8()))).as_py() or 0))
    if not sum(counts):
        raise InvalidRequest(f"{reader.inputs[0]}: no rows of the selected token kinds; check data.kinds")
    return tuple(counts)
