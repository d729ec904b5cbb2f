"""The one actor pool on a local Ray: every item through a read task and a worker actor, and after a failed
call nothing new is sent, the calls in flight still come back, then the error is raised."""

import os
import time
from pathlib import Path

import pytest

from prisma_ray.runtime import pool as runtime_pool
from prisma_ray.runtime.pool import PoolSize, PoolStats, run_pool


def pool(actors: int, in_flight: int) -> PoolSize:
    return PoolSize(
        device="cpu",
        actors=actors,
        cpus_per_actor=0.5,
        read_cpus=0.5,
        torch_threads=None,
        in_flight_per_actor=in_flight,
    )


def test_every_item_is_read_then_run_and_comes_back(ray_local):
    class Scale:  # defined here: Ray ships it by value
        def __init__(self, factor: int):
            self.factor = factor

        def apply(self, x: int) -> int:
            return x * self.factor

    def read(x: int, offset: int) -> int:
        return x + offset

    results = run_pool(
        range(7), Scale, {"factor": 10}, pool(2, 2), method="apply", read=read, read_kwargs={"offset": 1}
    )
    assert sorted(results) == [10 * (x + 1) for x in range(7)]


def test_a_failed_call_stops_new_items_keeps_those_in_flight_and_raises(ray_local):
    class FailOnOne:
        def __call__(self, x: int) -> int:
            time.sleep(0.2)
            if x == 1:
                raise ValueError(f"bad item {x}")
            return x

    taken = []

    def items():
        for x in range(10):
            taken.append(x)
            yield x

    done = []
    with pytest.raises(ValueError, match="bad item 1"):
        for result in run_pool(items(), FailOnOne, {}, pool(1, 2)):
            done.append(result)
    # one actor, two calls queued: 0 and 1 sent; 0 done -> 2 sent; 1 fails -> nothing new; 2 still comes back
    assert done == [0, 2] and taken == [0, 1, 2]


def dies_once_at_three(marker: Path) -> type:
    """A worker whose process exits mid-call the first time it gets item 3 (as on a lost node)."""

    class DieOnceAtThree:  # defined in a function: Ray ships it by value
        def __call__(self, x: int) -> int:
            if x == 3 and not marker.exists():
                marker.write_text("died")
                os._exit(1)
            return x

    return DieOnceAtThree


def test_a_call_whose_actor_is_killed_is_sent_again_to_a_replacement_and_counted(ray_local, tmp_path):
    stats = PoolStats()
    results = list(run_pool(range(8), dies_once_at_three(tmp_path / "died"), {}, pool(1, 2), stats=stats))
    assert sorted(results) == list(range(8)), "every item once: none lost, none twice"
    assert (stats.actors_lost, stats.actors_replaced) == (1, 1)
    assert stats.retried >= 1, "item 3 (and the call queued behind it) were sent again"
    assert stats.format().startswith("1 actor lost (node lost or process killed), 1 replaced; ")


def test_a_call_whose_actor_dies_past_its_retries_is_that_items_failure_and_the_pool_goes_on(ray_local, tmp_path):
    """`on_lost`: item 3 kills its actor every time; with no retry it is yielded as a failure at once, a fresh actor
    runs the items after it (a campaign records that model as failed and goes on)."""

    class DieAtThree:
        def __call__(self, x: int) -> int:
            if x == 3:
                os._exit(1)
            return x

    stats = PoolStats()
    results = list(
        run_pool(
            range(6),
            DieAtThree,
            {},
            pool(1, 1),
            stats=stats,
            retries=0,
            on_lost=lambda x, exc: ("lost", x, runtime_pool.loss_cause(exc)),
        )
    )
    lost = [r for r in results if isinstance(r, tuple)]
    assert sorted(r for r in results if not isinstance(r, tuple)) == [0, 1, 2, 4, 5]
    assert [r[:2] for r in lost] == [("lost", 3)] and "likely out of memory" in lost[0][2]
    assert (stats.actors_lost, stats.actors_replaced, stats.retried) == (1, 1, 0)


def test_replacements_the_cluster_cannot_hold_beside_a_read_are_stopped(ray_local, tmp_path, monkeypatch):
    """A view of the cluster that still counts a lost node lets the pool replace an actor; once the view is
    current (here: 1 CPU, which holds one 0.5-CPU actor and a 0.5-CPU read, not two), the replacement is stopped
    and its calls go to the actor left."""
    views = iter([{"CPU": 2.0}])
    monkeypatch.setattr(runtime_pool, "cluster_resources", lambda: next(views, {"CPU": 1.0}))
    stats = PoolStats()
    results = list(run_pool(range(12), dies_once_at_three(tmp_path / "died"), {}, pool(2, 2), stats=stats))
    assert sorted(results) == list(range(12)), "every item once"
    assert (stats.actors_lost, stats.actors_replaced) == (1, 0), "replaced on the stale view, then stopped"
