"""Cost of the cross-model comparison of one pair of dictionaries, by number of latents.

Times `stability.matched_fraction` (decoder alignment: Hungarian matching of unit decoder rows, cubic in the
latents) on two random decoders of width 768, and `cross_model.cofiring` (co-firing: Pearson correlations over
pooled images, `images x latents^2`) on random sparse activations of `--images` images, each at
`--latents` sizes, one thread. Prints seconds per pair and the ratio to the smallest size.

    .venv/bin/python benchmarks/cross_model_cost.py [--latents 512 1024 2048 4096] [--images 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from prisma_ray.evaluate.cross_model import cofiring
from prisma_ray.evaluate.stability import matched_fraction


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{'latents':>8} {'decoder s':>10} {'ratio':>7} {'co-firing s':>12} {'ratio':>7}")
    first = None
    for n in args.latents:
        wa, wb = rng.normal(size=(n, args.width)), rng.normal(size=(n, args.width))
        acts = [rng.exponential(size=(args.images, n)) * (rng.random((args.images, n)) < 0.05) for _ in range(2)]
        decoder, cofire = timed(matched_fraction, wa, wb), timed(cofiring, *acts)
        first = first or (decoder, cofire)
        print(f"{n:>8} {decoder:>10.2f} {decoder / first[0]:>7.1f} {cofire:>12.2f} {cofire / first[1]:>7.1f}")


if __name__ == "__main__":
    main()
