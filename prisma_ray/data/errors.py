"""Bad samples: the `BadSample` exception, the error record schema and the errors table on storage."""

from __future__ import annotations

import io
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from prisma_ray import storage, store
from prisma_ray.errors import PrismaRayError

log = logging.getLogger(__name__)

# Reasons a sample is skipped (the `reason` column of the errors table).
EMPTY = "empty"  # zero-byte file or null/empty bytes
CORRUPT = "corrupt"  # not decodable: unknown format, broken header or stream, no video stream
TRUNCATED = "truncated"  # the data ends before what its header declares
TOO_LARGE = "too_large"  # more pixels than `max_pixels` (decompression-bomb guard)
TOO_SHORT = "too_short"  # fewer video frames than the frame sampling needs
MISSING = "missing"  # a listed file does not exist
UNREADABLE = "unreadable"  # the storage read failed (permissions, network)
NO_IMAGE = "no_image"  # a shard record without an image (WebDataset key without image member)
REASONS = (EMPTY, CORRUPT, TRUNCATED, TOO_LARGE, TOO_SHORT, MISSING, UNREADABLE, NO_IMAGE)

ERRORS_DIR = "_errors"
ERROR_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("path", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)


class BadSample(PrismaRayError):
    """One input cannot be used; `reason` is one of `REASONS`, `detail` says why in words."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ErrorRecord:
    """A skipped sample: its id, the file or shard it came from, and why."""

    sample_id: str
    path: str
    reason: str
    detail: str = ""

    @classmethod
    def from_exception(cls, sample_id: str, path: str, exc: BadSample) -> ErrorRecord:
        return cls(sample_id, path, exc.reason, exc.detail)


def errors_uri(output_uri: str) -> str:
    """Directory of the errors table belonging to an output (`<output>/_errors`, ignored by Parquet readers)."""
    return storage.join(output_uri, ERRORS_DIR)


def write_errors_table(
    records: Iterable[ErrorRecord], output_uri: str, options: storage.StorageOptions | None = None
) -> str | None:
    """Write `records` as a new, uniquely named Parquet part under `errors_uri(output_uri)`.

    Never overwrites earlier parts. Returns the part's URI, or None when there is nothing to write.
    """
    records = list(records)
    if not records:
        return None
    now = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([{**asdict(r), "time": now} for r in records], schema=ERROR_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = f"part-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
    uri = storage.join(errors_uri(output_uri), name)
    storage.write_bytes(uri, buf.getvalue(), options)
    log.warning("%d bad samples skipped (%s); recorded in %s", len(records), format_counts(records), uri)
    return uri


def read_errors_table(output_uri: str, options: storage.StorageOptions | None = None) -> pa.Table:
    """Every error part written for `output_uri`, concatenated (empty table if there are none)."""
    root = errors_uri(output_uri)
    if not storage.exists(root, options):
        return ERROR_SCHEMA.empty_table()
    parts = [
        pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(root, rel), options)))
        for rel in storage.list_files(root, options)
        if rel.endswith(".parquet")
    ]
    return pa.concat_tables(parts) if parts else ERROR_SCHEMA.empty_table()


def count_reasons(records: Iterable[ErrorRecord]) -> dict[str, int]:
    """`{reason: count}` for a run summary."""
    return dict(Counter(r.reason for r in records))


def format_counts(records: Iterable[ErrorRecord]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(count_reasons(records).items()))


def write_shard_errors(
    records: Sequence[ErrorRecord], owner: str, shard: int, options: storage.StorageOptions | None
) -> None:
    """Write a shard's bad samples as `<owner>/_errors/part-<shard>.parquet` (a rerun overwrites, never duplicates).

    `read_errors_table(owner)` reads them back.
    """
    if not records:
        return
    now = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([{**asdict(r), "time": now} for r in records], schema=ERROR_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = storage.join(errors_uri(owner), f"part-{shard:05d}.parquet")
    fs, path = storage.resolve(uri, options)
    store.write_atomic(fs, path, buf.getvalue().to_pybytes())
    log.warning(
        "shard %d: %d bad samples skipped (%s); recorded in %s", shard, len(records), format_counts(records), uri
    )
