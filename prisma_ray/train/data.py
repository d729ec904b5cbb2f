"""Training data from activation stores, without Ray: planning on the driver, the run's row order, reading.

`plan_data` checks the stores (they exist, widths, shared shards), counts the training rows per
shard (rows matched across stores, of the configured token kinds) and turns the manifests'
statistics into the normalisation.

The run's row order (`RowOrder`) is a pure function of the shuffle seed, the shared shard list and
the rows per shard: epoch after epoch, the shards in a seeded order per epoch, each shard's rows in
the seeded order `Reader.read` gives them. A `Schedule` cuts the rows a run still has to train on
(its `DataPosition`, saved in every checkpoint) into one contiguous part per worker, so the rows of
every step on every worker are a pure function of (seed, shards, position, world size, step, rank),
and a run resumed from a checkpoint trains exactly the rows an uninterrupted run would. A worker
reads its part as `Piece`s (a row range of one shuffled shard; `read_piece` is the Ray task body)
and cuts it into batches (`batches`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from prisma_ray.errors import InvalidRequest, PrismaRayError

from .. import storage, store
from ..sae.dictionary import Site, Sites
from ..sae.trainer import Normalization, SiteStats
from .config import TrainData

Span = tuple[int, int]  # rows [start, stop) of a run's row order


@dataclass(frozen=True, kw_only=True)
class Reader:
    """What reading a shard needs (picklable; storage options already resolved)."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    shards: tuple[str, ...]
    kinds: tuple[int, ...] | None
    seed: int
    options: storage.StorageOptions

    def read(self, shard: int, epoch: int) -> dict[str, np.ndarray]:
        """`{"x": float32[n, d_in]}` (+ `"y"` for transcoders) for one shard, matched, filtered and shuffled
        (seeded by the seed, `epoch` and `shard`); n is `count(shard)`."""
        tables = self._tables(shard, [*store.KEYS, "kind", "act"])
        order = np.random.default_rng([self.seed, epoch, shard]).permutation(tables[0].num_rows)
        acts = [store.decode_acts(t.column("act"), store.store_dtype(t.schema))[order] for t in tables]
        out = {"x": _concat(acts[: len(self.inputs)])}
        if self.targets:
            out["y"] = _concat(acts[len(self.inputs) :])
        return out

    def count(self, shard: int) -> int:
        """Training rows of one shard: rows matched across the stores, of the selected token kinds (from the
        Parquet footers where every store holds the same number of rows and all kinds are kept)."""
        name = self.shards[shard]
        uris = (*self.inputs, *self.targets)
        counts = set()
        for uri in uris:
            fs, path = storage.resolve(uri, self.options)
            counts.add(pq.ParquetFile(posixpath.join(path, name), filesystem=fs).metadata.num_rows)
        if self.kinds is None and len(counts) == 1:
            return counts.pop()
        columns = ["kind"] if len(uris) == 1 else [*store.KEYS, "kind"]
        return self._tables(shard, columns)[0].num_rows

    def _tables(self, shard: int, columns: list[str]) -> list[pa.Table]:
        """`columns` of one shard of every store (inputs, then targets), rows matched and kinds selected."""
        tables = [self._table(uri, self.shards[shard], columns) for uri in (*self.inputs, *self.targets)]
        if len(tables) > 1:
            tables = store.align(tables)
        if self.kinds is not None:
            keep = pc.is_in(tables[0].column("kind"), pa.array(self.kinds, pa.int8()))
            tables = [t.filter(keep) for t in tables]
        return tables

    def _table(self, uri: str, name: str, columns: list[str]) -> pa.Table:
        fs, path = storage.resolve(uri, self.options)
        return pq.read_table(posixpath.join(path, name), filesystem=fs, columns=columns)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class Piece:
    """Rows `[start, stop)` of shard `shard` (an index into the shard list) as shuffled for `epoch`."""

    epoch: int
    shard: int
    start: int
    stop: int


