"""Hooked vision and video models over timm, OpenCLIP and Hugging Face."""
from .hook_points import HookPoint, UnknownHookPoint
from .hooked import HookedVisionModel, InterventionNotSupported
from .loading import build_sites, load_model
from .registry import ModelEntry, UnknownModel, get_entry, list_entries, registry
from .spec import PreprocessSpec, TokenKind, TokenLayout

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
    "build_sites",
    "get_entry",
    "list_entries",
    "load_model",
    "registry",
]
