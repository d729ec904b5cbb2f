"""Synthetic datasets with ground truth: `shapes` (PNG images) and `moving-shapes` (MP4 clips).

Every sample is deterministic from `(seed, index)`. `generate(config, uri)` writes, under `uri`:

- `images/000000.png` or `clips/000000.mp4`: the samples (H.264 yuv420p for clips);
- `masks/000000.png` (`uint8[H, W]`) or `masks/000000.npz` (key `mask`, `uint8[T, H, W]`): 0 is
  background, `i` is object `i`;
- `samples.parquet`: one row per sample (`sample_id`, `path`, `mask_path`, `label`, `background`, `count`);
  `label` (`sample_label`) is the largest object's (largest `radius`) shape index (`shapes`) or motion
  direction (`moving-shapes`), -1 for a sample without objects;
- `objects.parquet`: one row per object (and frame, for clips) with its intended factors: `shape`,
  `colour`, `r`, `g`, `b`, centre `x`, `y` in pixels (column, row), `radius`, `rotation`, `area`, and for
  clips `visible`, `direction`, `direction_deg`, `speed`, `appear_frame`, `colour_change_frame`;
- `patches.parquet`: one row per patch of `patch_grid` (and frame): the dominant `object` (0: background),
  its `coverage` of the patch, `shape` and `colour`;
- `manifest.json`, written last: the config and the counts.

`sample_id` is the sample's path relative to `uri`; `frame` is -1 for images.
"""

from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prisma_ray import storage
from prisma_ray.errors import InvalidRequest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
BACKGROUNDS = ("plain", "stripes", "checker", "noise")
_MAX_PLACEMENT_TRIES = 50
_WRITE_CHUNK = 256  # samples rendered before their files are written (bounds memory)


class _ShapesBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(64, ge=16, le=1024, description="side of each square image or frame, in pixels")
    n_objects: tuple[int, int] = Field((1, 3), description="(min, max) objects per sample, inclusive")
    shapes: tuple[str, ...] = Field(SHAPES, description=f"shapes drawn, a subset of {SHAPES}")
    colours: tuple[str, ...] = Field(
        ("red", "green", "blue", "yellow", "magenta", "cyan"),
        description=f"colours drawn, a subset of {tuple(COLOURS)}",
    )
    size_range: tuple[float, float] = Field(
        (0.1, 0.2), description="(min, max) object radius as a fraction of the image side, within (0, 0.4]"
    )
    rotation: bool = Field(True, description="rotate each object by a random angle")
    backgrounds: tuple[str, ...] = Field(BACKGROUNDS, description=f"backgrounds drawn, a subset of {BACKGROUNDS}")
    patch_grid: tuple[int, int] = Field(
        (8, 8), description="(rows, columns) of the patch grid of the ground-truth patches.parquet"
    )
    seed: int = Field(0, description="every sample is deterministic from (seed, index)")

    @field_validator("shapes", "colours", "backgrounds")
    @classmethod
    def _known(cls, values: tuple[str, ...], info) -> tuple[str, ...]:
        known = {"shapes": SHAPES, "colours": tuple(COLOURS), "backgrounds": BACKGROUNDS}[info.field_name]
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            raise InvalidRequest(f"{info.field_name} must be a non-empty subset of {known}; got {values}")
        return values

    @model_validator(mode="after")
    def _ranges(self):
        lo, hi = self.n_objects
        if not 0 <= lo <= hi <= 255:
            raise InvalidRequest(f"n_objects must satisfy 0 <= min <= max <= 255; got {self.n_objects}")
        if not 0 < self.size_range[0] <= self.size_range[1] <= 0.4:
            raise InvalidRequest(f"size_range (object radius / image side) must lie in (0, 0.4]; got {self.size_range}")
        if not all(1 <= g <= self.image_size for g in self.patch_grid):
            raise InvalidRequest(f"patch_grid must lie in 1..image_size; got {self.patch_grid}")
        return self


