"""Build and train the embedded toy models (specs in `toy`); save and load their safetensors weights.

Both networks start with a small convolutional stem in place of the usual single linear patch
projection ("early convolutions"), which makes them learn within a CPU budget; each token still
covers one patch of the grid (`TokenLayout`), so patch heatmaps and per-patch factors line up with
tokens. Training renders samples in memory; held-out accuracy is measured by the tests on encoded
PNG/MP4 files through the data layer, the path every job uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from ..data.synthetic import (
    MovingShapesConfig,
    ShapesConfig,
    patch_factors,
    render_moving_shapes,
    render_shapes,
    sample_label,
    unambiguous_cells,
)
from .inputs import normalize
from .spec import PreprocessSpec
from .toy import ToyHead, ToyPatchHead, ToySpec, ToyTraining

IGNORE = -100  # dense targets of edge cells (coverage below `min_coverage`): left out of loss and accuracy


def _image_stem(spec: ToySpec) -> nn.Module:
    """Stride-2 3x3 convolutions, doubling the channels, down to stride `patch_size` (a power of two)."""
    layers: list[nn.Module] = []
    c_in, c_out = 3, spec.stem_channels
    for _ in range(int(math.log2(spec.patch_size))):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        c_in, c_out = c_out, 2 * c_out
    return nn.Sequential(*layers)


def _video_stem(spec: ToySpec) -> nn.Module:
    """A space-time 3D convolution over neighbouring frames (it sees motion), then the tubelet projection."""
    c, p, t, k = spec.stem_channels, spec.patch_size, spec.tubelet, spec.stem_time_kernel
    return nn.Sequential(
        nn.Conv3d(3, c, (k, 3, 3), padding=(k // 2, 1, 1)),
        nn.GELU(),
        nn.Conv3d(c, spec.width, (t, p, p), stride=(t, p, p)),
    )


def build_network(spec: ToySpec) -> nn.Module:
    """The untrained network of `spec`: a timm `VisionTransformer` or a `transformers` VideoMAE classifier whose
    output is the primary task's `num_classes` logits, plus the auxiliary heads' linear layer `aux_head`
    (`spec.aux_outputs` outputs on the same pooled features) and the dense heads' per-token linear layer
    `patch_head` (`spec.patch_outputs` outputs on each patch token of block `spec.patch_layer`); both are read by
    `outputs`, never by the model's forward."""
    model = _backbone(spec)
    if spec.aux_heads:
        model.aux_head = nn.Linear(spec.width, spec.aux_outputs)
    if spec.patch_heads:
        model.patch_head = nn.Linear(spec.width, spec.patch_outputs)
    return model


def _backbone(spec: ToySpec) -> nn.Module:
    if spec.modality == "image":
        from timm.layers import HybridEmbed
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=spec.dataset.image_size,
            patch_size=1,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=spec.heads,
            mlp_ratio=spec.mlp_ratio,
            num_classes=spec.num_classes,
            global_pool="avg",
            embed_layer=partial(HybridEmbed, backbone=_image_stem(spec)),
        )
        pre = spec.preprocess
        model.pretrained_cfg = dict(mean=pre.mean, std=pre.std, interpolation=pre.interpolation, crop_pct=pre.crop_pct)
        return model
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig(
        image_size=spec.dataset.image_size,
        patch_size=spec.patch_size,
        num_frames=spec.frames,
        tubelet_size=spec.tubelet,
        hidden_size=spec.width,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.heads,
        intermediate_size=int(spec.mlp_ratio * spec.width),
        num_labels=spec.num_classes,
        use_mean_pooling=True,
    )
    model = VideoMAEForVideoClassification(config)
    model.videomae.embeddings.patch_embeddings.projection = _video_stem(spec)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits of a network built by `build_network` for preprocessed input `x`."""
    out = model(x) if x.dim() == 4 else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def outputs(
    model: nn.Module, x: torch.Tensor, patch_layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(primary logits [B, num_classes], auxiliary logits [B, aux_outputs] or None, dense logits
    [B, n_patches, patch_outputs] or None)` of preprocessed input `x`, all from one pass: the pooled (and normed)
    features go through `head`/`classifier` and `aux_head`; the patch tokens (prefix tokens dropped) of block
    `patch_layer`'s output (the residual stream at `blocks.{patch_layer}.hook_resid_post`) through `patch_head`."""
    dense = getattr(model, "patch_head", None)
    if x.dim() == 4:  # timm VisionTransformer: `forward_features` with block `patch_layer`'s output kept
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        mid = None
        for i, block in enumerate(model.blocks):
            tokens = block(tokens)
            if i == patch_layer % len(model.blocks):
                mid = tokens[:, model.num_prefix_tokens :]
        pooled = model.forward_head(model.norm(tokens), pre_logits=True)
        primary = model.head(pooled)
    else:  # VideoMAEForVideoClassification with mean pooling; no prefix tokens, block i's output is hidden state i+1
        out = model.videomae(pixel_values=x, output_hidden_states=dense is not None)
        if dense is not None:
            mid = out.hidden_states[patch_layer % len(model.videomae.encoder.layer) + 1]
        pooled = model.fc_norm(out.last_hidden_state.mean(1))
        primary = model.classifier(pooled)
    aux = getattr(model, "aux_head", None)
    return primary, (aux(pooled) if aux is not None else None), (dense(mid) if dense is not None else None)


