import pyarrow as pa
import pyarrow.parquet as pq

from prisma_ray import storage
from prisma_ray.data.errors import (
    ERROR_SCHEMA,
    BadSample,
    ErrorRecord,
    count_reasons,
    errors_uri,
    read_errors_table,
    write_errors_table,
)

RECORDS = [ErrorRecord("a.png", "/d/a.png", "empty", "zero-byte image"), ErrorRecord("b.png", "/d/b.png", "corrupt")]


def test_write_never_overwrites_and_reads_back(tmp_path):
    out = str(tmp_path / "acts")
    first = write_errors_table(RECORDS, out)
    second = write_errors_table(RECORDS[:1], out)
    assert first != second and first.startswith(errors_uri(out)) and second.endswith(".parquet")
    parts = storage.list_files(errors_uri(out))
    assert len(parts) == 2
    table = read_errors_table(out)
    assert table.schema == ERROR_SCHEMA
    assert sorted(table.column("sample_id").to_pylist()) == ["a.png", "a.png", "b.png"]
    assert pq.read_table(first).column("reason").to_pylist() == ["empty", "corrupt"]


def test_nothing_to_write(tmp_path):
    out = str(tmp_path / "acts")
    assert write_errors_table([], out) is None
    assert read_errors_table(out).num_rows == 0


def test_errors_dir_is_ignored_by_parquet_readers(tmp_path):
    out = tmp_path / "acts"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "shard-0.parquet")
    write_errors_table(RECORDS, str(out))
    assert pq.read_table(out).column_names == ["x"]


def test_record_from_exception_and_counts():
    record = ErrorRecord.from_exception("v.mp4", "s3://b/v.mp4", BadSample("too_short", "4 frames"))
    assert record == ErrorRecord("v.mp4", "s3://b/v.mp4", "too_short", "4 frames")
    assert count_reasons([*RECORDS, record, RECORDS[0]]) == {"empty": 2, "corrupt": 1, "too_short": 1}
