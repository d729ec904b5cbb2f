"""The one sizing policy of the actor pools (a pure function of the cluster's resources, no Ray), and the one
`resources` block of every job config that runs on Ray."""

import json
import pickle
import re
import subprocess
import sys
import threading
import types
import typing
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel

from prisma_ray.data.shards import InputFormat, ShardData
from prisma_ray.data.sources import list_refs, parse_dataset_spec
from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import PreprocessSpec
from prisma_ray.runtime import session
from prisma_ray.runtime.pool import (
    PoolSize,
    Resources,
    ShardDecoder,
    ShardResources,
    TrainResources,
    decodes_in_actor,
    run_here,
    runs_in_driver,
    size_pool,
)
from prisma_ray.storage import StorageOptions


def shard_pool(cluster, items, **fields) -> PoolSize:
    """Sized as extraction and interpretation size theirs."""
    res = ShardResources(**fields)
    return size_pool(res, cluster, items, device=res.device, read_cpus=res.read_cpus, in_flight=2)


def brief(size: PoolSize) -> tuple:
    return size.device, size.actors, size.cpus_per_actor, size.torch_threads


@pytest.mark.parametrize(
    "cluster,fields,items,expected",
    [
        ({"CPU": 2.0}, {}, 4, ("cpu", 1, 1.0, 2)),  # one actor per 2 CPUs, each CPU's torch thread on it
        ({"CPU": 1.0}, {}, 4, ("cpu", 1, 0.5, 1)),  # at least one actor
        ({"CPU": 8.0}, {}, 10, ("cpu", 4, 1.0, 2)),
        ({"CPU": 2.0}, {}, 1, ("cpu", 1, 1.0, 2)),  # never more actors than shards
        ({"CPU": 32.0}, {}, 100, ("cpu", 8, 1.0, 4)),  # on CPU at most 8 actors
        ({"CPU": 16.0, "GPU": 2.0}, {}, 4, ("cuda", 2, 1.0, None)),  # one per GPU
        ({"CPU": 16.0, "GPU": 2.0}, dict(device="cpu", actors=3, torch_threads=2), 4, ("cpu", 3, 1.0, 2)),
        ({"CPU": 16.0, "GPU": 8.0}, dict(actors=20), 3, ("cuda", 3, 1.0, None)),  # more actors asked than items
        ({"CPU": 8.0}, dict(cpus_per_actor=2.0), 10, ("cpu", 3, 2.0, 2)),  # as many of 2 CPUs as fit beside a read
    ],
)
def test_shard_pools_fit_the_cluster(cluster, fields, items, expected):
    size = shard_pool(cluster, items, **fields)
    assert brief(size) == expected and size.read_cpus == 0.5 and size.in_flight_per_actor == 2


@pytest.mark.parametrize(
    "cluster,fields,device,items,expected",
    [
        ({"CPU": 2.0}, dict(actors=2), "auto", 3, ("cpu", 2, 1.0, 1)),  # the sweep's tests: 3 model groups
        ({"CPU": 16.0}, dict(cpus_per_actor=4.0), "auto", 10, ("cpu", 4, 4.0, 4)),  # jobs/sweep_checkpoints.yaml
        ({"CPU": 16.0, "GPU": 4.0}, {}, "auto", 2, ("cuda", 2, 1.0, None)),  # more GPUs than groups
        ({"CPU": 16.0, "GPU": 4.0}, {}, "cpu", 2, ("cpu", 2, 1.0, 8)),  # evaluation.device=cpu on a GPU cluster
        ({"CPU": 4.0}, {}, "cpu", None, ("cpu", 2, 1.0, 2)),  # the number of items not known
    ],
)
def test_pools_without_read_tasks(cluster, fields, device, items, expected):
    size = size_pool(Resources(**fields), cluster, items, device=device)
    assert brief(size) == expected and size.read_cpus == 0 and size.in_flight_per_actor == 1