def head_targets(head: ToyHead, cfg: ShapesConfig | MovingShapesConfig, objects: list[dict]) -> np.ndarray:
    """Target of `head` for one sample with object rows `objects` (a clip: every frame's rows): a class index
    (`int64[]`) or a multi-hot set (`float32[len(head.values)]`). Clips count only visible rows."""
    seen = [o for o in objects if o.get("visible", True)]
    if head.name == "count":
        return np.int64(head.values.index(str(len({o["object"] for o in objects}))))
    key = {"shapes": "shape", "colours": "colour"}[head.name]
    present = {str(o[key]) for o in seen}
    return np.array([v in present for v in head.values], dtype=np.float32)


def dense_classes(
    head: ToyPatchHead, obj: np.ndarray, coverage: np.ndarray, values: list, min_coverage: float
) -> np.ndarray:
    """Dense targets `int64[N]` of `N` patch cells with dominant object `obj` (0: none), its `coverage` and its
    factor value `values` (None where `obj` is 0), as `synthetic.patch_factors` / `patches.parquet` give them: the
    value's class, `"background"` (the last class) for a cell with no object pixel, `IGNORE` where the dominant
    object covers less than `min_coverage` (the ground-truth labels' ambiguous edge cells)."""
    index = {v: i for i, v in enumerate(head.values)}
    t = np.array([index[str(v)] if o else len(head.values) - 1 for o, v in zip(obj, values)], dtype=np.int64)
    t[~unambiguous_cells(coverage, min_coverage)] = IGNORE
    return t


def token_cells(
    mask: np.ndarray, objects: list[dict], grid: tuple[int, int], tubelet: int = 1
) -> list[tuple[np.ndarray, np.ndarray, dict[int, dict]]]:
    """The patch cells of every token time step of an image (`mask` `uint8[H, W]`) or a clip (`uint8[T, H, W]`,
    one time step per `tubelet` frames, labelled by its first frame, as the toy ground truth does), in the token
    order of a `"thw"` layout: per step `(object int16[cells], coverage float32[cells], rows)`, the dominant object
    and its coverage of each of the `grid` cells (`synthetic.patch_factors`, row-major) and that frame's object
    rows of `objects` by object id (rows without `frame`, or frame -1: an image's)."""
    frames = mask[None] if mask.ndim == 2 else mask
    steps = []
    for frame in range(0, len(frames), tubelet):
        obj, coverage = (a.reshape(-1) for a in patch_factors(frames[frame], grid))
        steps.append((obj, coverage, {o["object"]: o for o in objects if max(0, o.get("frame", 0)) == frame}))
    return steps


