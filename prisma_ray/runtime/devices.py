"""Where a stage's torch work runs: the `device: auto | cpu | cuda` every job config takes, resolved for the
process it runs in, and the one-line account of what a stage got ("8 train workers on 8 GPUs").

Torch only (no Ray): Ray-side sizing (`runtime.pool.size_pool`) resolves `auto` against the cluster's GPUs; a
process that runs the model itself (evaluation, analysis, steering, `workers: 0` training) resolves it here
against its own machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from prisma_ray.errors import InvalidRequest
from prisma_ray.runtime.console import counted

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]


def local_device(device: Device, field: str = "device") -> torch.device:
    """The torch device `device` means in this process: `auto` is CUDA when this machine has a GPU, else CPU.

    Raises `InvalidRequest` naming `field` (the config key) when `cuda` is asked for and torch sees no GPU.
    """
    import torch  # imported here: the actor pool imports this module, and its `ShardDecoder` imports torch later

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"{field}=cuda, but torch sees no CUDA device on this machine; set {field}=cpu or auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def placement_line(count: int, what: str, device: str, torch_threads: int | None = None) -> str:
    """What a stage got, for its start line: `8 train workers on 8 GPUs`, `2 extraction actors on CPU (1 torch
    thread each)`. `what` is the singular noun (`train worker`); `device` is `cuda` or `cpu` (resolved)."""
    if device == "cuda":
        return f"{counted(count, what)} on {counted(count, 'GPU')}"
    threads = f" ({counted(torch_threads, 'torch thread')} each)" if torch_threads else ""
    return f"{counted(count, what)} on CPU{threads}"
