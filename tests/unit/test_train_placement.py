"""Where `prisma-ray train` trains (`train.job.plan_placement`, a pure function of the config and the cluster's
resources, no Ray session): Ray Train workers get one GPU each (NCCL, bf16 autocast) where the cluster has
GPUs, CPUs and gloo elsewhere, and a run that cannot be placed is refused naming the config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_ray.config import load_config
from prisma_ray.errors import InvalidRequest
from prisma_ray.train.config import TrainConfig
from prisma_ray.train.data import batches
from prisma_ray.train.job import TrainSummary, plan_placement

CPU_CLUSTER = {"CPU": 4.0}
GPU_CLUSTER = {"CPU": 16.0, "GPU": 8.0}


def config(**fields) -> TrainConfig:
    return TrainConfig.model_validate({"batch_size": 4096, **fields})


def test_a_cpu_cluster_trains_on_cpu_over_gloo_without_autocast():
    placement = plan_placement(config(workers=2), CPU_CLUSTER)
    assert placement.device == "cpu" and placement.backend == "gloo" and placement.autocast is False
    assert placement.scaling == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert placement.line == "2 train workers on CPU"


def test_a_gpu_cluster_gives_every_worker_one_gpu_nccl_and_bf16_autocast():
    placement = plan_placement(config(workers=8), GPU_CLUSTER)
    assert placement.device == "cuda" and placement.backend == "nccl" and placement.autocast is True
    assert placement.scaling == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1}}
    assert placement.line == "8 train workers on 8 GPUs, bf16 autocast"
    cpu = plan_placement(config(workers=8, resources={"device": "cpu"}), GPU_CLUSTER)
    assert (cpu.device, cpu.backend, cpu.scaling["use_gpu"]) == ("cpu", "gloo", False), "device: cpu on GPUs"
    assert "GPU" not in cpu.scaling["resources_per_worker"]


def test_cuda_workers_that_the_gpus_cannot_hold_are_refused_naming_the_keys():
    with pytest.raises(InvalidRequest, match=r"resources\.device=cuda with 9 GPU actor.*8 GPUs; lower workers"):
        plan_placement(config(workers=9, batch_size=9 * 16, resources={"device": "cuda"}), GPU_CLUSTER)
    with pytest.raises(InvalidRequest, match=r"resources\.device=cuda .* has 0 GPUs.* set resources\.device=cpu"):
        plan_placement(config(workers=2, resources={"device": "cuda"}), CPU_CLUSTER)
    with pytest.raises(InvalidRequest, match=r"do not fit the Ray cluster's 4 CPUs.*lower workers"):
        plan_placement(config(workers=4), CPU_CLUSTER)  # 4 x 1 CPU plus a read task: the CPU check still holds


def test_an_explicit_autocast_is_honoured():
    assert plan_placement(config(workers=8, autocast=False), GPU_CLUSTER).autocast is False
    on_cpu = plan_placement(config(workers=2, autocast=True), CPU_CLUSTER)
    assert on_cpu.autocast is True and on_cpu.line == "2 train workers on CPU, bf16 autocast"


def test_training_in_the_driver_uses_the_driver_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    local = plan_placement(config(workers=0), GPU_CLUSTER)  # the cluster's GPUs are not the driver's
    assert (local.device, local.backend, local.autocast) == ("cpu", "gloo", False)
    assert local.scaling == {"num_workers": 0, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert local.line == "1 train process (the driver) on CPU"
    with pytest.raises(InvalidRequest, match=r"resources\.device=cuda.*no CUDA device"):
        plan_placement(config(workers=0, resources={"device": "cuda"}), GPU_CLUSTER)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = plan_placement(config(workers=0), CPU_CLUSTER)  # local mode: no Ray resources, the driver's own GPU
    assert (gpu.device, gpu.backend, gpu.autocast, gpu.scaling["use_gpu"]) == ("cuda", "nccl", True, False)
    assert gpu.line == "1 train process (the driver) on 1 GPU, bf16 autocast"


def test_the_config_takes_device_and_autocast(tmp_path):
    default = TrainConfig()
    assert default.resources.device == "auto" and default.autocast is None
    path = tmp_path / "train.yaml"
    path.write_text("resources: {device: cuda}\nautocast: false\n")
    loaded = load_config(TrainConfig, path)
    assert loaded.resources.device == "cuda" and loaded.autocast is False
    with pytest.raises(Exception, match="device"):
        TrainConfig.model_validate({"resources": {"device": "tpu"}})


def test_the_summary_says_where_the_run_trained():
    summary = TrainSummary("run", 10, 640, {}, None, "/out", [], placement="8 train workers on 8 GPUs, bf16 autocast")
    assert "trained on 8 train workers on 8 GPUs, bf16 autocast" in summary.format().splitlines()


def test_unpinned_batches_are_float32_copies():
    rows = np.arange(12, dtype=np.float16).reshape(6, 2)
    rows.flags.writeable = False  # as Ray's object store gives them
    (x, y), *_ = batches([{"x": rows}], 4)
    assert x.dtype == torch.float32 and y is None and not x.is_pinned()
    assert torch.equal(x, torch.arange(8, dtype=torch.float32).reshape(4, 2))
    x[0, 0] = 99.0
    assert rows[0, 0] == 0, "the batch is a copy"
