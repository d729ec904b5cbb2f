"""Hooked vision and video models over timm, OpenCLIP and Hugging Face.

The torch-dependent names (`HookedVisionModel`, `load_model`, ...) are imported on first use, so
that light modules (`spec`, `registry`, used by the data layer in Ray decode workers) load
without torch.
"""

from importlib import import_module

from .hook_points import HookPoint, UnknownHookPoint
from .registry import ModelEntry, UnknownModel, default_hook, default_model, get_entry, list_entries, registry
from .spec import PreprocessSpec, TokenKind, TokenLayout

_LAZY = {
    "HookedVisionModel": "hooked",
    "InterventionNotSupported": "hooked",
    "describe_model": "loading",
    "hook_model": "loading",
    "load_model": "loading",
    "WeightsRef": "weights",
}

__all__ = [
    "HookPoint",
    "HookedVisionModel",
    "InterventionNotSupported",
    "ModelEntry",
    "PreprocessSpec",
    "TokenKind",
    "TokenLayout",
    "UnknownHookPoint",
    "UnknownModel",
    "WeightsRef",
    "default_hook",
    "default_model",
    "describe_model",
    "get_entry",
    "hook_model",
    "list_entries",
    "load_model",
    "registry",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
