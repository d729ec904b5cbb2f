"""A sweep's output folder: one result file per evaluated checkpoint, so a rerun skips what is done.

Layout under the output URI:
  _sweep.json               the evaluation config that writes here (a changed config is refused)
  results/<key>.parquet     one metrics row per checkpoint (key: a hash of its URI), written atomically
  metrics.parquet           every row, rebuilt at the end of each run
  leaderboard.html, plots/  see `prisma_ray.evaluate.report`
  errors.json               the checkpoints that failed in the last run, and why
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from prisma_ray.errors import InvalidRequest

from .. import storage, store

MARKER = "_sweep.json"


def result_key(checkpoint: str) -> str:
    return hashlib.sha256(checkpoint.encode()).hexdigest()[:20]


class ResultStore:
    """Reads and writes the result files of one sweep output."""

    def __init__(self, uri: str, options: storage.StorageOptions | None = None):
        self.uri = storage.absolute(uri)
        self.options = options
        self.fs, self.path = storage.resolve(self.uri, options)

    def claim(self, description: dict[str, Any]) -> None:
        """Record the evaluation config writing here, or refuse if another one wrote the results here."""
        storage.require_bucket(self.uri, self.options)
        marker = posixpath.join(self.path, MARKER)
        description = json.loads(json.dumps(description, sort_keys=True))
        if self.fs.get_file_info(marker).type != pafs.FileType.File:
            store.write_atomic(self.fs, marker, json.dumps(description, indent=1).encode())
            return
        with self.fs.open_input_stream(marker) as f:
            existing = json.loads(f.read())
        if existing != description:
            changed = sorted(k for k in {*existing, *description} if existing.get(k) != description.get(k))
            raise InvalidRequest(
                f"{self.uri} holds results of a different evaluation config (changed: {', '.join(changed)}); "
                "write to a new output, or delete the old results first"
            )

    def done(self) -> set[str]:
        """The keys of the checkpoints already evaluated."""
        infos = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.path, "results"), allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.File]
        return {n[: -len(".parquet")] for n in names if n.endswith(".parquet")}

    def write(self, row: dict[str, Any]) -> None:
        """Write one checkpoint's metrics row (atomically: a crash leaves no partial result)."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row]), sink)
        store.write_atomic(
            self.fs,
            posixpath.join(self.path, "results", f"{result_key(row['checkpoint'])}.parquet"),
            sink.getvalue().to_pybytes(),
        )

    def table(self) -> pa.Table:
        """Every result row, sorted by model, hook and checkpoint."""
        folder = posixpath.join(self.path, "results")
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
        if not paths:
            return pa.table({})
        table = pa.concat_tables([pq.read_table(p, filesystem=self.fs) for p in paths], promote_options="permissive")
        return table.sort_by([("model", "ascending"), ("hook", "ascending"), ("checkpoint", "ascending")])

    def write_file(self, name: str, data: bytes) -> str:
        """Write `data` to `<output>/<name>` atomically; return its URI."""
        store.write_atomic(self.fs, posixpath.join(self.path, name), data)
        return storage.join(self.uri, name)

    def write_table(self, table: pa.Table, name: str = "metrics.parquet") -> str:
        """Write `table` as Parquet to `<output>/<name>` atomically; return its URI."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_file(name, buf.getvalue())

    def read_table(self, name: str = "metrics.parquet") -> pa.Table:
        """The Parquet table `<output>/<name>` (`MissingInputError` naming it when absent)."""
        uri = storage.join(self.uri, name)
        storage.require_exists(uri, self.options)
        return pq.read_table(posixpath.join(self.path, name), filesystem=self.fs)
