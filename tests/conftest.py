"""Shared fixtures: one local Ray per session, a moto S3 server on loopback, and bad-input zoos.

- `ray_local` (session): `ray.init` of a fresh 2-CPU local cluster, shut down at the end.
- `moto_endpoint` (session): URL of a threaded moto S3 server on 127.0.0.1.
- `s3` (function): a reset moto with an empty bucket; an `S3Env` with `.options` (`StorageOptions`),
  `.uri(*parts)` and `.client` (boto3).
- `image_zoo` / `video_zoo` (session): `{file name: (bytes, expected reason or None)}` covering
  every bad-input kind (and inputs that look odd but are good).
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

S3_BUCKET = "prisma-test"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture
def one_torch_thread():
    """Small matrices on a shared 2-core machine: extra torch threads only add synchronisation."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray cluster (2 CPUs, no dashboard, on loopback) shared by the whole session."""
    import ray

    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_endpoint():
    """`http://127.0.0.1:<port>` of a moto S3 server running for the session (test credentials in env)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in S3_KEYS}
    os.environ.update(S3_KEYS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass(frozen=True)
class S3Env:
    endpoint: str
    bucket: str
    client: object

    @property
    def options(self):
        from prisma_ray.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint, region="us-east-1", **_key_fields())

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


def _key_fields() -> dict:
    return {"access_key": S3_KEYS["AWS_ACCESS_KEY_ID"], "secret_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture
def s3(moto_endpoint) -> S3Env:
    """Moto reset to empty, with one bucket (`S3_BUCKET`)."""
    import boto3
    import requests

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=S3_BUCKET)
    return S3Env(moto_endpoint, S3_BUCKET, client)


def _noise_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(array_or_image, fmt: str, **save_args) -> bytes:
    from PIL import Image

    img = Image.fromarray(array_or_image) if isinstance(array_or_image, np.ndarray) else array_or_image
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` (8-bit grey) with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _png_rgb16(array16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of `uint16[H, W, 3]` (Pillow cannot write one)."""
    h, w, _ = array16.shape
    raw = b"".join(b"\x00" + array16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _moving_bar_frames(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    """`uint8[n, h, w, 3]`: a red background with a blue bar moving right by 2 px per frame."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = 255
    for i in range(n):
        frames[i, 10:30, 2 * i : 2 * i + 16] = (0, 0, 255)
    return frames


def _encode_video(frames: np.ndarray, fmt: str = "mp4", codec: str = "libx264", path: str | None = None,
                 faststart: bool = False, fps: int = 8) -> bytes:  # fmt: skip
    """Encode frames with PyAV; MP4 `faststart` (index first) needs a real file `path`."""
    import av

    target = path or io.BytesIO()
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(target, "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    if path:
        with open(path, "rb") as f:
            return f.read()
    return target.getvalue()


IMAGE_ZOO_MAX_PIXELS = 1_000_000


@pytest.fixture(scope="session")
def image_zoo() -> dict[str, tuple[bytes, str | None]]:
    """Image files keyed by name with the reason each must be skipped for (None: good), at
    `max_pixels=IMAGE_ZOO_MAX_PIXELS`."""
    from PIL import Image

    rgb = _noise_image()
    png, jpg = _encode(rgb, "PNG"), _encode(rgb, "JPEG", quality=90)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    gray16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    return {
        "good.png": (png, None),
        "good.jpg": (jpg, None),
        "gray.png": (_encode(rgb[:, :, 0], "PNG"), None),
        "rgba.png": (_encode(rgba, "PNG"), None),
        "cmyk.jpg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), None),
        "gray16.png": (_encode(Image.fromarray(gray16), "PNG"), None),
        "rgb16.png": (_png_rgb16(rgb.astype(np.uint16) * 257), None),
        "palette.gif": (_encode(Image.fromarray(rgb).convert("P"), "GIF"), None),
        "empty.png": (b"", "empty"),
        "corrupt.jpg": (b"this is not an image" * 50, "corrupt"),
        "bad_header.png": (png[:8] + b"\x00" * 200, "corrupt"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "bomb.png": (_png_header_only(30_000, 30_000), "too_large"),
        "oversized.png": (_encode(np.zeros((1100, 1000, 3), np.uint8), "PNG"), "too_large"),
    }


@pytest.fixture(scope="session")
def video_zoo(tmp_path_factory) -> dict[str, tuple[bytes, str | None]]:
    """Video files keyed by name with the reason each must be skipped for (None: good), for a
    sampling of 8 frames with stride 1."""
    tmp = tmp_path_factory.mktemp("videos")
    frames = _moving_bar_frames(12)
    faststart = _encode_video(frames, path=str(tmp / "fs.mp4"), faststart=True)
    plain = _encode_video(frames)
    webm = _encode_video(frames, "webm", "libvpx")
    return {
        "good.mp4": (plain, None),
        "good.webm": (webm, None),
        "good.avi": (_encode_video(frames, "avi", "mpeg4"), None),
        "short.mp4": (_encode_video(frames[:4]), "too_short"),
        "empty.mp4": (b"", "empty"),
        "corrupt.mp4": (b"\x00garbage" * 300, "corrupt"),
        "truncated_index_first.mp4": (faststart[: int(len(faststart) * 0.6)], "truncated"),
        "truncated_index_last.mp4": (plain[: int(len(plain) * 0.6)], "truncated"),
        "truncated.webm": (webm[: int(len(webm) * 0.5)], "truncated"),
    }