@pytest.mark.parametrize(
    "decode,device,in_actor",
    [("auto", "cpu", True), ("auto", "cuda", False), ("actor", "cuda", True), ("task", "cpu", False)],
)
def test_cpu_actors_decode_their_own_shards_gpu_actors_get_them_from_read_tasks(decode, device, in_actor):
    assert decodes_in_actor(ShardResources(decode=decode).decode, device) is in_actor


@pytest.mark.parametrize(
    "fields,here,actors,device,expected",
    [
        ({}, True, 1, "cpu", True),  # the one case auto runs the model in the driver
        ({}, False, 1, "cpu", False),  # more nodes, Ray Client, a head without CPUs: actors
        ({}, True, 2, "cpu", False),  # more actors than one
        ({}, True, 1, "cuda", False),  # a GPU: the actor's reads run in tasks beside it
        (dict(decode="task"), True, 1, "cpu", False),  # read tasks asked for
        (dict(run_in="actors"), True, 1, "cpu", False),
        (dict(run_in="driver"), False, 1, "cpu", True),  # forced: also on a cluster, also with a GPU
        (dict(run_in="driver"), False, 1, "cuda", True),
    ],
)
def test_the_driver_runs_the_model_only_for_one_cpu_worker_on_its_own_node_or_when_asked(
    fields, here, actors, device, expected
):
    size = PoolSize(device, actors, 1.0, 0.5, 2, 2)
    assert runs_in_driver(ShardResources(**fields), size, here) is expected


def test_the_driver_refuses_what_it_cannot_run_naming_the_fields():
    size = PoolSize("cpu", 2, 1.0, 0.5, 1, 2)
    with pytest.raises(InvalidRequest, match=r"resources.run_in=driver .* resources.actors=2"):
        runs_in_driver(ShardResources(run_in="driver", actors=2), size, True)
    with pytest.raises(InvalidRequest, match=r"resources.decode=task; set resources.decode=auto"):
        runs_in_driver(ShardResources(run_in="driver", decode="task"), PoolSize("cpu", 1, 1.0, 0.5, 2, 2), True)


def test_a_driver_without_ray_or_address_sizes_for_its_machine_without_starting_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session, "ensure_ray", lambda opts: pytest.fail("Ray started"))
    assert session.single_node_here(session.RayOptions(num_cpus=3)) == {"CPU": 3.0, "GPU": 0.0}


def test_a_ray_of_one_node_with_cpus_that_the_driver_runs_on_is_its_own(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert session.single_node_here(session.RayOptions())["CPU"] == 2.0
    node = {"Alive": True, "NodeID": ray_local.get_runtime_context().get_node_id(), "Resources": {"CPU": 2.0}}
    other = {"Alive": True, "NodeID": "another", "Resources": {"CPU": 4.0}}
    for nodes in ([node, other], [other], [{**node, "Resources": {"CPU": 0.0}}]):  # cluster.yaml's head: no CPUs
        monkeypatch.setattr(session.ray, "nodes", lambda nodes=nodes: nodes)
        assert session.single_node_here(session.RayOptions()) is None, nodes


def test_calls_run_here_on_threads_and_stop_after_a_failure_yielding_those_running():
    """As `run_pool` does on actors: no new call after a failure, the calls running still yielded, then the error."""
    started, failed = [], threading.Event()

    def call(i):
        started.append(i)
        if i == 1:
            failed.set()
            raise ValueError("shard 1 failed")
        assert failed.wait(10)  # item 0 is still running when item 1 fails
        return i * 10

    results = []
    with pytest.raises(ValueError, match="shard 1 failed"):
        for result in run_here(range(10), call, 2):
            results.append(result)
    assert sorted(started) == [0, 1] and results == [0]
    assert sorted(run_here(range(5), lambda i: i * i, 2)) == [0, 1, 4, 9, 16]


class Recorder:  # module level: pickled by reference, as Ray would ship it
    """A stand-in worker: records the thread it was built on and runs on, and what it was called with."""

    def __init__(self, fail: bool = False):
        if fail:
            raise ValueError("no model here")
        self.built_on = threading.get_ident()

    def __call__(self, batch):
        shard = ShardData.from_bytes(batch["payload"][0])
        return threading.get_ident(), int(batch["shard"][0]), sorted(shard.sample_ids), json.loads(batch["hooks"][0])


def test_an_actor_decodes_its_shards_and_runs_them_on_the_thread_its_worker_was_built_on(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 24), (40, 90, 200)).save(tmp_path / f"{name}.png")
    spec = parse_dataset_spec({"type": "images", "uri": str(tmp_path)})
    fmt = InputFormat.create(spec, PreprocessSpec(image_size=(16, 16)))
    refs = [json.dumps([asdict(r) for r in list_refs(spec)[:2]])]
    item = {"shard": np.array([4]), "refs": np.array(refs, dtype=object), "hooks": np.array(['["h"]'], dtype=object)}
    decoder = ShardDecoder(pickle.dumps((Recorder, {})), spec, fmt)
    thread, shard, ids, hooks = decoder(item)
    assert (shard, ids, hooks) == (4, ["a.png", "b.png"], ["h"])
    assert thread == decoder._worker.result().built_on != threading.get_ident()
    failing = ShardDecoder(pickle.dumps((Recorder, {"fail": True})), spec, fmt)
    with pytest.raises(ValueError, match="no model here"):
        failing(item)


