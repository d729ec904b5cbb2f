"""Hook overhead on CPU: images/s of the plain model, of `run_with_cache` at a late hook point, at an early
hook point with early stopping, at the per-head points of the last block (q, k, v, z, result: module hooks,
the fused attention path), at its neurons, and at its attention pattern (which makes the attention take its
explicit softmax path), as ratios to the plain model measured in the same run (one process, interleaved)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prisma_ray.models import load_model


def images_per_second(fn, x: torch.Tensor, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        rates.append(x.shape[0] / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="timm-vit-small-patch16-224-augreg-in21k-ft-in1k")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--early-layer", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model, pretrained=False)
    x = torch.randn(args.batch_size, *model.preprocess.input_shape())
    late = f"blocks.{model.n_layers - 1}.hook_resid_post"
    early = f"blocks.{args.early_layer}.hook_resid_post"
    last = f"blocks.{model.n_layers - 1}"
    heads = [
        f"{last}.attn.hook_{s}" for s in ("q", "k", "v", "z", "result") if f"{last}.attn.hook_{s}" in model.hook_names
    ]
    runs = {
        "plain": lambda b: model(b),
        f"cache {late}": lambda b: model.run_with_cache(b, [late]),
        f"cache {early} + stop_early": lambda b: model.run_with_cache(b, [early], stop_early=True),
    }
    if heads:
        runs[f"cache {last}.attn.hook_q/k/v/z/result"] = lambda b: model.run_with_cache(b, heads)
    if f"{last}.mlp.hook_post" in model.hook_names:
        runs[f"cache {last}.mlp.hook_post"] = lambda b: model.run_with_cache(b, [f"{last}.mlp.hook_post"])
    if f"{last}.attn.hook_pattern" in model.hook_names:
        pattern = [f"{last}.attn.hook_pattern"]
        runs[f"cache {last}.attn.hook_pattern (explicit)"] = lambda b: model.run_with_cache(b, pattern)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn(x)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                rates[name] += images_per_second(fn, x, 1)
    plain = statistics.median(rates["plain"])
    print(f"model {args.model} (random weights), batch {args.batch_size}, {torch.get_num_threads()} threads")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<48} {rate:8.1f} images/s   ratio to plain {rate / plain:5.3f}")


if __name__ == "__main__":
    main()
