"""storage.py and the errors table against moto S3 (no Ray)."""

import pytest

from prisma_ray import storage
from prisma_ray.data.errors import ErrorRecord, errors_uri, read_errors_table, write_errors_table
from prisma_ray.storage import MissingInputError, StorageOptions


def test_write_list_read(s3):
    root = s3.uri("root")
    for rel in ("b/2.png", "a/1.png", "_errors/x.parquet", ".hidden"):
        storage.write_bytes(storage.join(root, rel), rel.encode(), s3.options)
    assert storage.list_files(root, s3.options) == ["a/1.png", "b/2.png"]
    assert storage.read_bytes(storage.join(root, "b/2.png"), s3.options) == b"b/2.png"
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]}
    assert "root/a/1.png" in keys


def test_missing_bucket_and_key_fail_with_clear_messages(s3):
    with pytest.raises(MissingInputError) as err:
        storage.require_exists("s3://no-such-bucket/data", s3.options)
    message = str(err.value)
    assert "s3://no-such-bucket/data" in message and "bucket 'no-such-bucket' does not exist" in message
    assert s3.endpoint in message and "Create the bucket" in message
    with pytest.raises(MissingInputError, match="no object or prefix at this key"):
        storage.require_exists(s3.uri("nothing/here"), s3.options)
    storage.write_bytes(s3.uri("dir/f.bin"), b"x", s3.options)
    assert storage.require_exists(s3.uri("dir"), s3.options).type == storage.pafs.FileType.Directory
    assert storage.require_exists(s3.uri("dir/f.bin"), s3.options).size == 1


def test_endpoint_from_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    storage.write_bytes(s3.uri("env.txt"), b"via env", StorageOptions())
    assert s3.client.get_object(Bucket=s3.bucket, Key="env.txt")["Body"].read() == b"via env"


def test_errors_table_on_s3(s3):
    out = s3.uri("runs/acts")
    records = [ErrorRecord("a", "s3://x/a", "corrupt", "bad"), ErrorRecord("b", "s3://x/b", "missing")]
    first = write_errors_table(records, out, s3.options)
    second = write_errors_table(records[:1], out, s3.options)
    assert first != second and first.startswith(errors_uri(out) + "/part-")
    table = read_errors_table(out, s3.options)
    assert sorted(table.column("reason").to_pylist()) == ["corrupt", "corrupt", "missing"]
