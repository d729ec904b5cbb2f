"""Finding checkpoints under URIs (what each one is: `prisma_ray.sae.io.read_checkpoint_info`, from its `cfg.json`)."""

from __future__ import annotations

import posixpath

from .. import storage
from ..sae.io import CFG_FILE, WEIGHTS_FILE


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