def patch_targets(
    heads: tuple[ToyPatchHead, ...],
    objects: list[dict],
    mask: np.ndarray,
    grid: int,
    min_coverage: float,
    tubelet: int = 1,
) -> dict[str, np.ndarray]:
    """Dense targets of one image (mask `uint8[H, W]`) or clip (masks `uint8[T, H, W]`, object rows per frame) with
    object rows `objects`: per head, key `patch_<name>`, `dense_classes` of every patch token's `grid x grid` cell
    (`token_cells`, patch-token order; a clip's token takes the values of its tubelet's first frame)."""
    out: dict[str, list[np.ndarray]] = {f"patch_{h.name}": [] for h in heads}
    for obj, coverage, rows in token_cells(mask, objects, (grid, grid), tubelet):
        for h in heads:
            values = [rows[o][h.name] if o else None for o in obj]
            out[f"patch_{h.name}"].append(dense_classes(h, obj, coverage, values, min_coverage))
    return {k: np.concatenate(v) for k, v in out.items()}


def render_split(cfg: ShapesConfig | MovingShapesConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples rendered in memory: `uint8` images `[n, H, W, 3]` or clips `[n, T, H, W, 3]`, and their
    dataset `label`s (`int64[n]`)."""
    pixels, targets = render_targets(cfg, n)
    return pixels, targets["label"]


def render_targets(
    cfg: ShapesConfig | MovingShapesConfig, n: int, heads: tuple[ToyHead, ...] = (), dense: ToySpec | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`n` samples rendered in memory (as `render_split`) and targets: `"label"` (the dataset's `label`,
    `int64[n]`), one array per head of `heads` (`head_targets`, stacked) and, for the spec `dense`, one
    `int64[n, n_patches]` per dense head (`patch_targets`, keys `patch_<name>`)."""
    xs, targets = [], {"label": [], **{h.name: [] for h in heads}}
    image = isinstance(cfg, ShapesConfig)
    for i in range(n):
        pixels, mask, objects, _ = render_shapes(cfg, i) if image else render_moving_shapes(cfg, i)
        first = objects if image else [o for o in objects if o["frame"] == 0]
        if dense is not None and dense.patch_heads:
            grid, cover = cfg.image_size // dense.patch_size, dense.min_coverage
            tubelet = 1 if image else dense.tubelet
            for k, v in patch_targets(dense.patch_heads, objects, mask, grid, cover, tubelet).items():
                targets.setdefault(k, []).append(v)
        xs.append(pixels)
        targets["label"].append(np.int64(sample_label(cfg, first)))
        for h in heads:
            targets[h.name].append(head_targets(h, cfg, objects))
    return np.stack(xs), {k: np.stack(v) for k, v in targets.items()}


def split_aux(spec: ToySpec, aux: torch.Tensor) -> dict[str, torch.Tensor]:
    """The auxiliary logits `[B, aux_outputs]` cut into one `[B, len(values)]` block per head of `spec`."""
    blocks = torch.split(aux, [len(h.values) for h in spec.aux_heads], dim=-1)
    return {h.name: b for h, b in zip(spec.aux_heads, blocks)}


def split_dense(spec: ToySpec, dense: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The dense logits `[B, n_patches, patch_outputs]` cut into one `[B, n_patches, len(values)]` block per dense
    head of `spec` (none when the spec has none)."""
    if not spec.patch_heads:
        return ()
    return torch.split(dense, [len(h.values) for h in spec.patch_heads], dim=-1)


def multitask_loss(
    spec: ToySpec, model: nn.Module, x: torch.Tensor, targets: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the primary logits against `label` plus, per auxiliary head, cross-entropy (classes) or
    the binary cross-entropy over its values (sets), per sample: summed (`reduction="sum"`, each value a task of
    its own) or averaged; plus, per dense head, the cross-entropy averaged over patch tokens (`IGNORE` left out) times its `weight`."""
    primary, aux, dense = outputs(model, x, spec.patch_layer)
    loss = nn.functional.cross_entropy(primary, targets["label"])
    for head, out in zip(spec.patch_heads, split_dense(spec, dense)):
        y = targets[f"patch_{head.name}"]
        ce = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss = loss + head.weight * ce
    for head in spec.aux_heads:
        out = split_aux(spec, aux)[head.name]
        y = targets[head.name]
        if head.kind == "class":
            loss = loss + nn.functional.cross_entropy(out, y)
        else:
            bce = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").sum(-1)
            loss = loss + (bce.mean() if reduction == "sum" else bce.mean() / len(head.values))
    return loss


def predictions(spec: ToySpec, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted targets of preprocessed `x`: `label`, each auxiliary head (class index, or the set as
    `bool[B, values]`: logit > 0) and each dense head (`patch_<name>`: class index per patch token)."""
    primary, aux, dense = outputs(model, x, spec.patch_layer)
    out = {"label": primary.argmax(-1)}
    for head, block in zip(spec.patch_heads, split_dense(spec, dense)):
        out[f"patch_{head.name}"] = block.argmax(-1)
    for head in spec.aux_heads:
        block = split_aux(spec, aux)[head.name]
        out[head.name] = block.argmax(-1) if head.kind == "class" else block > 0
    return out


@torch.no_grad()
def head_accuracies(
    spec: ToySpec, model: nn.Module, x: torch.Tensor, targets: dict[str, np.ndarray], batch_size: int = 256
) -> dict[str, float]:
    """Held-out accuracy per output (`label` and each auxiliary head; a set counts only when every value is
    right; a dense head per patch token, `IGNORE` tokens left out) of `model` on preprocessed `x` with `targets`
    as `render_targets` gives them."""
    was_training = model.training
    model.eval()
    correct, total = dict.fromkeys(targets, 0), dict.fromkeys(targets, 0)
    for i in range(0, len(x), batch_size):
        for k, p in predictions(spec, model, x[i : i + batch_size]).items():
            y = torch.as_tensor(targets[k][i : i + batch_size], device=p.device)
            if k.startswith("patch_"):
                keep = y != IGNORE
                correct[k] += int((p == y)[keep].sum())
                total[k] += int(keep.sum())
                continue
            hit = (p == y.bool()).all(-1) if p.dtype == torch.bool else p == y
            correct[k] += int(hit.sum())
            total[k] += len(y)
    model.train(was_training)
    return {k: correct[k] / max(1, total[k]) for k in targets}


def to_input(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """`uint8[..., H, W, 3]` at the model's size -> normalised float `[..., 3, H, W]` on the CPU, by the
    normalisation every stage applies (`prisma_ray.models.inputs.normalize`)."""
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (spec.mean, spec.std))  # host: CPU training
    return normalize(torch.from_numpy(pixels), mean, std)


def lr_factor(step: int, training: ToyTraining) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `training.steps`."""
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ToyRun(BaseModel):
    """What a training run measured."""

    name: str
    steps: int
    final_loss: float
    train_accuracy: dict[str, float]  # per output: "label" and each auxiliary head
    seconds: float


def train_toy(
    spec: ToySpec, training: ToyTraining | None = None, log: Callable[[str], None] | None = None
) -> tuple[nn.Module, ToyRun]:
    """Train the network of `spec` from scratch on its rendered training set; return it in eval mode."""
    training = training or spec.training
    start = time.perf_counter()
    torch.manual_seed(training.seed)
    pixels, targets = render_targets(spec.dataset, training.n_train, spec.aux_heads, spec)
    x, y = to_input(pixels, spec.preprocess), {k: torch.from_numpy(v) for k, v in targets.items()}
    model = build_network(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, training))
    order = torch.Generator().manual_seed(training.seed)
    loss = torch.tensor(float("nan"))  # host: the toy models train on the CPU
    for step in range(training.steps):
        idx = torch.randint(0, len(x), (training.batch_size,), generator=order)  # host: CPU training
        loss = multitask_loss(spec, model, x[idx], {k: v[idx] for k, v in y.items()}, training.set_reduction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 50 == 0:
            log(
                f"{spec.name} step {step + 1}/{training.steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s"
            )
    probe = min(len(x), 2000)
    run = ToyRun(
        name=spec.name,
        steps=training.steps,
        final_loss=float(loss.detach()),
        train_accuracy=head_accuracies(spec, model, x[:probe], {k: v[:probe].numpy() for k, v in y.items()}),
        seconds=time.perf_counter() - start,
    )
    return model.eval(), run


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the state dict as safetensors (contiguous copies; no pickling)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into `model` strictly (every key present, no extra keys)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"No weights at {path}: the embedded models ship with the package; "
            "regenerate them with `python jobs/train_toy_models.py`."
        )
    model.load_state_dict(load_file(str(path)), strict=True, assign=True)
    return model
