"""Bytes to pixels: images with Pillow, sampled video frames with PyAV. Every failure becomes `BadSample`."""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Literal

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prisma_ray.data.errors import CORRUPT, EMPTY, TOO_LARGE, TOO_SHORT, TRUNCATED, BadSample
from prisma_ray.errors import InvalidRequest

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb-warning threshold (~89.5 Mpx)
WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

VideoInput = bytes | str | BinaryIO


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image to `uint8[H, W, 3]` RGB, applying its EXIF orientation.

    Grayscale, palette, CMYK (Pillow's conversion, no ICC colour management) and 16-bit images are
    converted; 16-bit values are scaled to 0..255; transparent pixels are composited on white.
    Raises `BadSample` for empty, corrupt, truncated or over-`max_pixels` input.
    """
    if not data:
        raise BadSample(EMPTY, "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadSample(TOO_LARGE, f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample(TOO_LARGE, str(e)) from None
    except UnidentifiedImageError:
        raise BadSample(CORRUPT, "not a recognised image format") from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, zlib.error...)
        reason = TRUNCATED if "truncated" in str(e).lower() else CORRUPT
        raise BadSample(reason, f"{type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        gray = np.clip((values * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if any(b in ("A", "a") for b in img.getbands()) or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


class FrameSampling(BaseModel):
    """Which frames of a video make one clip: `num_frames` frames, `stride` apart (or at `fps`).

    `fps` sets the stride per video to `round(video_fps / fps)`; `anchor` puts the clip at the start
    or the centre of the video.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_frames: int = Field(ge=1, description="frames per clip")
    stride: int = Field(1, ge=1, description="source frames between two sampled frames (1: consecutive)")
    fps: float | None = Field(
        None, gt=0, description="sample at this rate instead (frames per second; the stride follows each video's fps)"
    )
    anchor: Literal["start", "center"] = Field("center", description="clip at the start or the centre of the video")
    offset: int = Field(
        0,
        ge=0,
        description="source frames skipped before the first sampled frame (at the start; within what is left, "
        "centred): e.g. half a stride takes the frames between another sampling's",
    )

    @model_validator(mode="after")
    def _stride_or_fps(self) -> FrameSampling:
        if self.fps is not None and self.stride != 1:
            raise InvalidRequest("set either stride or fps, not both")
        return self

    def indices(self, total: int, video_fps: float) -> np.ndarray:
        """`int64[num_frames]` source frame indices for a video of `total` frames; `BadSample` if too short."""
        stride = self.stride if self.fps is None else max(1, round(video_fps / self.fps))
        span = (self.num_frames - 1) * stride + 1
        if total < self.offset + span:
            raise BadSample(
                TOO_SHORT,
                f"{total} frames; sampling needs {self.offset + span} (num_frames={self.num_frames}, stride={stride}, "
                f"offset={self.offset})",
            )
        start = self.offset + (0 if self.anchor == "start" else (total - self.offset - span) // 2)
        return start + np.arange(self.num_frames, dtype=np.int64) * stride


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8[T, H, W, 3]
    frame_index: np.ndarray  # int64[T]: index of each frame in the source video
    fps: float


def decode_video(source: VideoInput, sampling: FrameSampling, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedVideo:
    """Decode the frames `sampling` picks from a video given as bytes, a local path or a seekable file.

    Raises `BadSample` for empty, corrupt, truncated, too-short or over-`max_pixels` videos.
    """
    if _size(source) == 0:
        raise BadSample(EMPTY, "zero-byte video")
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise BadSample(TRUNCATED if _iso_bmff_truncated(source) else CORRUPT, "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise BadSample(TOO_LARGE, f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if fps <= 0:
                raise BadSample(CORRUPT, "unknown frame rate")
            total = stream.frames or _count_packets(container, stream)
            declared = _declared_frames(container, stream, fps)
            try:
                wanted = sampling.indices(total, fps)
            except BadSample:
                if declared > total:
                    raise BadSample(TRUNCATED, f"{total} frames present, container declares {declared}") from None
                raise
        with _open(source) as container:
            frames = _decode_frames(container, set(wanted.tolist()), int(wanted[-1]))
    except BadSample:
        raise
    except Exception as e:  # PyAV / FFmpeg errors, or a stream ending mid-frame
        reason = TRUNCATED if _iso_bmff_truncated(source) else CORRUPT
        raise BadSample(reason, f"{type(e).__name__}: {e}") from None
    if len(frames) < len(wanted):
        raise BadSample(TRUNCATED, f"decoded {len(frames)} of the {len(wanted)} frames sampled from {total}")
    return DecodedVideo(np.stack(frames), wanted, fps)


def _open(source: VideoInput):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    if isinstance(source, str):
        return av.open(source)
    source.seek(0)
    return av.open(source)


def _count_packets(container, stream) -> int:
    return sum(1 for packet in container.demux(stream) if packet.size)


def _declared_frames(container, stream, fps: float) -> int:
    if stream.frames:
        return stream.frames
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration:
        return round(container.duration / av.time_base * fps)
    return 0


def _decode_frames(container, wanted: set[int], last: int) -> list[np.ndarray]:
    frames = []
    for i, frame in enumerate(container.decode(container.streams.video[0])):
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
        if i >= last:
            break
    return frames


def _size(source: VideoInput) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    if isinstance(source, str):
        return os.path.getsize(source)
    source.seek(0, io.SEEK_END)
    return source.tell()


def _read_at(source: VideoInput, offset: int, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset : offset + n])
    if isinstance(source, str):
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(n)
    source.seek(offset)
    return source.read(n)


def _iso_bmff_truncated(source: VideoInput) -> bool:
    """True for an MP4/MOV whose top-level boxes run past the end of the data or that lacks `moov`."""
    size = _size(source)
    if _read_at(source, 4, 4) != b"ftyp":
        return False
    pos, boxes = 0, set()
    while pos + 8 <= size:
        box_size, box_type = struct.unpack(">I4s", _read_at(source, pos, 8))
        if box_size == 1:
            box_size = struct.unpack(">Q", _read_at(source, pos + 8, 8))[0]
        elif box_size == 0:
            box_size = size - pos
        if box_size < 8:
            return False
        if pos + box_size > size:
            return True
        boxes.add(box_type)
        pos += box_size
    return b"moov" not in boxes
