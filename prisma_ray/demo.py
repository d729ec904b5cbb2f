"""The demo job: load a registry model, run generated images through it, show its hook points."""
from __future__ import annotations

import torch
from pydantic import BaseModel

from .models import HookedVisionModel, load_model


class DemoConfig(BaseModel):
    """What the demo runs."""

    model: str = "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"
    pretrained: bool = False
    batch_size: int = 4
    seed: int = 0


def generated_batch(model: HookedVisionModel, batch_size: int, seed: int) -> torch.Tensor:
    """Smooth coloured gradients with a bright square: normalised like the model's preprocess."""
    spec = model.preprocess
    gen = torch.Generator().manual_seed(seed)
    h, w = spec.image_size
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    images = []
    for _ in range(batch_size):
        weights = torch.rand(3, 3, generator=gen)
        img = weights[:, 0, None, None] * ys + weights[:, 1, None, None] * xs + weights[:, 2, None, None] * 0.2
        top, left = (torch.randint(0, max(h // 2, 1), (2,), generator=gen)).tolist()
        img[:, top : top + h // 4, left : left + w // 4] = 1.0
        images.append(img.clamp(0, 1))
    batch = torch.stack(images)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    batch = (batch - mean) / std
    if spec.modality == "video":
        batch = batch.unsqueeze(1).expand(-1, spec.num_frames or 1, -1, -1, -1).contiguous()
    return batch


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and return a report: hook points, cached shapes, token layout, output shape."""
    model = load_model(cfg.model, pretrained=cfg.pretrained)
    x = generated_batch(model, cfg.batch_size, cfg.seed)
    with torch.inference_mode():
        output, cache = model.run_with_cache(x)
    return {
        "model": model.name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "token_layout": model.token_layout.model_dump(mode="json"),
        "input_shape": list(x.shape),
        "output_shape": list(output.shape),
        "cache_shapes": {name: list(t.shape) for name, t in cache.items()},
    }


def format_report(report: dict) -> str:
    """Human-readable demo report."""
    lines = [
        f"model {report['model']}: {report['n_layers']} layers, d_model {report['d_model']}",
        f"token layout: {report['token_layout']}",
        f"input {report['input_shape']} -> output {report['output_shape']}",
        f"{len(report['cache_shapes'])} hook points:",
    ]
    lines += [f"  {name:<32} {shape}" for name, shape in report["cache_shapes"].items()]
    return "\n".join(lines)
