"""Held-out activation stores: the rows a checkpoint is measured on, and how the store was made.

A store written by `prisma-ray extract` records in its `_config.json` the model (registry entry,
pretrained or the seed of its random weights, the URI and SHA-256 of its own weights file, the dtype it ran
in), the dataset and the token selection,
which is what the spliced-in and ground-truth evaluations need to rebuild the same model and inputs.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from prisma_ray.errors import InvalidRequest

from .. import storage, store
from ..data.decode import FrameSampling
from ..data.sources import DatasetSpec, parse_dataset_spec, with_resolved_storage
from ..models import ModelEntry, TokenLayout
from ..models.spec import ModelDType
from ..models.token_selection import TokenSelection, fixed_positions
from ..models.weights import WeightsRef
from ..store import KEYS, KIND_CODES, align

KEY_COLUMNS = [*KEYS, "kind"]


@dataclass(frozen=True)
class StoreSource:
    """A store's manifest and, when `prisma-ray extract` wrote it, the config it was written with."""

    uri: str
    manifest: store.Manifest
    description: dict[str, Any] | None

    @classmethod
    def open(cls, uri: str, options: storage.StorageOptions | None = None) -> StoreSource:
        """Read the store at `uri`; a missing store raises `MissingInputError` naming it."""
        manifest = store.read_manifest(uri, options)
        return cls(uri, manifest, store.StoreWriter(uri, options).claimed())

    @property
    def entry(self) -> ModelEntry | None:
        return ModelEntry.model_validate(self.description["model"]) if self.description else None

    @property
    def model_dtype(self) -> ModelDType:
        """The dtype the model ran in at extraction (stores written before it was recorded: float32)."""
        return (self.description or {}).get("model_dtype", "float32")

    @property
    def weights(self) -> WeightsRef | None:
        """The checkpoint the model's weights came from, with its SHA-256 at extraction (None: registry weights)."""
        record = (self.description or {}).get("weights")
        return WeightsRef(**record) if record else None

    @property
    def build(self) -> dict[str, Any]:
        """How the model that wrote the store was built: `pretrained`, `seed`, `weights` and `model_dtype`."""
        d = self.description or {}
        keys = ("pretrained", "seed", "weights")
        return {**{k: d.get(k) for k in keys}, "model_dtype": self.model_dtype}

    @property
    def head(self) -> int | None:
        """The one head a store of a per-head hook point holds; None where it holds every head flattened into the
        width (head-major) or its hook point has no heads."""
        heads = self.manifest.heads
        return heads if isinstance(heads, int) else None

    def check_width(self, width: int, reader: str) -> None:
        """Raise `InvalidRequest` unless the store holds `width` values per token (`reader` names what reads them)."""
        if self.manifest.d_model != width:
            heads = self.manifest.heads
            held = {None: "", "flattened": " (every head flattened)"}.get(heads, f" (head {heads})")
            raise InvalidRequest(
                f"{reader} reads {width} values per token but the store {self.uri} holds {self.manifest.d_model}"
                f"{held}; evaluate it against a store extracted as it was trained (per-head points: extract's `head`)"
            )

    @property
    def multimodal(self) -> bool:
        """Whether the store holds a multimodal language model's sequences (no fixed token layout)."""
        return bool(self.manifest.token_layout.get("multimodal"))

    @property
    def layout(self) -> TokenLayout:
        if self.multimodal:
            raise InvalidRequest(
                f"{self.uri} holds a multimodal language model's sequences; evaluations that rerun the model "
                "(spliced-in loss, ground truth) need a vision model's store"
            )
        return TokenLayout.model_validate(self.manifest.token_layout)

    @property
    def sampling(self) -> FrameSampling | None:
        sampling = self.manifest.dataset.get("frame_sampling")
        return FrameSampling.model_validate(sampling) if sampling else None

    @property
    def synthetic(self) -> bool:
        return self.manifest.dataset.get("type") == "synthetic"

    def dataset(self, options: storage.StorageOptions) -> DatasetSpec:
        """The dataset the store was extracted from, reached with `options`."""
        if not self.description:
            raise InvalidRequest(f"{self.uri} has no _config.json; it was not written by `prisma-ray extract`")
        spec = parse_dataset_spec({**self.description["dataset"], "storage": options.model_dump()})
        return with_resolved_storage(spec)

    def positions(self) -> np.ndarray:
        """The token positions whose activations the store holds (random selections: all patch tokens)."""
        selection = store_selection(self.manifest.token_selection)
        return fixed_positions(self.layout, selection)


def store_selection(token_selection: dict[str, Any]) -> TokenSelection:
    """The `TokenSelection` of a manifest, with random picks widened to every patch token."""
    mode = token_selection.get("mode", "all")
    return TokenSelection(mode="patches" if mode == "random" else mode)


@dataclass
class HeldOut:
    """Aligned held-out rows: keys (`sample_id`, `frame`, `token`, `kind`), inputs `x` and targets `y`."""

    keys: pa.Table
    x: torch.Tensor
    y: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.x)


def read_held_out(
    inputs: list[str],
    targets: list[str],
    max_tokens: int,
    options: storage.StorageOptions | None = None,
    kinds: Sequence[str] | None = None,
) -> HeldOut:
    """The first `max_tokens` rows of the stores, matched on `(sample_id, frame, token)` across stores.

    Shards are read in order until enough rows are in; `x` concatenates the `inputs` stores, `y`
    the `targets` stores (None when there are none). `kinds` keeps only tokens of those kinds
    (the ones a dictionary was trained on).
    """
    codes = pa.array([KIND_CODES[k] for k in kinds], pa.int8()) if kinds else None
    uris = [*inputs, *targets]
    names = [{posixpath.basename(p) for p in store.shard_paths(u, options)} for u in uris]
    shared = sorted(set.intersection(*names))
    if not shared:
        raise InvalidRequest(f"the held-out stores {uris} have no shard in common; extract them from the same dataset")
    parts: list[list[pa.Table]] = [[] for _ in uris]
    rows = 0
    for name in shared:
        tables = align([_read_shard(u, name, options) for u in uris])
        if codes is not None:
            keep = pc.is_in(tables[0].column("kind"), codes)
            tables = [t.filter(keep) for t in tables]
        for part, table in zip(parts, tables):
            part.append(table)
        rows += tables[0].num_rows
        if rows >= max_tokens:
            break
    tables = [pa.concat_tables(p).slice(0, max_tokens) for p in parts]
    if not tables[0].num_rows:
        of_kinds = f" of token kinds {list(kinds)}" if kinds else ""
        raise InvalidRequest(f"the held-out stores {uris} share no rows{of_kinds}")
    decoded = [store.decode_acts(t.column("act"), store.store_dtype(t.schema)) for t in tables]
    acts = [torch.from_numpy(np.require(a, requirements="W")) for a in decoded]
    x = torch.cat(acts[: len(inputs)], dim=1)
    y = torch.cat(acts[len(inputs) :], dim=1) if targets else None
    return HeldOut(tables[0].select(KEY_COLUMNS), x, y)


def _read_shard(uri: str, name: str, options: storage.StorageOptions | None) -> pa.Table:
    fs, path = storage.resolve(uri, options)
    return pq.read_table(posixpath.join(path, name), filesystem=fs, columns=[*KEY_COLUMNS, "act"])