class ShapesConfig(_ShapesBase):
    """`shapes`: images of objects with independent shape, colour, size, position, rotation; background; count."""

    name: Literal["shapes"] = Field("shapes", description="the generator: shapes (PNG images)")
    n_images: int = Field(1000, ge=1, description="images generated")


class MovingShapesConfig(_ShapesBase):
    """`moving-shapes`: clips whose objects move in one of `n_directions`, may change colour or appear."""

    name: Literal["moving-shapes"] = Field("moving-shapes", description="the generator: moving-shapes (MP4 clips)")
    n_clips: int = Field(100, ge=1, description="clips generated")
    n_objects: tuple[int, int] = Field((1, 2), description="(min, max) objects per clip, inclusive")
    num_frames: int = Field(16, ge=2, description="frames per clip")
    fps: int = Field(8, ge=1, description="frame rate written to the MP4 files, frames per second")
    n_directions: Literal[4, 8] = Field(8, description="motion directions: 4 (axis-aligned) or 8 (with diagonals)")
    speed_range: tuple[float, float] = Field((1.0, 2.5), description="(min, max) object speed in pixels per frame")
    colour_change_prob: float = Field(0.25, ge=0, le=1, description="probability that an object changes colour once")
    appear_prob: float = Field(0.25, ge=0, le=1, description="probability that an object appears after frame 0")
    crf: int = Field(12, ge=0, le=51, description="H.264 constant rate factor (0: lossless, 51: worst)")

    @field_validator("image_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise InvalidRequest("image_size must be even for yuv420p video")
        return v


SyntheticConfig = ShapesConfig | MovingShapesConfig


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices `[n, 2]` (x, y-up) of a shape with circumradius 1 centred at the origin."""
    if shape == "square":
        angles = np.deg2rad(45 + 90 * np.arange(4))
    elif shape == "triangle":
        angles = np.deg2rad(90 + 120 * np.arange(3))
    elif shape == "hexagon":
        angles = np.deg2rad(60 * np.arange(6))
    elif shape == "star":
        angles = np.deg2rad(90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2, 0.45, 1.0)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif shape == "cross":
        a = 0.35
        return np.array(
            [
                (a, 1),
                (a, a),
                (1, a),
                (1, -a),
                (a, -a),
                (a, -1),
                (-a, -1),
                (-a, -a),
                (-1, -a),
                (-1, a),
                (-a, a),
                (-a, 1),
            ],
            dtype=float,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def object_mask(shape: str, x: float, y: float, radius: float, rotation: float, size: int) -> np.ndarray:
    """`bool[size, size]`: pixels whose centre lies inside the object; `(x, y)` is its centre in pixel
    (column, row) coordinates, so the mask's centroid is the centre up to rasterisation."""
    out = np.zeros((size, size), dtype=bool)
    r0, r1 = max(0, math.floor(y - radius)), min(size, math.ceil(y + radius) + 1)
    c0, c1 = max(0, math.floor(x - radius)), min(size, math.ceil(x + radius) + 1)
    py, px = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    if shape == "circle":
        out[r0:r1, c0:c1] = (px - x) ** 2 + (py - y) ** 2 <= radius**2
        return out
    theta = math.radians(rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = _unit_polygon(shape) @ rot.T * radius
    vx, vy = x + pts[:, 0], y - pts[:, 1]
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(vx)):  # even-odd rule over the polygon's edges
        xa, ya, xb, yb = vx[i - 1], vy[i - 1], vx[i], vy[i]
        if ya == yb:
            continue
        crosses = (ya > py) != (yb > py)
        inside ^= crosses & (px < (xb - xa) * (py - ya) / (yb - ya) + xa)
    out[r0:r1, c0:c1] = inside
    return out


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey (unsaturated) texture `uint8[size, size, 3]`, so saturated object colours stay separable."""
    lo = int(rng.integers(20, 70))
    hi = lo + int(rng.integers(20, 50))
    yy, xx = np.mgrid[:size, :size]
    period = int(rng.integers(3, 9))
    if kind == "plain":
        grey = np.full((size, size), lo)
    elif kind == "stripes":
        coord = (yy, xx, xx + yy)[int(rng.integers(3))]
        grey = np.where((coord // period) % 2 == 1, hi, lo)
    elif kind == "checker":
        grey = np.where(((yy // period) + (xx // period)) % 2 == 1, hi, lo)
    elif kind == "noise":
        grey = rng.integers(lo, hi + 1, size=(size, size))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def patch_factors(mask: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Dominant object per patch of a `grid` laid over `mask` (`uint8[H, W]`).

    Returns `(object int16[gh, gw], coverage float32[gh, gw])`: the object covering most of the
    patch (0 if none) and the fraction of the patch it covers. Patch edges are `round(k * H / gh)`.
    """
    gh, gw = grid
    h, w = mask.shape
    rows = np.round(np.arange(gh) * h / gh).astype(int)
    cols = np.round(np.arange(gw) * w / gw).astype(int)
    n = int(mask.max())
    onehot = (mask[None] == np.arange(1, n + 1)[:, None, None]).astype(np.int32)
    area = np.diff(np.append(rows, h))[:, None] * np.diff(np.append(cols, w))[None, :]
    if n == 0:
        return np.zeros(grid, np.int16), np.zeros(grid, np.float32)
    counts = np.add.reduceat(np.add.reduceat(onehot, rows, axis=1), cols, axis=2)
    best = counts.argmax(axis=0)
    best_count = np.take_along_axis(counts, best[None], axis=0)[0]
    obj = np.where(best_count > 0, best + 1, 0).astype(np.int16)
    return obj, (best_count / area).astype(np.float32)


def unambiguous_cells(coverage: np.ndarray, min_coverage: float = 0.5) -> np.ndarray:
    """`bool[...]`: the cells whose label is unambiguous, background (coverage 0) or covered at least `min_coverage`
    by their dominant object (`patch_factors`'s coverage); edge cells in between, and NaN, are ambiguous."""
    coverage = np.asarray(coverage, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (coverage == 0) | (coverage >= min_coverage)


def _sample_objects(cfg: _ShapesBase, rng: np.random.Generator, n: int) -> list[dict]:
    """Independent factors of `n` objects (position filled in by the caller)."""
    s = cfg.image_size
    objects = []
    for i in range(n):
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        colour = cfg.colours[int(rng.integers(len(cfg.colours)))]
        radius = float(rng.uniform(*cfg.size_range)) * s
        rotation = float(rng.uniform(0, 360)) if cfg.rotation and shape != "circle" else 0.0
        objects.append({"object": i + 1, "shape": shape, "colour": colour, "radius": radius, "rotation": rotation})
    return objects


def render_shapes(cfg: ShapesConfig, index: int) -> tuple[np.ndarray, np.ndarray, list[dict], str]:
    """Sample `index`: `(image uint8[H, W, 3], mask uint8[H, W], objects, background)`.

    Objects do not overlap; an object that finds no free place is left out (the `count` tells).
    """
    rng = np.random.default_rng([cfg.seed, index])
    s = cfg.image_size
    bg_kind = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    image = background(bg_kind, s, rng)
    placed: list[dict] = []
    for obj in _sample_objects(cfg, rng, int(rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1))):
        r = obj["radius"]
        for _ in range(_MAX_PLACEMENT_TRIES):
            x, y = rng.uniform(r, s - 1 - r, size=2)
            if all(math.hypot(x - o["x"], y - o["y"]) > r + o["radius"] + 1 for o in placed):
                placed.append({**obj, "object": len(placed) + 1, "x": float(x), "y": float(y)})
                break
    mask = np.zeros((s, s), np.uint8)
    for o in placed:
        mask[object_mask(o["shape"], o["x"], o["y"], o["radius"], o["rotation"], s)] = o["object"]
    for o in placed:
        image[mask == o["object"]] = COLOURS[o["colour"]]
        o["area"] = int((mask == o["object"]).sum())
    return image, mask, placed, bg_kind


def largest_object(objects: list[dict]) -> dict | None:
    """The object with the largest `radius` (the first of equals) among `objects` (rows of one sample, or of
    one frame of a clip), None if there is none: the object whose factor is the sample's `label`."""
    return max(objects, key=lambda o: o["radius"], default=None)


def sample_label(cfg: SyntheticConfig, objects: list[dict]) -> int:
    """The `label` of a sample with object rows `objects` (a clip's rows of frame 0): the largest object's shape
    index (`shapes`) or motion direction (`moving-shapes`); -1 without objects."""
    largest = largest_object(objects)
    if largest is None:
        return -1
    return cfg.shapes.index(largest["shape"]) if isinstance(cfg, ShapesConfig) else int(largest["direction"])


def direction_vector(direction: int, n_directions: int) -> tuple[float, float]:
    """Unit `(dx, dy)` in pixel coordinates (y down) of direction index `direction`; 0 is +x, counter-clockwise."""
    theta = 2 * math.pi * direction / n_directions
    return math.cos(theta), -math.sin(theta)


def start_range(radius: float, size: int, travel: float) -> tuple[float, float]:
    """`(low, high)` of an object's first centre coordinate (pixels) so that it stays inside a `size`-pixel frame
    while moving `travel` pixels along that axis; `high >= low` even where the speed limit makes the range zero
    wide and floating-point rounding would make it slightly negative."""
    low = radius + max(0.0, -travel)
    return low, max(low, size - 1 - radius - max(0.0, travel))


def render_moving_shapes(cfg: MovingShapesConfig, index: int) -> tuple[np.ndarray, np.ndarray, list[dict], str]:
    """Clip `index`: `(frames uint8[T, H, W, 3], masks uint8[T, H, W], per-frame object rows, background)`.

    Each object moves in a straight line at constant speed and stays inside the frame; it may appear
    after frame 0 (`appear_frame`) and change colour once (`colour_change_frame`, -1 if never).
    """
    rng = np.random.default_rng([cfg.seed, index])
    s, t_n = cfg.image_size, cfg.num_frames
    bg_kind = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    bg = background(bg_kind, s, rng)
    t = np.arange(t_n)
    tracks: list[dict] = []
    for obj in _sample_objects(cfg, rng, int(rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1))):
        r = obj["radius"]
        direction = int(rng.integers(cfg.n_directions))
        dx, dy = direction_vector(direction, cfg.n_directions)
        room = s - 1 - 2 * r
        limits = [room / ((t_n - 1) * abs(c)) for c in (dx, dy) if abs(c) > 1e-9]
        speed = min(float(rng.uniform(*cfg.speed_range)), *limits)
        appear = int(rng.integers(1, t_n // 2 + 1)) if rng.random() < cfg.appear_prob else 0
        changes = rng.random() < cfg.colour_change_prob
        change = int(rng.integers(max(1, t_n // 4), max(2, 3 * t_n // 4))) if changes else -1
        others = [c for c in cfg.colours if c != obj["colour"]]
        new_colour = others[int(rng.integers(len(others)))] if others and change >= 0 else obj["colour"]
        travel_x, travel_y = dx * speed * (t_n - 1), dy * speed * (t_n - 1)
        for _ in range(_MAX_PLACEMENT_TRIES):
            x0 = rng.uniform(*start_range(r, s, travel_x))
            y0 = rng.uniform(*start_range(r, s, travel_y))
            xs, ys = x0 + dx * speed * t, y0 + dy * speed * t
            if all(np.all(np.hypot(xs - o["xs"], ys - o["ys"]) > r + o["radius"] + 1) for o in tracks):
                tracks.append(
                    {
                        **obj,
                        "object": len(tracks) + 1,
                        "xs": xs,
                        "ys": ys,
                        "direction": direction,
                        "speed": speed,
                        "appear_frame": appear,
                        "colour_change_frame": change,
                        "new_colour": new_colour,
                    }
                )
                break
    frames = np.repeat(bg[None], t_n, axis=0)
    masks = np.zeros((t_n, s, s), np.uint8)
    rows: list[dict] = []
    for f in range(t_n):
        for o in tracks:
            if f >= o["appear_frame"]:
                inside = object_mask(o["shape"], o["xs"][f], o["ys"][f], o["radius"], o["rotation"], s)
                masks[f][inside] = o["object"]
        for o in tracks:
            colour = o["new_colour"] if 0 <= o["colour_change_frame"] <= f else o["colour"]
            inside = masks[f] == o["object"]
            frames[f][inside] = COLOURS[colour]
            rows.append(
                {
                    "frame": f,
                    "object": o["object"],
                    "visible": f >= o["appear_frame"],
                    "shape": o["shape"],
                    "colour": colour,
                    "radius": o["radius"],
                    "rotation": o["rotation"],
                    "x": float(o["xs"][f]),
                    "y": float(o["ys"][f]),
                    "area": int(inside.sum()),
                    "direction": o["direction"],
                    "direction_deg": 360.0 * o["direction"] / cfg.n_directions,
                    "speed": o["speed"],
                    "appear_frame": o["appear_frame"],
                    "colour_change_frame": o["colour_change_frame"],
                }
            )
    return frames, masks, rows, bg_kind


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int, crf: int) -> bytes:
    """H.264 (yuv420p) MP4 of `uint8[T, H, W, 3]` frames, encoded deterministically (one thread)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        stream.codec_context.thread_count = 1  # the option alone left PyAV's automatic threads: bytes varied
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index  # explicit timestamps, one per frame at `fps`
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return buf.getvalue()


def _object_row(sample_id: str, frame: int, o: dict) -> dict:
    r, g, b = COLOURS[o["colour"]]
    keep = {k: v for k, v in o.items() if k not in ("xs", "ys", "new_colour")}
    return {"sample_id": sample_id, "frame": frame, **keep, "r": r, "g": g, "b": b}


def _patch_rows(sample_id: str, frame: int, mask: np.ndarray, objects: list[dict], grid: tuple[int, int]) -> dict:
    obj, coverage = patch_factors(mask, grid)
    by_id = {o["object"]: o for o in objects}
    ids = obj.ravel().tolist()
    rows, cols = np.indices(grid)
    return {
        "sample_id": [sample_id] * len(ids),
        "frame": [frame] * len(ids),
        "patch_row": rows.ravel().tolist(),
        "patch_col": cols.ravel().tolist(),
        "object": ids,
        "coverage": coverage.ravel().tolist(),
        "shape": [by_id[i]["shape"] if i else None for i in ids],
        "colour": [by_id[i]["colour"] if i else None for i in ids],
    }


def _extend(columns: dict[str, list], more: dict[str, list]) -> None:
    for k, v in more.items():
        columns.setdefault(k, []).extend(v)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _render_sample(cfg: SyntheticConfig, i: int) -> tuple[list[tuple[str, bytes]], dict, list[dict], dict[str, list]]:
    """Sample `i` as `(files, samples row, objects rows, patches columns)`."""
    if isinstance(cfg, ShapesConfig):
        image, mask, objs, bg = render_shapes(cfg, i)
        sid, mask_path = f"images/{i:06d}.png", f"masks/{i:06d}.png"
        files = [(sid, encode_png(image)), (mask_path, encode_png(mask))]
        sample = {
            "sample_id": sid,
            "path": sid,
            "mask_path": mask_path,
            "label": sample_label(cfg, objs),
            "background": bg,
            "count": len(objs),
        }
        return files, sample, [_object_row(sid, -1, o) for o in objs], _patch_rows(sid, -1, mask, objs, cfg.patch_grid)
    frames, masks, rows, bg = render_moving_shapes(cfg, i)
    sid, mask_path = f"clips/{i:06d}.mp4", f"masks/{i:06d}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, mask=masks)
    files = [(sid, encode_mp4(frames, cfg.fps, cfg.crf)), (mask_path, buf.getvalue())]
    first = [r for r in rows if r["frame"] == 0]
    sample = {
        "sample_id": sid,
        "path": sid,
        "mask_path": mask_path,
        "label": sample_label(cfg, first),
        "background": bg,
        "count": len(first),
        "num_frames": cfg.num_frames,
        "fps": cfg.fps,
    }
    patches: dict[str, list] = {}
    for f in range(cfg.num_frames):
        _extend(patches, _patch_rows(sid, f, masks[f], [r for r in rows if r["frame"] == f], cfg.patch_grid))
    return files, sample, [_object_row(sid, r["frame"], r) for r in rows], patches


def _objects_schema(cfg: SyntheticConfig) -> pa.Schema:
    fields = [
        ("sample_id", pa.string()),
        ("frame", pa.int16()),
        ("object", pa.int16()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("radius", pa.float32()),
        ("rotation", pa.float32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("area", pa.int32()),
        ("r", pa.uint8()),
        ("g", pa.uint8()),
        ("b", pa.uint8()),
    ]
    if isinstance(cfg, MovingShapesConfig):
        fields += [
            ("visible", pa.bool_()),
            ("direction", pa.int8()),
            ("direction_deg", pa.float32()),
            ("speed", pa.float32()),
            ("appear_frame", pa.int16()),
            ("colour_change_frame", pa.int16()),
        ]
    return pa.schema(fields)


def generate(cfg: SyntheticConfig, uri: str, options: storage.StorageOptions | None = None) -> dict:
    """Render and write the whole dataset under `uri` (local path, `file://` or `s3://`); returns the manifest."""

    def write(item: tuple[str, bytes]) -> None:
        storage.write_bytes(storage.join(uri, item[0]), item[1], options)

    samples, objects, patches = [], [], {}
    n = cfg.n_images if isinstance(cfg, ShapesConfig) else cfg.n_clips
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, n, _WRITE_CHUNK):
            files = []
            for i in range(start, min(n, start + _WRITE_CHUNK)):
                sample_files, sample, object_rows, patch_columns = _render_sample(cfg, i)
                files += sample_files
                samples.append(sample)
                objects += object_rows
                _extend(patches, patch_columns)
            list(pool.map(write, files))
        tables = {
            "samples": pa.Table.from_pylist(samples),
            "objects": pa.Table.from_pylist(objects, schema=_objects_schema(cfg)),
            "patches": pa.Table.from_pydict(patches),
        }
        list(pool.map(write, [(f"{name}.parquet", _parquet_bytes(table)) for name, table in tables.items()]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "num_samples": tables["samples"].num_rows,
        "num_objects": tables["objects"].num_rows,
    }
    storage.write_bytes(storage.join(uri, "manifest.json"), json.dumps(manifest, indent=2).encode(), options)
    log.info("generated %s: %d samples under %s", cfg.name, manifest["num_samples"], uri)
    return manifest


def ensure_generated(cfg: SyntheticConfig, uri: str, options: storage.StorageOptions | None = None) -> dict:
    """The manifest of the dataset under `uri`, generating it first if it is not there yet.

    Raises `ValueError` if `uri` already holds a dataset generated from a different config.
    """
    expected = cfg.model_dump(mode="json")
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json"), options))
    except FileNotFoundError:
        return generate(cfg, uri, options)
    if manifest.get("config") != expected or manifest.get("format_version") != FORMAT_VERSION:
        there = manifest.get("config") or {}
        changed = [f"{k} {there.get(k)!r} there, {v!r} now" for k, v in expected.items() if there.get(k) != v]
        if manifest.get("format_version") != FORMAT_VERSION:
            changed.append(f"format version {manifest.get('format_version')} there, {FORMAT_VERSION} now")
        raise InvalidRequest(
            f"{uri} already holds a synthetic dataset generated from another config ({'; '.join(changed)}); "
            "use another uri or delete that one."
        )
    return manifest


def read_table(uri: str, name: str, options: storage.StorageOptions | None = None) -> pa.Table:
    """One of the generated tables: `samples`, `objects` or `patches`."""
    return pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(uri, f"{name}.parquet"), options)))
