"""The training data order (`prisma_ray.train.data`): a pure function of the seed, the shards and the step,
so a run resumed from a checkpoint's data position trains the rows an uninterrupted run would."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from prisma_ray import store
from prisma_ray.errors import InvalidRequest
from prisma_ray.storage import StorageOptions
from prisma_ray.train.data import DataPosition, Reader, RowOrder, Schedule, batches, read_piece, worker_batches

SHARD_ROWS = (50, 70, 0, 37)  # uneven, one empty after the token-kind filter
STEPS, BATCH = 13, 24  # 312 rows: two passes over the 157 rows but two


def write_rows(uri: str, sizes: tuple[int, ...], drop: set[int] = frozenset()) -> None:
    """Shards of `sizes` rows whose activation's first value is the row's id (ids counted over the shards);
    rows in `drop` are left out. Every row is a patch token, but for the empty shard's (CLS tokens)."""
    writer = store.StoreWriter(uri)
    start = 0
    for i, size in enumerate(sizes or (1,)):
        ids = np.array([r for r in range(start, start + max(size, 1)) if r not in drop])
        acts = np.stack([ids, np.ones(len(ids))], axis=1).astype(np.float32)
        kind = np.full(len(ids), 0 if size == 0 else 2)
        table = store.token_table(
            [f"s{r}" for r in ids], np.zeros(len(ids)), np.full(len(ids), -1), kind, acts, "float32"
        )
        writer.write_shard(i, table, store.RunningStats.of(acts))
        start += max(size, 1)


@pytest.fixture
def reader(tmp_path) -> Reader:
    write_rows(str(tmp_path / "acts"), SHARD_ROWS)
    shards = tuple(store.shard_name(i) for i in range(len(SHARD_ROWS)))
    return Reader(
        inputs=(str(tmp_path / "acts"),), targets=(), shards=shards, kinds=(2,), seed=7, options=StorageOptions()
    )


def order_of(reader: Reader) -> RowOrder:
    return RowOrder(seed=reader.seed, shards=reader.shards, rows=tuple(reader.count(i) for i in range(4)))


def rows_per_step(schedule: Schedule, reader: Reader) -> list[list[list[int]]]:
    """`[rank][step - start]`: the row ids of each worker's batch at each step."""

    def read(pieces):
        return (read_piece(p, reader) for p in pieces)

    return [
        [x[:, 0].int().tolist() for x, _ in worker_batches(schedule, rank, order_of(reader), read)]
        for rank in range(schedule.world)
    ]


def fresh(world: int) -> Schedule:
    return Schedule(position=DataPosition(), start=0, steps=STEPS, batch_size=BATCH, world=world)


def resumed(schedule: Schedule, step: int, order: RowOrder, world: int | None = None) -> Schedule:
    """The schedule of a run restarted from a checkpoint at `step` (its position saved and read back)."""
    position = DataPosition.from_json(schedule.position_at(step).to_json(order), order, "checkpoint_x")
    return Schedule(position=position, start=step, steps=STEPS, batch_size=BATCH, world=world or schedule.world)


def epochs_of_rows(reader: Reader, n: int) -> list[int]:
    """The first `n` row ids of the run's order: epoch after epoch, seeded shard order, each shard shuffled."""
    ids: list[int] = []
    for epoch in range(3):
        for shard in order_of(reader).shard_order(epoch):
            ids += reader.read(int(shard), epoch)["x"][:, 0].astype(int).tolist()
    return ids[:n]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_run_resumed_at_any_step_trains_every_worker_on_the_rows_of_an_uninterrupted_run(reader, world):
    order = order_of(reader)
    whole = rows_per_step(fresh(world), reader)
    assert [len(steps) for steps in whole] == [STEPS] * world
    assert all(len(b) == BATCH // world for steps in whole for b in steps)
    for step in range(STEPS + 1):
        again = resumed(fresh(world), step, order)
        assert rows_per_step(again, reader) == [steps[step:] for steps in whole], step
    twice = resumed(resumed(fresh(world), 4, order), 9, order)  # killed again after the first resume
    assert rows_per_step(twice, reader) == [steps[9:] for steps in whole]
    assert resumed(fresh(world), STEPS, order).position == DataPosition((), STEPS * BATCH)
    # over the run, every row as often as in the order's first STEPS x BATCH rows (two passes but two rows)
    visits = Counter(r for steps in whole for b in steps for r in b)
    assert visits == Counter(epochs_of_rows(reader, STEPS * BATCH))
    assert sorted(visits.values()) == [1, 1] + [2] * 155


def test_a_run_resumed_on_another_number_of_workers_trains_every_row_as_often(reader):
    order = order_of(reader)
    first = rows_per_step(fresh(2), reader)
    rest = rows_per_step(resumed(fresh(2), 5, order, world=3), reader)
    visits = Counter(r for steps in first for b in steps[:5] for r in b) + Counter(
        r for steps in rest for b in steps for r in b
    )
    assert visits == Counter(epochs_of_rows(reader, STEPS * BATCH))


def test_a_position_saved_for_other_data_is_refused(reader):
    order = order_of(reader)
    text = fresh(2).position_at(3).to_json(order)
    for other in (
        RowOrder(seed=8, shards=order.shards, rows=order.rows),
        RowOrder(seed=7, shards=order.shards, rows=(50, 70, 0, 38)),
    ):
        with pytest.raises(InvalidRequest, match="checkpoint_x: the checkpoint was written by a run over other"):
            DataPosition.from_json(text, other, "checkpoint_x")


def test_batches_are_cut_across_chunks_in_order():
    chunks = [{"x": np.arange(n, dtype=np.float32)[:, None] + 100 * i} for i, n in enumerate((3, 10, 1, 6))]
    got = [x[:, 0].tolist() for x, y in batches(chunks, 4)]
    assert got == [
        [0, 1, 2, 100],
        [101, 102, 103, 104],
        [105, 106, 107, 108],
        [109, 200, 300, 301],
        [302, 303, 304, 305],
    ]


def test_training_rows_are_counted_after_matching_the_stores(tmp_path):
    """A target store missing some rows: the rows planned are the rows a read gives (no short batches)."""
    write_rows(str(tmp_path / "in"), (20, 30))
    write_rows(str(tmp_path / "out"), (20, 30), drop={3, 25, 26})
    shards = (store.shard_name(0), store.shard_name(1))
    for kinds in (None, (2,)):
        reader = Reader(
            inputs=(str(tmp_path / "in"),),
            targets=(str(tmp_path / "out"),),
            shards=shards,
            kinds=kinds,
            seed=0,
            options=StorageOptions(),
        )
        assert [reader.count(i) for i in range(2)] == [19, 28]
        assert [len(reader.read(i, 0)["y"]) for i in range(2)] == [19, 28]
