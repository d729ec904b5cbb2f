"""The activation store: one Parquet dataset per (model, hook point, split), rows are tokens.

Layout under a store URI:
  part-00000.parquet ...   complete shards (written under a temporary name, then renamed)
  _stats/part-00000.json   per-shard running statistics (merged into the manifest)
  _config.json             the hash of the config that writes here (a changed config is refused)
  manifest.json            model, hook, dtype, model_dtype, d_model, token counts, merged statistics
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

from . import storage
from .errors import InvalidRequest, PrismaRayError
from .models.spec import ModelDType, TokenKind

StoreDType = Literal["float16", "bfloat16", "float32"]
DTYPE_KEY = b"prisma_ray.dtype"
KIND_CODES = {kind.name.lower(): int(kind) for kind in TokenKind}  # the `kind` column: TokenKind codes by name
KEYS = ["sample_id", "frame", "token"]  # the columns that identify a row (one token of one sample)
_ARROW_VALUE = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}
# Largest finite value of each storage dtype (values round to nearest even; beyond about this they become inf).
DTYPE_MAX: dict[str, float] = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}
# Activation values byte-stream-split then zstd level 1: smaller than dictionary encoding and ~5x faster to write.
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=1,
    use_dictionary=["sample_id"],
    column_encoding={"act.list.element": "BYTE_STREAM_SPLIT"},
    write_statistics=["sample_id", "token", "frame", "kind"],
    row_group_size=65536,
)


class StoreConfigMismatch(PrismaRayError, ValueError):
    """An output store was written by a different config."""


class ActivationRangeError(InvalidRequest):
    """Activations that the store's dtype cannot hold (they would become inf), or NaN/inf from the model itself."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def store_uri(root: str, model: str, hook: str, split: str) -> str:
    """Where the store of `(model, hook, split)` lives under `root`."""
    return storage.join(root, model, hook, split)


def schema(d_model: int, dtype: StoreDType) -> pa.Schema:
    """Arrow schema of a store's shards."""
    act = pa.field("act", pa.list_(_ARROW_VALUE[dtype], d_model), metadata={DTYPE_KEY: dtype.encode()})
    return pa.schema(
        [
            pa.field("sample_id", pa.string()),
            pa.field("token", pa.int16()),
            pa.field("frame", pa.int16()),
            pa.field("kind", pa.int8()),
            act,
        ]
    )


def encode_acts(
    acts: np.ndarray, dtype: StoreDType, where: str = "encode_acts", sample_ids: Sequence[str] | None = None
) -> pa.FixedSizeListArray:
    """`float32[N, D]` -> fixed-size-list Arrow array in the storage dtype (bfloat16 as its uint16 bits).

    Values round to the nearest `dtype` value (ties to even). Raises `ActivationRangeError` (naming `where`,
    the rows' `sample_ids [N]` and the largest magnitude) when a value is NaN or inf, or when a finite value
    would round to inf in `dtype`: nothing is encoded then.
    """
    acts = np.ascontiguousarray(acts, dtype=np.float32)
    n, d = acts.shape
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is refused below, naming the rows
            flat = acts.astype(np.float16).ravel()
        finite = bool(np.isfinite(flat).all())
    elif dtype == "bfloat16":
        bits = acts.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        flat = ((bits + rounding) >> 16).astype(np.uint16).ravel()
        finite = not ((flat & np.uint16(0x7F80)) == np.uint16(0x7F80)).any()  # exponent all ones: inf or NaN
    else:
        flat = acts.ravel()
        finite = bool(np.isfinite(flat).all())
    if not finite:
        raise range_error(acts, dtype, where, sample_ids)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=_ARROW_VALUE[dtype]), d)


def range_error(
    acts: np.ndarray, dtype: StoreDType, where: str, sample_ids: Sequence[str] | None = None
) -> ActivationRangeError:
    """The error for `float32[N, D]` activations that `dtype` cannot hold: NaN/inf already, or finite values
    beyond its range (it names `where`, the samples of the offending rows, the largest magnitude and a dtype
    that holds it)."""
    acts = np.asarray(acts, dtype=np.float32)
    magnitude = np.abs(acts).max(axis=1) if acts.size else np.zeros(len(acts), np.float32)
    broken = ~np.isfinite(magnitude)
    if broken.any():
        bad, what = broken, "NaN" if np.isnan(magnitude).any() else "inf"
        detail = (
            f"hold {what} values from the model itself, which no storage dtype can hold; check the model's "
            "weights, inputs and dtype (a float16 model can overflow)"
        )
    else:
        bad = magnitude > DTYPE_MAX[dtype]
        largest = float(magnitude.max())
        holds = next(name for name, top in DTYPE_MAX.items() if largest <= top and name != "float16")
        detail = (
            f"reach magnitude {largest:.6g}, beyond {dtype}'s largest value {DTYPE_MAX[dtype]:.6g}: stored as "
            f"{dtype} they would become inf; {holds} holds them (set dtype: {holds})"
        )
    rows = np.flatnonzero(bad) if bad.any() else np.arange(len(acts))
    return ActivationRangeError(f"{where}: activations of {_samples(rows, sample_ids)} {detail}; nothing was written")


