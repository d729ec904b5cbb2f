"""The results of a top-activations pass, as written to an output directory (local or `s3://`).

- `summary.json`: checkpoint, model, hook point, token layout, dataset, counts.
- `latents.parquet`: one row per latent: `frequency` (fraction of tokens it fires on),
  `sample_frequency`, `mean_activation` (over all tokens), `mean_when_firing`, `max_activation`,
  `fire_<kind>` (share of its firing tokens that are CLS / register / patch tokens) and
  `top_<kind>` (share of its top samples whose most active token is of that kind).
- `top.parquet`: one row per (latent, ranking `max`|`mean`, rank): `sample_id`, `score`, `top_token`,
  `top_kind` and `map`, the latent's activation on every token of that sample; LLaVA-NeXT also `crops_map`,
  its activation on each token of the high-resolution crop view (row-major; `summary.json`'s `tiles` places
  them on the tiles, `interpret.tiles`).
- `text.parquet` (multimodal language models): one row per (latent, rank) of its top text tokens:
  `sample_id` (the image the prompt asked about), `score`, `position` (in the sequence), `token` (its
  text) and `context` (the prompt around it, the token marked `[[...]]`; `texttop`).
- `reservoir.parquet`: per latent the random firing samples (`kind=firing`, `value` = max activation)
  and the non-firing ones (`kind=negative`).
- `samples/<key>.npy`: the model-geometry `uint8` crop of every sample in `top`, `text` and the negatives
  (`[H, W, 3]`, clips `[T, H, W, 3]`), `key = sample_key(sample_id)`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..models.spec import TokenKind, TokenLayout
from .texttop import TextTop
from .tiles import TileGeometry
from .topk import RANKINGS, LatentRecord

SUMMARY_FILE = "summary.json"
LATENTS_FILE = "latents.parquet"
TOP_FILE = "top.parquet"
RESERVOIR_FILE = "reservoir.parquet"
TEXT_FILE = "text.parquet"
SAMPLES_DIR = "samples"
KIND_NAMES = {TokenKind.CLS: "cls", TokenKind.REGISTER: "register", TokenKind.PATCH: "patch"}


def sample_key(sample_id: str) -> str:
    """A file-name-safe key of a sample id."""
    return hashlib.sha1(sample_id.encode()).hexdigest()[:20]


def latent_table(record: LatentRecord, layout: TokenLayout) -> pa.Table:
    """`latents.parquet` of `record`."""
    n_tokens, fired = max(record.n_tokens, 1), np.maximum(record.fire_tokens, 1)
    top = record.top["max"]
    filled = np.isfinite(top.scores)
    top_kind = layout.kinds()[top.maps.astype(np.float32).argmax(2)]
    columns: dict[str, Any] = {
        "latent": np.arange(record.n_latents),
        "frequency": record.fire_tokens / n_tokens,
        "sample_frequency": record.fire_samples / max(record.n_samples, 1),
        "mean_activation": record.act_sum / n_tokens,
        "mean_when_firing": np.where(record.fire_tokens > 0, record.act_sum / fired, 0.0),
        "max_activation": np.where(filled[:, 0], top.scores[:, 0], 0.0).astype(np.float64),
    }
    for kind, name in KIND_NAMES.items():
        columns[f"fire_{name}"] = record.fire_by_kind[:, int(kind)] / fired
        columns[f"top_{name}"] = ((top_kind == kind) & filled).sum(1) / np.maximum(filled.sum(1), 1)
    return pa.table(columns)


def top_table(record: LatentRecord, layout: TokenLayout) -> pa.Table:
    """`top.parquet` of `record` (filled entries only)."""
    parts = []
    kinds = layout.kinds()
    for ranking in RANKINGS:
        top = record.top[ranking]
        latent, rank = np.nonzero(np.isfinite(top.scores))
        maps = top.maps[latent, rank].astype(np.float32)
        token = maps.argmax(1) if len(maps) else np.zeros(0, np.int64)
        crops = {}
        if record.crops is not None:
            crop_maps = record.crops[ranking].maps[latent, rank].astype(np.float32)
            crops["crops_map"] = pa.FixedSizeListArray.from_arrays(pa.array(crop_maps.reshape(-1)), crop_maps.shape[1])
        parts.append(
            pa.table(
                {
                    "latent": latent.astype(np.int64),
                    "ranking": pa.array([ranking] * len(latent), pa.string()),
                    "rank": rank.astype(np.int16),
                    "sample_id": pa.array(top.ids[latent, rank].tolist(), pa.string()),
                    "score": top.scores[latent, rank],
                    "top_token": token.astype(np.int16),
                    "top_kind": kinds[token].astype(np.int8),
                    "map": pa.FixedSizeListArray.from_arrays(pa.array(maps.reshape(-1)), layout.n_tokens),
                    **crops,
                }
            )
        )
    return pa.concat_tables(parts)


def text_table(text: TextTop) -> pa.Table:
    """`text.parquet` of a record's top text tokens (filled entries only)."""
    latent, rank = np.nonzero(np.isfinite(text.scores))
    return pa.table(
        {
            "latent": latent.astype(np.int64),
            "rank": rank.astype(np.int16),
            "sample_id": pa.array(text.ids[latent, rank].tolist(), pa.string()),
            "score": text.scores[latent, rank],
            "position": text.positions[latent, rank].astype(np.int32),
            "token": pa.array(text.tokens[latent, rank].tolist(), pa.string()),
            "context": pa.array(text.contexts[latent, rank].tolist(), pa.string()),
        }
    )


