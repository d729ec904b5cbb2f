"""Finding checkpoints under URIs and reading what each one is from its `cfg.json` (no weights loaded)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..sae.dictionary import Site, Sites
from ..sae.io import CFG_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as its `cfg.json` describes it."""

    uri: str
    name: str
    architecture: str
    sites: Sites
    d_sae: int
    k: int | None
    trained_tokens: int | None
    steps: int | None
    token_kinds: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return self.sites.kind

    @property
    def models(self) -> tuple[str, ...]:
        """The models whose activations it reads or writes, sorted."""
        return tuple(sorted({s.model for s in (*self.sites.inputs, *self.sites.targets)}))

    def row(self) -> dict[str, Any]:
        """The descriptive columns of its metrics row."""
        return {
            "checkpoint": self.uri,
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "model": "+".join(self.models),
            "hook": "+".join(s.name for s in self.sites.inputs),
            "hook_out": "+".join(s.name for s in self.sites.targets),
            "d_in": self.sites.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "trained_tokens": self.trained_tokens,
            "steps": self.steps,
            "token_kinds": ",".join(self.token_kinds) if self.token_kinds else "all",
        }


def read_checkpoint_info(uri: str, options: storage.StorageOptions | None = None) -> CheckpointInfo:
    """Parse `<uri>/cfg.json` (ours, or SAELens 6 with `hook_name`/`model_name` metadata)."""
    cfg_uri = storage.join(uri, CFG_FILE)
    storage.require_exists(cfg_uri, options)
    try:
        cfg = json.loads(storage.read_bytes(cfg_uri, options))
        meta = cfg.get("metadata", {})
        ours = meta.get("prisma_ray", {})
        if "sites" in ours:
            sites = Sites.model_validate(ours["sites"])
        else:
            model = meta.get("model_name") or ""
            inputs = (Site(name=meta.get("hook_name") or "input", model=model, width=cfg["d_in"]),)
            out = meta.get("hook_name_out")
            outputs = (Site(name=out, model=model, width=cfg["d_out"]),) if out else ()
            sites = Sites(inputs=inputs, outputs=outputs)
        config = ours.get("config", {})
        return CheckpointInfo(
            uri=uri,
            name=config.get("name") or posixpath.basename(uri.rstrip("/")),
            architecture=config.get("architecture") or cfg["architecture"],
            sites=sites,
            d_sae=int(cfg["d_sae"]),
            k=cfg.get("k") or config.get("k"),
            trained_tokens=ours.get("trained_tokens"),
            steps=ours.get("steps"),
            token_kinds=tuple(ours["token_kinds"]) if ours.get("token_kinds") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"{cfg_uri}: not a dictionary checkpoint's cfg.json ({type(exc).__name__}: {exc})"
        ) from None


def find_checkpoints(root: str, options: storage.StorageOptions | None = None) -> list[str]:
    """Every checkpoint directory (holding `cfg.json` and `sae_weights.safetensors`) at or under `root`, sorted.

    Raises `MissingInputError` when `root` does not exist.
    """
    root = storage.absolute(root)
    storage.require_exists(root, options)
    files = set(storage.list_files(root, options))
    found = []
    for rel in files:
        if posixpath.basename(rel) == CFG_FILE:
            folder = posixpath.dirname(rel)
            if posixpath.join(folder, WEIGHTS_FILE) in files:
                found.append(storage.join(root, folder) if folder else root.rstrip("/"))
    return sorted(found)