def _samples(rows: np.ndarray, sample_ids: Sequence[str] | None, show: int = 5) -> str:
    """`samples 'a', 'b' (+3 more)` for the rows `rows` (their row indices without `sample_ids`)."""
    if sample_ids is None:
        names = [str(int(r)) for r in rows]
        label = "rows"
    else:
        names = list(dict.fromkeys(repr(str(sample_ids[int(r)])) for r in rows))
        label = "samples"
    more = f" (+{len(names) - show} more)" if len(names) > show else ""
    return f"{label} {', '.join(names[:show])}{more}"


def decode_acts(column: pa.Array | pa.ChunkedArray, dtype: StoreDType) -> np.ndarray:
    """Fixed-size-list `act` column -> `float32[N, D]`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False).reshape(-1, d)


def token_table(
    sample_ids: list[str],
    token: np.ndarray,
    frame: np.ndarray,
    kind: np.ndarray,
    acts: np.ndarray,
    dtype: StoreDType,
    where: str = "token_table",
) -> pa.Table:
    """One shard's rows (one per token) in the store schema; `ActivationRangeError` (naming `where` and the
    samples) when `acts` holds values `dtype` cannot hold (see `encode_acts`)."""
    return pa.Table.from_arrays(
        [
            pa.array(sample_ids, pa.string()),
            pa.array(token, pa.int16()),
            pa.array(frame, pa.int16()),
            pa.array(kind, pa.int8()),
            encode_acts(acts, dtype, where, sample_ids),
        ],
        schema=schema(acts.shape[1], dtype),
    )


@dataclass
class RunningStats:
    """Per-dimension mean and variance (Welford/Chan) and the mean L2 norm of the rows seen."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    norm_sum: float

    @classmethod
    def empty(cls, d_model: int) -> RunningStats:
        return cls(0, np.zeros(d_model), np.zeros(d_model), 0.0)

    @classmethod
    def of(cls, x: np.ndarray) -> RunningStats:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        m2 = ((x - mean) ** 2).sum(axis=0)
        return cls(len(x), mean, m2, float(np.linalg.norm(x, axis=1).sum()))

    def merge(self, other: RunningStats) -> RunningStats:
        """Statistics of the union of both row sets (Chan et al.'s parallel update)."""
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return RunningStats(n, mean, m2, self.norm_sum + other.norm_sum)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(), "norm_sum": self.norm_sum}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunningStats:
        return cls(int(data["count"]), np.asarray(data["mean"]), np.asarray(data["m2"]), float(data["norm_sum"]))


class Manifest(BaseModel):
    """`manifest.json` beside a store's shards."""

    model: str
    hook: str
    split: str
    dtype: StoreDType
    model_dtype: ModelDType = "float32"  # the dtype the model ran in (stores written before it existed: float32)
    d_model: int  # the stored width (per-head points: heads * d_head, or d_head for one head)
    heads: int | Literal["flattened"] | None = None  # per-head points: every head flattened (head-major), or one head
    token_selection: dict[str, Any]
    token_layout: dict[str, Any]
    dataset: dict[str, Any]
    config_hash: str
    n_samples: int
    n_tokens: int
    n_errors: int = 0
    shards: list[str]
    mean: list[float]
    std: list[float]
    mean_norm: float


