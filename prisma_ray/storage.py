"""One place that turns a URI (`s3://bucket/key`, `file:///path` or a plain path) into a filesystem."""

from __future__ import annotations

import functools
import logging
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray.errors import InvalidRequest

from .errors import PrismaRayError

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"


class MissingInputError(PrismaRayError, FileNotFoundError):
    """A bucket, path or object named in a config does not exist (raised before any work starts)."""


class StorageOptions(BaseModel):
    """How to reach object storage. Unset fields fall back to the usual AWS environment variables.

    `endpoint_url` (e.g. `http://127.0.0.1:9000` for MinIO or moto) falls back to `AWS_ENDPOINT_URL_S3`,
    then `AWS_ENDPOINT_URL`; `region` to `AWS_REGION`, `AWS_DEFAULT_REGION`, then us-east-1;
    keys to `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL)"
    )
    region: str | None = Field(None, description="S3 region (default: $AWS_REGION, $AWS_DEFAULT_REGION, us-east-1)")
    access_key: str | None = Field(None, description="S3 access key id (default: $AWS_ACCESS_KEY_ID)")
    secret_key: str | None = Field(None, description="S3 secret access key (default: $AWS_SECRET_ACCESS_KEY)")
    session_token: str | None = Field(None, description="S3 session token (default: $AWS_SESSION_TOKEN)")
    anonymous: bool = Field(False, description="access public buckets without credentials")

    def resolved(self) -> StorageOptions:
        """These options with every unset field filled in from the environment of this process.

        Resolve on the driver before shipping options to Ray workers, whose environment may differ.
        """
        env = os.environ.get
        return StorageOptions(
            endpoint_url=self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            access_key=self.access_key or env("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or env("AWS_SESSION_TOKEN"),
            anonymous=self.anonymous,
        )


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path)` for a URI; `path` is `bucket/key` for S3 and an absolute path locally."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise InvalidRequest(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://my-bucket/prefix")
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return _s3_filesystem((options or StorageOptions()).resolved()), path
    if "://" in uri and not uri.startswith("file://"):
        raise InvalidRequest(f"{uri!r}: unsupported scheme; use s3://, file:// or a plain path")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {"region": options.region, "anonymous": options.anonymous}
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if options.access_key and options.secret_key:
        kwargs.update(access_key=options.access_key, secret_key=options.secret_key)
        if options.session_token:
            kwargs["session_token"] = options.session_token
    log.debug("S3 filesystem: endpoint=%s region=%s", options.endpoint_url, options.region)
    return pafs.S3FileSystem(**kwargs)


def absolute(uri: str) -> str:
    """`uri` with a local relative path made absolute (against this process's working directory)."""
    if is_s3(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with `/`, keeping its scheme."""
    return posixpath.join(uri.rstrip("/"), *(p.strip("/") for p in parts))


def relative(root_path: str, path: str) -> str:
    """`path` relative to `root_path` (both filesystem paths as returned by `resolve`), with `/`."""
    return posixpath.relpath(path.replace(os.sep, "/"), root_path.replace(os.sep, "/"))


def require_bucket(uri: str, options: StorageOptions | None = None) -> None:
    """For an `s3://` URI, raise `MissingInputError` unless its bucket exists and is reachable."""
    if not is_s3(uri):
        return
    fs, path = resolve(uri, options)
    bucket = path.split("/", 1)[0]
    endpoint = (options or StorageOptions()).resolved().endpoint_url or "AWS"
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise MissingInputError(
            f"{uri}: cannot reach bucket {bucket!r} at {endpoint}: {e}. "
            "Check endpoint_url, region and credentials (StorageOptions or AWS_* env vars)."
        ) from e
    if info.type == pafs.FileType.NotFound:
        raise MissingInputError(
            f"{uri}: bucket {bucket!r} does not exist at {endpoint}. Create the bucket or fix the URI / endpoint_url."
        )


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file, folder or S3 prefix is at `uri` (False where nothing is, without an error)."""
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def require_exists(uri: str, options: StorageOptions | None = None) -> pafs.FileInfo:
    """The `FileInfo` of `uri`; raises `MissingInputError` naming the URI and the fix when it is missing."""
    require_bucket(uri, options)
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        where = "no object or prefix at this key" if is_s3(uri) else "no such file or directory"
        raise MissingInputError(
            f"{uri}: {where}. Fix the URI, or write the data there first (a local path must exist on every Ray node)."
        )
    return info


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    with fs.open_input_file(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write `data` to `uri`, creating local parent directories."""
    fs, path = resolve(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Relative paths (sorted, `/`-separated) of every file under the directory `uri`.

    Entries whose name starts with `.` or `_` (hidden files, `_errors/`, markers) are left out.
    """
    fs, root = resolve(uri, options)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rels = (relative(root, i.path) for i in infos if i.type == pafs.FileType.File)
    return sorted(r for r in rels if not any(part.startswith((".", "_")) for part in r.split("/")))