def read_piece(piece: Piece, reader: Reader) -> dict[str, np.ndarray]:
    """The rows of `piece` (`Reader.read` of its shard and epoch, cut to its range); the Ray task body."""
    rows = reader.read(piece.shard, piece.epoch)
    if len(rows["x"]) < piece.stop:
        raise PrismaRayError(
            f"{reader.inputs[0]}/{reader.shards[piece.shard]}: {len(rows['x'])} training rows where the run was "
            f"planned with at least {piece.stop}; was the store changed during the run?"
        )
    return {k: v[piece.start : piece.stop] for k, v in rows.items()}


@dataclass(frozen=True, kw_only=True)
class RowOrder:
    """A run's endless row order (see the module docstring): row `i` of epoch `e` is offset
    `e * sum(rows) + i`. A pure function of `seed`, `shards` (the shared shard file names) and `rows`."""

    seed: int
    shards: tuple[str, ...]
    rows: tuple[int, ...]

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch `epoch` reads them."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def pieces(self, spans: Iterable[Span]) -> Iterator[Piece]:
        """The pieces of shards that hold the rows of `spans`, in order."""
        total = sum(self.rows)
        ends: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for start, stop in spans:
            while start < stop:
                epoch, at = divmod(start, total)
                if epoch not in ends:
                    ends.clear()
                    order = self.shard_order(epoch)
                    ends[epoch] = (order, np.cumsum(np.asarray(self.rows)[order]))
                order, cum = ends[epoch]
                i = int(np.searchsorted(cum, at, side="right"))
                begin = int(cum[i]) - self.rows[order[i]]
                take = min(stop - start, int(cum[i]) - at)
                yield Piece(epoch, int(order[i]), at - begin, at - begin + take)
                start += take