class StoreWriter:
    """Writes whole shards of one store atomically and knows which shards are complete."""

    def __init__(self, uri: str, options: storage.StorageOptions | None = None):
        self.uri = uri
        self.options = options
        self.fs, self.path = storage.resolve(uri, options)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def claimed(self) -> dict[str, Any] | None:
        """The config recorded by `claim` (`config_hash` plus its description), or None if unclaimed."""
        marker = self._path("_config.json")
        if self.fs.get_file_info(marker).type != pafs.FileType.File:
            return None
        return json.loads(self._read(marker))

    def claim(self, config_hash: str, description: dict[str, Any]) -> None:
        """Record the config writing here, or refuse if another config already wrote here."""
        existing = self.claimed()
        if existing is None:
            marker = json.dumps({"config_hash": config_hash, **description}, indent=1).encode()
            self._write_atomic(self._path("_config.json"), marker)
        elif existing["config_hash"] != config_hash:
            keys = {*description, *existing} - {"config_hash"}
            changed = sorted(k for k in keys if existing.get(k) != description.get(k))
            detail = f" Changed: {', '.join(changed)}." if changed else ""
            raise StoreConfigMismatch(
                f"{self.uri} holds activations written by a different config (hash {existing['config_hash']}, "
                f"now {config_hash}).{detail} Write to a new output path, or delete the old store first."
            )

    def completed(self) -> set[int]:
        """Indices of the shards that are complete."""
        self._ensure_dir()
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        done = set()
        for info in infos:
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and name.startswith("part-") and name.endswith(".parquet"):
                done.add(int(name[5:10]))
        return done

    def write_shard(self, index: int, table: pa.Table, stats: RunningStats) -> int:
        """Write shard `index` (statistics first, then the Parquet file by rename); return its bytes."""
        self._write_atomic(self._path("_stats", f"part-{index:05d}.json"), json.dumps(stats.to_dict()).encode())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **PARQUET_OPTIONS)
        data = sink.getvalue()
        self._write_atomic(self._path(shard_name(index)), data)
        return data.size

    def merged_stats(self, indices: set[int], d_model: int) -> RunningStats:
        total = RunningStats.empty(d_model)
        for index in sorted(indices):
            total = total.merge(
                RunningStats.from_dict(json.loads(self._read(self._path("_stats", f"part-{index:05d}.json"))))
            )
        return total

    def remove_temporaries(self) -> int:
        """Delete the temporary files that interrupted writers left behind; return how many there were."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(".tmp-")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def write_manifest(self, manifest: Manifest) -> None:
        self._write_atomic(self._path("manifest.json"), manifest.model_dump_json(indent=1).encode())

    def _ensure_dir(self) -> None:
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(self.path, recursive=True)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write_atomic(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` under a temporary name beside it, then rename it into place."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{posixpath.dirname(path)}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_manifest(uri: str, options: storage.StorageOptions | None = None) -> Manifest:
    """The manifest of a finished store.

    Raises `MissingInputError` when `uri` holds none: naming the stores below it where `uri` is a folder above
    some (`<output>`, `<output>/<model>` or `<output>/<model>/<hook>`), saying so where the store's extraction
    has not finished (shards but no manifest), else naming the missing path."""
    manifest = storage.join(uri, "manifest.json")
    try:
        storage.require_exists(manifest, options)
    except storage.MissingInputError as missing:
        fs, path = storage.resolve(uri, options)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise
        files = storage.list_files(uri, options)
        below = [posixpath.dirname(f) for f in files if posixpath.basename(f) == "manifest.json"]
        if below:
            shown = ", ".join(below[:5]) + (f" and {len(below) - 5} more" if len(below) > 5 else "")
            raise storage.MissingInputError(
                f"{uri} is not an activation store but a folder above {len(below)}: {shown} "
                "(a store is <output>/<model>/<hook>/<split>); give the store's own path"
            ) from missing
        if any(posixpath.basename(f).startswith("part-") for f in files):
            raise storage.MissingInputError(
                f"{uri}: the store's extraction has not finished (shards but no manifest.json); rerun the same "
                "`prisma-ray extract` config to complete it"
            ) from missing
        raise
    return Manifest.model_validate_json(storage.read_bytes(manifest, options))


def shard_paths(uri: str, options: storage.StorageOptions | None = None) -> list[str]:
    """Filesystem paths of the complete shards of a store, in order."""
    fs, path = storage.resolve(uri, options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        posixpath.basename(i.path)
        for i in infos
        if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("part-")
    )
    return [posixpath.join(path, n) for n in names]


def read_table(uri: str, options: storage.StorageOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every row of a store as one Arrow table (plain pyarrow, no Ray)."""
    fs, _ = storage.resolve(uri, options)
    paths = shard_paths(uri, options)
    if not paths:
        raise storage.MissingInputError(f"{uri}: no activation shards here; run `prisma-ray extract` first.")
    return pa.concat_tables(pq.read_table(p, filesystem=fs, columns=columns) for p in paths)


def read_acts(uri: str, options: storage.StorageOptions | None = None) -> np.ndarray:
    """Every activation of a store as `float32[n_tokens, d_model]`."""
    table = read_table(uri, options, columns=["act"])
    return decode_acts(table.column("act"), store_dtype(table.schema))


def store_dtype(table_schema: pa.Schema) -> StoreDType:
    """The storage dtype recorded on a store schema's `act` field."""
    return table_schema.field("act").metadata[DTYPE_KEY].decode()


def iter_act_batches(uri: str, batch_size: int, options: storage.StorageOptions | None = None) -> Iterator[np.ndarray]:
    """Stream `float32[<=batch_size, d_model]` batches of a store, shard by shard."""
    fs, _ = storage.resolve(uri, options)
    for path in shard_paths(uri, options):
        pf = pq.ParquetFile(path, filesystem=fs)
        dtype = store_dtype(pf.schema_arrow)
        for batch in pf.iter_batches(batch_size=batch_size, columns=["act"]):
            yield decode_acts(batch.column(0), dtype)


def align(tables: list[pa.Table]) -> list[pa.Table]:
    """The rows of `tables` matched on `(sample_id, frame, token)` (a row missing from any table is left out of
    all), in the first table's order."""
    first = tables[0].select(KEYS)
    if all(t.select(KEYS).equals(first) for t in tables[1:]):
        return tables
    joined = first.append_column("_i0", pa.array(np.arange(first.num_rows)))
    for i, t in enumerate(tables[1:], 1):
        joined = joined.join(
            t.select(KEYS).append_column(f"_i{i}", pa.array(np.arange(t.num_rows))), KEYS, join_type="inner"
        )
    joined = joined.sort_by("_i0")
    return [t.take(joined.column(f"_i{i}")) for i, t in enumerate(tables)]
