import pickle

import pyarrow.fs as pafs
import pytest

from prisma_ray import storage
from prisma_ray.storage import MissingInputError, StorageOptions

AWS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


@pytest.fixture
def clean_env(monkeypatch):
    for k in AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_resolve_local_forms_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a", "a", "./a/"):
        fs, path = storage.resolve(uri)
        assert isinstance(fs, pafs.LocalFileSystem)
        assert path == str(tmp_path / "a")


def test_resolve_s3_path_is_bucket_and_key(clean_env):
    fs, path = storage.resolve("s3://bkt/some/prefix/", StorageOptions(endpoint_url="http://127.0.0.1:9"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bkt/some/prefix"
    assert storage.resolve("s3://bkt")[1] == "bkt"


@pytest.mark.parametrize("uri, message", [("s3:///key", "needs a bucket"), ("gs://b/k", "unsupported scheme")])
def test_resolve_rejects_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        storage.resolve(uri)


def test_options_fall_back_to_env(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "AK")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    r = StorageOptions().resolved()
    assert (r.endpoint_url, r.region, r.access_key, r.secret_key) == ("http://s3-specific:2", "eu-west-3", "AK", "SK")
    clean_env.delenv("AWS_ENDPOINT_URL_S3")
    assert StorageOptions().resolved().endpoint_url == "http://generic:1"
    explicit = StorageOptions(endpoint_url="http://mine:3", region="us-west-2", access_key="a", secret_key="b")
    assert explicit.resolved() == explicit


def test_options_default_region(clean_env):
    assert StorageOptions().resolved().region == "us-east-1"


def test_s3_filesystem_uses_endpoint_and_pickles(clean_env):
    options = StorageOptions(endpoint_url="http://127.0.0.1:9000", access_key="a", secret_key="b", region="eu-west-1")
    fs, _ = storage.resolve("s3://bkt/x", options)
    clone = pickle.loads(pickle.dumps(fs))
    assert clone == fs
    assert clone.region == "eu-west-1"
    kwargs = fs.__reduce__()[1][0]
    assert kwargs["endpoint_override"] == "127.0.0.1:9000"
    assert kwargs["scheme"] == "http"


def test_env_endpoint_reaches_the_filesystem(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "https://minio.local:9000")
    fs, _ = storage.resolve("s3://bkt/x")
    kwargs = fs.__reduce__()[1][0]
    assert (kwargs["endpoint_override"], kwargs["scheme"]) == ("minio.local:9000", "https")


def test_join_and_relative():
    assert storage.join("s3://b/p/", "x", "/y.png") == "s3://b/p/x/y.png"
    assert storage.join("/data", "a/b.jpg") == "/data/a/b.jpg"
    assert storage.relative("/data", "/data/a/b.jpg") == "a/b.jpg"


def test_absolute_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("rel/x") == str(tmp_path / "rel/x")
    assert storage.absolute("s3://b/k") == "s3://b/k"
    assert storage.absolute("file:///x") == "file:///x"


def test_require_exists_local(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert storage.require_exists(str(tmp_path / "f.txt")).type == pafs.FileType.File
    assert storage.require_exists(str(tmp_path)).type == pafs.FileType.Directory
    missing = str(tmp_path / "nope")
    with pytest.raises(MissingInputError, match="no such file or directory") as err:
        storage.require_exists(missing)
    assert missing in str(err.value) and "Fix the URI" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_write_read_and_list_files(tmp_path):
    root = str(tmp_path / "root")
    for rel in ("b/2.png", "a/1.png", "top.png", ".hidden/x.png", "a/.DS_Store", "_errors/part.parquet"):
        storage.write_bytes(storage.join(root, rel), rel.encode())
    assert storage.list_files(root) == ["a/1.png", "b/2.png", "top.png"]
    assert storage.read_bytes(storage.join(root, "a/1.png")) == b"a/1.png"
    assert storage.list_files(f"file://{root}") == ["a/1.png", "b/2.png", "top.png"]


def test_exists_says_whether_a_file_or_folder_is_there(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "file.json").write_text("{}")
    assert storage.exists(str(tmp_path / "folder")) and storage.exists(str(tmp_path / "folder" / "file.json"))
    assert not storage.exists(str(tmp_path / "folder" / "missing.json"))
    assert not storage.exists(str(tmp_path / "missing" / "file.json"))