def test_the_pool_loads_without_torch():
    """A `ShardDecoder` actor imports the pool's module before it starts: torch must stay out of it, so that the
    worker's imports (torch, timm: seconds) run on the worker's thread while the first shards decode."""
    code = "import sys, prisma_ray.runtime.pool; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_actors_default_to_the_stage_where_it_has_a_default():
    """Explanation keeps one actor unless asked (a chat explainer's load on its server grows with actors)."""
    assert size_pool(Resources(), {"CPU": 4.0}, None, default_actors=1).actors == 1
    assert size_pool(Resources(actors=3), {"CPU": 4.0}, None, default_actors=1).actors == 3
    assert size_pool(Resources(cpus_per_actor=0.5), {"CPU": 4.0}, None, default_actors=1).actors == 1


def test_calls_in_flight_default_to_the_stage_and_follow_the_config():
    assert size_pool(Resources(), {"CPU": 2.0}, 4, in_flight=2).in_flight_per_actor == 2
    assert size_pool(Resources(in_flight_per_actor=5), {"CPU": 2.0}, 4, in_flight=2).in_flight_per_actor == 5


def test_pools_that_cannot_fit_are_refused_naming_the_fields():
    with pytest.raises(
        InvalidRequest,
        match=r"resources\.device=cuda with 1 GPU actor\(s\), but the Ray cluster has 0 GPUs; set resources\.device=cpu or "
        "auto",  # no GPU at all: lowering the actors cannot help
    ):
        shard_pool({"CPU": 2.0}, 4, device="cuda")
    with pytest.raises(InvalidRequest, match=r"evaluation\.device=cuda .* lower resources\.actors, or set evaluation"):
        size_pool(Resources(actors=3), {"CPU": 8.0, "GPU": 2.0}, 5, device="cuda", device_field="evaluation.device")
    with pytest.raises(InvalidRequest, match="do not fit the Ray cluster's 2 CPUs") as refused:
        shard_pool({"CPU": 2.0}, 4, actors=2, cpus_per_actor=1.0)
    assert all(f"resources.{name}" in str(refused.value) for name in ("actors", "cpus_per_actor", "read_cpus"))
    with pytest.raises(InvalidRequest, match=r"1 actor\(s\) x 0 CPUs plus 0.5 CPUs"):
        shard_pool({"CPU": 0.5}, 4)
    with pytest.raises(InvalidRequest, match=r"lower resources\.actors or resources\.cpus_per_actor\.$"):
        size_pool(Resources(actors=4, cpus_per_actor=1.0), {"CPU": 2.0}, 8)


# --- the one `resources` block and the one meaning of `storage` in the job configs ---

RESOURCE_NAME = re.compile(r"(^|_)(cpus?|actors?|threads|in_flight|loader)(_|$)")