@dataclass(frozen=True)
class DataPosition:
    """Where a run stands in its row order: `pending`, the spans planned and not trained on yet (in the
    order they will be), and `next`, the first offset never planned. A fresh run: nothing pending, next 0."""

    pending: tuple[Span, ...] = ()
    next: int = 0

    def to_json(self, order: RowOrder) -> str:
        """The position, with the order it is a position in (saved in every checkpoint)."""
        return json.dumps(
            {
                "seed": order.seed,
                "shards": list(order.shards),
                "rows": list(order.rows),
                "pending": [list(s) for s in self.pending],
                "next": self.next,
            }
        )

    @classmethod
    def from_json(cls, text: str, order: RowOrder, where: str) -> DataPosition:
        """The position `to_json` saved at `where` (named in errors); it must be in `order`."""
        saved = json.loads(text)
        if (saved["seed"], tuple(saved["shards"]), tuple(saved["rows"])) != (order.seed, order.shards, order.rows):
            raise InvalidRequest(
                f"{where}: the checkpoint was written by a run over other training data (shuffle_seed, shards or "
                "training rows per shard differ); resume with the same data config and stores, or start a new run name"
            )
        return cls(tuple((int(a), int(b)) for a, b in saved["pending"]), int(saved["next"]))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The rows each of `world` workers trains on from step `start` to `steps`, with `batch_size` rows per
    step over all workers: the first `(steps - start) * batch_size` rows `position` has to give (its
    pending spans, then fresh rows from `next` on), cut into `world` contiguous equal parts in rank
    order; worker `rank` takes `batch_size // world` rows of its part per step."""

    position: DataPosition
    start: int
    steps: int
    batch_size: int
    world: int

    @property
    def worker_batch(self) -> int:
        return self.batch_size // self.world

    def part(self, rank: int) -> list[Span]:
        """The spans worker `rank` trains on, in order."""
        n = self._part_rows()
        return _cut(self._plan(), rank * n, (rank + 1) * n)

    def position_at(self, step: int) -> DataPosition:
        """The position once every worker has taken steps `start` to `step` (what a checkpoint at `step` saves)."""
        done, n, plan = (step - self.start) * self.worker_batch, self._part_rows(), self._plan()
        pending = [span for rank in range(self.world) for span in _cut(plan, rank * n + done, (rank + 1) * n)]
        fresh = max(0, (self.steps - self.start) * self.batch_size - _length(self.position.pending))
        return DataPosition(_merge(pending), self.position.next + fresh)

    def _part_rows(self) -> int:
        return (self.steps - self.start) * self.worker_batch

    def _plan(self) -> list[Span]:
        need = (self.steps - self.start) * self.batch_size
        plan = _cut(list(self.position.pending), 0, need)
        missing = need - _length(plan)
        return _merge([*plan, (self.position.next, self.position.next + missing)] if missing else plan)


def _length(spans: Sequence[Span]) -> int:
    return sum(b - a for a, b in spans)


def _cut(spans: Sequence[Span], start: int, stop: int) -> list[Span]:
    """Rows `[start, stop)` of the concatenation of `spans`, as spans."""
    out, at = [], 0
    for a, b in spans:
        lo, hi = max(a, a + start - at), min(b, a + stop - at)
        if lo < hi:
            out.append((lo, hi))
        at += b - a
    return out


def _merge(spans: Sequence[Span]) -> tuple[Span, ...]:
    """`spans` with each span that starts where the previous one stops joined to it."""
    out: list[Span] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif a < b:
            out.append((a, b))
    return tuple(out)


Batch = tuple[torch.Tensor, torch.Tensor | None]


def batches(chunks: Iterable[dict[str, np.ndarray]], size: int, pin: bool = False) -> Iterator[Batch]:
    """float32 `(x, y)` batches of exactly `size` rows (y None for SAEs) cut from `chunks` in order; rows left
    over at the end are dropped. `pin`: the batches are in page-locked host memory, so that their copy to a GPU
    (`.to(device, non_blocking=True)`) runs asynchronously (needs CUDA; the rows are copied once either way)."""
    held: list[dict[str, np.ndarray]] = []
    n = 0
    for chunk in chunks:
        held.append(chunk)
        n += len(chunk["x"])
        while n >= size:
            rows = held[0] if len(held) == 1 else {k: np.concatenate([c[k] for c in held]) for k in held[0]}
            yield _tensor(rows["x"][:size], pin), _tensor(rows["y"][:size], pin) if "y" in rows else None
            n -= size
            held = [{k: v[size:] for k, v in rows.items()}] if n else []


def _tensor(a: np.ndarray, pin: bool) -> torch.Tensor:
    """A float32 copy of `a` (the rows may be read-only: Ray's object store), page-locked if `pin`."""
    out = torch.empty(a.shape, dtype=torch.float32, pin_memory=pin)  # host: the batch before its copy
    out.numpy()[...] = a
    return out


def worker_batches(
    schedule: Schedule,
    rank: int,
    order: RowOrder,
    read: Callable[[Iterator[Piece]], Iterable[dict[str, np.ndarray]]],
    pin: bool = False,
) -> Iterator[Batch]:
    """Worker `rank`'s batches of `schedule`, one per step from `schedule.start` on; `read` turns pieces into
    their rows, in order (e.g. `(read_piece(p, reader) for p in pieces)`, or Ray tasks reading ahead); `pin` as
    in `batches` (for a worker on a GPU)."""
    return batches(read(order.pieces(schedule.part(rank))), schedule.worker_batch, pin)


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

    @property
    def order(self) -> RowOrder:
        """The run's row order."""
        return RowOrder(seed=self.reader.seed, shards=self.reader.shards, rows=self.rows)


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
    stats = [
        SiteStats(torch.tensor(m.mean), torch.tensor(m.std) ** 2, m.mean_norm)  # host: the Trainer moves them
        for m in manifests
    ]
    normalization = Normalization.from_stats(stats[:n_in], stats[n_in:] or None, data.normalize)
    rows = tuple(reader.count(i) for i in range(len(shared)))
    if not sum(rows):
        what = "of the selected token kinds; check data.kinds" if kinds else "matched across the stores"
        raise InvalidRequest(f"{reader.inputs[0]}: no rows {what}")
    return DataPlan(
        reader=reader,
        rows=rows,
        sites=Sites(inputs=tuple(sites[:n_in]), outputs=tuple(sites[n_in:])),
        normalization=normalization,
    )
