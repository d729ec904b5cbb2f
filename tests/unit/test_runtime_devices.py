"""`runtime.devices`: resolving `device: auto | cpu | cuda` in a process, and the start line of a stage."""

from __future__ import annotations

import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.runtime.devices import local_device, placement_line


def test_auto_follows_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto") == torch.device("cpu")
    assert local_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_device("auto") == torch.device("cuda")
    assert local_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidRequest, match=r"evaluation\.device=cuda.*no CUDA device"):
        local_device("cuda", "evaluation.device")


def test_placement_line():
    assert placement_line(8, "train worker", "cuda") == "8 train workers on 8 GPUs"
    assert placement_line(1, "extraction actor", "cuda") == "1 extraction actor on 1 GPU"
    assert placement_line(2, "extraction actor", "cpu", 1) == "2 extraction actors on CPU (1 torch thread each)"
    assert placement_line(1, "train worker", "cpu") == "1 train worker on CPU"