def reservoir_table(record: LatentRecord) -> pa.Table:
    """`reservoir.parquet` of `record`."""
    parts = []
    for kind, res in (("firing", record.reservoir), ("negative", record.negatives)):
        latent, slot = np.nonzero(res.filled())
        parts.append(
            pa.table(
                {
                    "latent": latent.astype(np.int64),
                    "kind": pa.array([kind] * len(latent), pa.string()),
                    "sample_id": pa.array(res.ids[latent, slot].tolist(), pa.string()),
                    "value": res.values[latent, slot],
                }
            )
        )
    return pa.concat_tables(parts)


def needed_samples(record: LatentRecord) -> set[str]:
    """The samples whose crops the results keep: every top sample (images and text tokens) and every negative."""
    ids = {str(s) for r in RANKINGS for s in record.top[r].ids[np.isfinite(record.top[r].scores)]}
    if record.text is not None:
        ids |= {str(s) for s in record.text.ids[np.isfinite(record.text.scores)]}
    return ids | {str(s) for s in record.negatives.ids[record.negatives.filled()]}


def _parquet(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_results(
    output: str,
    record: LatentRecord,
    layout: TokenLayout,
    description: dict[str, Any],
    crops: dict[str, np.ndarray],
    options: storage.StorageOptions | None = None,
) -> None:
    """Write the results of one pass under `output` (the summary last: it marks them complete)."""
    for sample_id, crop in crops.items():
        storage.write_bytes(storage.join(output, SAMPLES_DIR, f"{sample_key(sample_id)}.npy"), _npy(crop), options)
    storage.write_bytes(storage.join(output, LATENTS_FILE), _parquet(latent_table(record, layout)), options)
    storage.write_bytes(storage.join(output, TOP_FILE), _parquet(top_table(record, layout)), options)
    storage.write_bytes(storage.join(output, RESERVOIR_FILE), _parquet(reservoir_table(record)), options)
    if record.text is not None:
        storage.write_bytes(storage.join(output, TEXT_FILE), _parquet(text_table(record.text)), options)
    summary = {**description, "n_samples": record.n_samples, "n_tokens": record.n_tokens, "n_latents": record.n_latents}
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=1).encode(), options)


