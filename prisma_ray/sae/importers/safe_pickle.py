"""Read pickled PyTorch checkpoints (`.pt`, `.pth`, `.bin`) without running anything from them.

A pickle names the callables that rebuild its objects, and a naive `pickle.load` calls whatever it
names (`os.system` included). This module is the `pickle_module` handed to `torch.load`: torch keeps
its own zip/legacy container handling and storage loading, and every global the pickle asks for
goes through `Unpickler.find_class`, which returns only the tensor-rebuild functions and
`OrderedDict` in `ALLOWED` and refuses everything else before it is imported or called. Plain
containers (dict, list, tuple, str, bytes, numbers) need no global, and storages are resolved by
torch itself as inert type markers.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from typing import Any

import torch

ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asks for a class or function outside `ALLOWED`."""

    def __init__(self, module: str, name: str):
        self.qualname = f"{module}.{name}"
        super().__init__(f"refused to load {self.qualname}")


class Unpickler(pickle.Unpickler):
    """An unpickler whose globals are limited to `ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def load(file: Any, **kwargs: Any) -> Any:
    """`pickle.load` through the restricted `Unpickler` (torch reads legacy headers with it)."""
    return Unpickler(file, **kwargs).load()


def torch_load(data: bytes) -> Any:
    """The object in a `torch.save` file (zip or legacy format), rebuilt on the CPU.

    Raises `RefusedGlobal` when the file names anything but tensors and plain containers; the
    refused global is never imported or called.
    """
    return torch.load(io.BytesIO(data), map_location="cpu", pickle_module=sys.modules[__name__], weights_only=False)
