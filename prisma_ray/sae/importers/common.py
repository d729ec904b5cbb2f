"""What every importer returns, and the reading and weight-folding helpers they share."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from ... import storage
from ...errors import PrismaRayError
from ..config import Architecture
from . import safe_pickle


class CheckpointImportError(PrismaRayError, ValueError):
    """A published checkpoint that cannot be imported; the message names the file and the fix."""


class UnsafePickleError(CheckpointImportError):
    """A pickled file names a class or function other than tensors and plain containers."""


@dataclass(frozen=True)
class Imported:
    """A dictionary read from another tool's files, before its names are mapped onto ours.

    `weights` use SAELens 6 names and our conventions: autoencoders subtract `b_dec` from the
    input before encoding, transcoders do not; `W_skip` is `[d_out, d_in]` and added as `x @ W_skip.T`.
    `skip_includes_identity` records, for a source that leaves it open (ViT-Prisma), whether its own
    skip added the identity (already folded into `W_skip`); `notes` say how anything was decided.
    """

    format: str
    architecture: Architecture
    weights: dict[str, torch.Tensor]
    hook_name: str
    hook_name_out: str | None = None
    model_name: str = ""
    k: int | None = None
    transcoder: bool = False
    skip: bool = False
    sparsity: torch.Tensor | None = None
    skip_includes_identity: bool | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceDir:
    """A directory of published files (local path or `s3://`) and the file names at its top level."""

    uri: str
    files: tuple[str, ...]
    options: storage.StorageOptions | None = None

    @classmethod
    def open(cls, uri: str, options: storage.StorageOptions | None = None) -> SourceDir:
        storage.require_exists(uri, options)
        return cls(uri, tuple(f for f in storage.list_files(uri, options) if "/" not in f), options)

    def path(self, name: str) -> str:
        return storage.join(self.uri, name)

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads(storage.read_bytes(self.path(name), self.options))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointImportError(f"{self.path(name)}: not valid JSON ({e}); the file may be truncated") from e
        if not isinstance(data, dict):
            raise CheckpointImportError(f"{self.path(name)}: expected a JSON object, found {type(data).__name__}")
        return data

    def read_safetensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors(storage.read_bytes(self.path(name), self.options))
        except Exception as e:  # safetensors raises its own error type for corrupt headers and data
            raise CheckpointImportError(
                f"{self.path(name)}: not a readable safetensors file ({e}); the file may be truncated or corrupt"
            ) from e

    def read_pickled_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of a pickled state dict (`{name: tensor}`, or one under a `state_dict` key)."""
        where = self.path(name)
        try:
            obj = safe_pickle.torch_load(storage.read_bytes(where, self.options))
        except safe_pickle.RefusedGlobal as e:
            raise UnsafePickleError(
                f"{where}: refused to unpickle {e.qualname}: only tensors and plain containers are read from "
                "pickled files, and nothing in this one was run. Convert it to safetensors where it came from, "
                "or save only its state dict of tensors."
            ) from None
        except Exception as e:
            raise CheckpointImportError(
                f"{where}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); the file may be truncated "
                "or corrupt, download it again"
            ) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointImportError(f"{where}: expected a state dict of tensors, found {type(obj).__name__}")
        bad = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise CheckpointImportError(f"{where}: expected a state dict of tensors; these entries are not: {bad}")
        return {k: v.detach() for k, v in obj.items()}


def require(weights: dict[str, torch.Tensor], keys: tuple[str, ...], where: str) -> None:
    """Raise naming `where` unless `weights` holds every one of `keys`."""
    missing = [k for k in keys if k not in weights]
    if missing:
        raise CheckpointImportError(f"{where}: missing tensors {missing} (found {sorted(weights)})")


def fold_input_bias(weights: dict[str, torch.Tensor], bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights whose encoder reads `x` where those given read `x - bias` (same pre-activations)."""
    out = dict(weights)
    shift = bias.double() @ weights["W_enc"].double()
    if "b_gate" in weights:
        out["b_gate"] = weights["b_gate"].double() - shift
        out["b_mag"] = weights["b_mag"].double() - shift * weights["r_mag"].double().exp()
    else:
        out["b_enc"] = weights["b_enc"].double() - shift
    return out