@dataclass(kw_only=True)
class Results:
    """The results of a pass, read back: tables, summary and the crops of the kept samples."""

    uri: str
    summary: dict[str, Any]
    latents: pa.Table
    top: pa.Table
    reservoir: pa.Table
    text: pa.Table | None = None
    options: storage.StorageOptions | None = None
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.model_validate(self.summary["token_layout"])

    @property
    def tiles(self) -> TileGeometry | None:
        """LLaVA-NeXT: where the top entries' `crops_map` lie on the high-resolution tiles (None otherwise)."""
        return TileGeometry.model_validate(self.summary["tiles"]) if "tiles" in self.summary else None

    def image(self, sample_id: str) -> np.ndarray:
        """The `uint8` crop of a kept sample (`[H, W, 3]`, or `[T, H, W, 3]` for clips)."""
        data = storage.read_bytes(storage.join(self.uri, SAMPLES_DIR, f"{sample_key(sample_id)}.npy"), self.options)
        return np.load(io.BytesIO(data), allow_pickle=False)

    def top_rows(self, latent: int, ranking: str = "max") -> list[dict[str, Any]]:
        """The top entries of `latent` under `ranking` (`max` or `mean`), best first (`map`: `float32[n_tokens]`;
        LLaVA-NeXT: `crops_map`, `float32[crop tokens]`)."""
        rows = [dict(r) for r in self._grouped("top", "ranking", ranking).get(latent, [])]
        for row in rows:
            row["map"] = np.asarray(row["map"], dtype=np.float32)
            if "crops_map" in row:
                row["crops_map"] = np.asarray(row["crops_map"], dtype=np.float32)
        return rows

    def text_rows(self, latent: int) -> list[dict[str, Any]]:
        """The top text tokens of `latent`, best first (`sample_id`, `score`, `position`, `token`, `context`);
        empty for results without text tokens (vision models)."""
        if self.text is None:
            return []
        return [dict(r) for r in self._grouped("text", None, None).get(latent, [])]

    def fired_latents(self) -> list[int]:
        """The latents that fired, in index order: on a token the maps read (`frequency` > 0) or, for multimodal
        language models, on a text token (they have top text tokens)."""
        return [int(r["latent"]) for r in self.latents.to_pylist() if r["frequency"] > 0 or self.text_rows(r["latent"])]

    def values(self, latent: int, kind: str = "firing") -> tuple[list[str], np.ndarray]:
        """The reservoir's sample ids and values of `latent` (`kind`: `firing` or `negative`)."""
        rows = self._grouped("reservoir", "kind", kind).get(latent, [])
        return [r["sample_id"] for r in rows], np.array([r["value"] for r in rows], np.float32)

    def _grouped(self, name: str, column: str | None, value: str | None) -> dict[int, list[dict[str, Any]]]:
        """The rows of table `name` whose `column` is `value` (None: all rows), by latent (in table order),
        computed once."""
        if (name, value) not in self._groups:
            table = getattr(self, name)
            grouped: dict[int, list[dict[str, Any]]] = {}
            rows = table if column is None else table.filter(pc.equal(table[column], value))
            for row in rows.to_pylist():
                grouped.setdefault(row["latent"], []).append(row)
            self._groups[(name, value)] = grouped
        return self._groups[(name, value)]


def results_exist(output: str, options: storage.StorageOptions | None = None) -> bool:
    return storage.exists(storage.join(output, SUMMARY_FILE), options)


def read_summary(output: str, options: storage.StorageOptions | None = None) -> dict:
    """The summary (`summary.json`: what the pass was, its counts) of the results under `output`, without their
    tables; a missing one raises `MissingInputError` naming it."""
    storage.require_exists(storage.join(output, SUMMARY_FILE), options)
    return json.loads(storage.read_bytes(storage.join(output, SUMMARY_FILE), options))


def read_results(output: str, options: storage.StorageOptions | None = None) -> Results:
    """The results written under `output`; a missing one raises `MissingInputError` naming it."""
    summary = read_summary(output, options)

    def table(name: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, name), options)))

    return Results(
        uri=output,
        summary=summary,
        latents=table(LATENTS_FILE),
        top=table(TOP_FILE),
        reservoir=table(RESERVOIR_FILE),
        text=table(TEXT_FILE) if storage.exists(storage.join(output, TEXT_FILE), options) else None,
        options=options,
    )
