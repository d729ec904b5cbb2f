"""The one actor pool on a local Ray: every item through a read task and a worker actor, and after a failed
call nothing new is sent, the calls in flight still come back, then the error is raised."""

import time

import pytest

from prisma_ray.runtime.pool import PoolSize, run_pool


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
