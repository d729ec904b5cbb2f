"""Finding checkpoints under URIs (what each one is: `prisma_ray.sae.io.read_checkpoint_info`, from its `cfg.json`)."""

from __future__ import annotations

import logging
import posixpath
import re

from .. import storage
from ..runtime.console import counted
from ..sae.io import CFG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

# `prisma-ray train` writes `<runs>/<name>/checkpoint_<step>/<dictionary>` (Ray Train checkpoints, the same
# files) and, when the run finishes, `<runs>/<name>/dictionaries/<dictionary>`.
_TRAIN_CHECKPOINT = re.compile(r"^(?P<run>(?:.*/)?)checkpoint_\d+/(?P<name>[^/]+)$")


def find_checkpoints(root: str, options: storage.StorageOptions | None = None) -> list[str]:
    """Every checkpoint directory (holding `cfg.json` and `sae_weights.safetensors`) at or under `root`, sorted.

    A training run's copy of a dictionary in a Ray Train checkpoint below `root`
    (`<run>/checkpoint_<step>/<name>`) is left out when the run's final `<run>/dictionaries/<name>` is found
    too, so searching a runs folder gives each trained dictionary once (point `root` at a `checkpoint_<step>`
    folder to evaluate that one). Raises `MissingInputError` when `root` does not exist.
    """
    root = storage.absolute(root)
    storage.require_exists(root, options)
    files = set(storage.list_files(root, options))
    folders = {
        posixpath.dirname(rel)
        for rel in files
        if posixpath.basename(rel) == CFG_FILE and posixpath.join(posixpath.dirname(rel), WEIGHTS_FILE) in files
    }
    copies = {folder for folder in folders if _final_of(folder) in folders}
    if copies:
        copies_line = counted(len(copies), "training-checkpoint copy", "training-checkpoint copies")
        of = "a finished dictionary" if len(copies) == 1 else "finished dictionaries"
        log.info("%s: %s of %s left out", root, copies_line, of)
    return sorted(storage.join(root, folder) if folder else root.rstrip("/") for folder in folders - copies)


def _final_of(folder: str) -> str | None:
    """The final dictionary folder (`<run>/dictionaries/<name>`) of a training checkpoint's copy, else None."""
    match = _TRAIN_CHECKPOINT.match(folder)
    return match and f"{match['run']}dictionaries/{match['name']}"
