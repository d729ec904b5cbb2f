"""The demo job: run an embedded model on synthetic data it was never trained on and show its hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .analysis.inputs import synthetic_dataset
from .models import HookedVisionModel, get_entry, load_model
from .models.spec import WEIGHTS_HELP
from .models.toy_training import render_split, to_input


class DemoConfig(BaseModel):
    """What the demo runs (any registry model; the default is the embedded ViT trained on `shapes`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("prisma-toy-vit-shapes", description="registry name (see `prisma-ray models list`)")
    pretrained: bool = Field(True, description="load published weights (false: random weights, no download)")
    weights: str | None = Field(None, description=WEIGHTS_HELP + " (s3:// reached with the AWS_* environment)")
    batch_size: int = Field(8, ge=1, description="synthetic samples rendered and run")
    seed: int = Field(0, description="seed of the rendered samples")


def synthetic_batch(model: HookedVisionModel, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rendered `shapes` images (or `moving-shapes` clips) in the model's input spec, and labels.

    For an embedded model: a held-out split of its own training distribution and its class labels
    (shape, or motion direction). For any other model: the default synthetic dataset at its size, no labels.
    """
    spec = model.preprocess
    dataset = synthetic_dataset(model, batch_size, seed)
    pixels, labels = render_split(dataset, batch_size)
    x = to_input(pixels, spec)
    if tuple(x.shape[-2:]) != tuple(spec.image_size):
        flat = F.interpolate(x.flatten(0, -4), size=spec.image_size, mode="bilinear", align_corners=False)
        x = flat.unflatten(0, x.shape[:-3])
    return x, (torch.from_numpy(labels) if get_entry(model.name).source == "prisma" else None)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and return a report: hook points, cached shapes, token layout, output shape."""
    model = load_model(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights)
    x, labels = synthetic_batch(model, cfg.batch_size, cfg.seed)
    with torch.inference_mode():
        output, cache = model.run_with_cache(x)
    report = {
        "model": model.name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "token_layout": model.token_layout.model_dump(mode="json"),
        "input_shape": list(x.shape),
        "output_shape": list(output.shape),
        "cache_shapes": {name: list(t.shape) for name, t in cache.items()},
    }
    if labels is not None:
        report["accuracy"] = (output.argmax(-1) == labels).float().mean().item()
    return report


def format_report(report: dict) -> str:
    """Human-readable demo report."""
    lines = [
        f"model {report['model']}: {report['n_layers']} layers, d_model {report['d_model']}",
        f"token layout: {report['token_layout']}",
        f"input {report['input_shape']} -> output {report['output_shape']}",
        f"{len(report['cache_shapes'])} hook points:",
    ]
    lines += [f"  {name:<32} {shape}" for name, shape in report["cache_shapes"].items()]
    if "accuracy" in report:
        lines.append(f"accuracy on {report['input_shape'][0]} held-out synthetic samples: {report['accuracy']:.3f}")
    return "\n".join(lines)