def job_configs() -> list[type[BaseModel]]:
    from prisma_ray.evaluate.sweep import SweepConfig
    from prisma_ray.extract.config import ExtractConfig
    from prisma_ray.interpret.autointerp.run import ExplainConfig
    from prisma_ray.interpret.collect import InterpretConfig
    from prisma_ray.train.config import TrainConfig

    return [ExtractConfig, InterpretConfig, SweepConfig, ExplainConfig, TrainConfig]


def nested_fields(model: type[BaseModel], prefix: str = ""):
    """`(dotted name, field)` of every field of `model` and of the models it holds, except `resources`
    and `ray` (which Ray to join)."""
    for name, field in model.model_fields.items():
        if name in ("resources", "ray"):
            continue
        yield prefix + name, field
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg is not StorageOptions:
                yield from nested_fields(arg, f"{prefix}{name}.")


@pytest.mark.parametrize("config", job_configs(), ids=lambda c: c.__name__)
def test_every_job_config_sizes_its_actors_in_one_resources_block(config):
    resources = config.model_fields["resources"].annotation
    assert resources in (Resources, ShardResources, TrainResources)
    assert set(resources.model_fields) <= {*ShardResources.model_fields, *TrainResources.model_fields}
    assert all(f.description for f in resources.model_fields.values())
    stray = [name for name, _ in nested_fields(config) if RESOURCE_NAME.search(name.rsplit(".", 1)[-1])]
    assert stray == [], f"CPU/actor fields outside `resources`: {stray}"


@pytest.mark.parametrize("config", job_configs(), ids=lambda c: c.__name__)
def test_storage_always_means_how_to_reach_uris(config):
    fields = [(name, f) for name, f in nested_fields(config) if name.rsplit(".", 1)[-1] == "storage"]
    assert fields, f"{config.__name__} has no storage options"
    for name, field in fields:
        kinds = {a for a in (field.annotation, *typing.get_args(field.annotation)) if a is not types.NoneType}
        assert kinds == {StorageOptions}, f"{config.__name__}.{name} is {field.annotation}"


def test_no_items_start_no_actors():
    from prisma_ray.runtime.pool import run_pool

    class Never:
        def __init__(self):
            raise AssertionError("no actor may start")

    assert list(run_pool([], Never, {}, size_pool(Resources(), {"CPU": 2.0}, 0))) == []


def test_what_a_pool_lost_is_one_summary_line():
    from prisma_ray.runtime.pool import PoolStats

    assert PoolStats().format() == "", "nothing lost, no line"
    assert PoolStats(actors_lost=2, actors_replaced=1, retried=3).format("shard") == (
        "2 actors lost (node lost or process killed), 1 replaced; 3 shards retried"
    )
    assert PoolStats(actors_lost=1, actors_replaced=1, retried=1).format() == (
        "1 actor lost (node lost or process killed), 1 replaced; 1 call retried"
    )


def test_a_lost_call_is_explained_out_of_memory_where_ray_says_so():
    """The words a campaign records for a model whose actor died, from the errors Ray 2.60 raises."""
    import ray.exceptions as rex

    from prisma_ray.runtime.pool import loss_cause

    died = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: ModelRunner\nThe actor is dead because "
        "its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits "
        "with a connection error code 2. End of file. Some common causes include: (1) the process was killed by the "
        "OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed"
    )
    monitor = "Task was killed due to the node running low on memory. Workers (tasks / actors) killed due to memory pressure (OOM)"
    assert loss_cause(rex.RayActorError(error_msg=died)).startswith("its process died, likely out of memory")
    assert loss_cause(rex.RayActorError(error_msg=monitor)).startswith("out of memory (Ray's memory monitor")
    assert loss_cause(rex.OutOfMemoryError("node low")).startswith("out of memory")
    assert loss_cause(rex.NodeDiedError("gone")).startswith("its node was lost")
    assert loss_cause(rex.RayActorError(error_msg="other")) == "its process died (RayActorError)"
