"""Cost of the cross-model comparison of one pair of dictionaries, by number of latents.

Times, on two random (unrelated) decoders of width 768, `stability.matched_fraction` (Hungarian matching of
unit decoder rows, cubic in the latents) and `cross_model.decoder_alignment` (which skips the matching when no
row can reach cosine 0.7, as for unrelated models), and `cross_model.cofiring` (Pearson correlations over pooled
images, `images x latents^2`) on random sparse activations of `--images` images, at each of `--latents`, one
thread. Prints seconds per pair, the matching's ratio to the smallest size and the skip's speed-up over it.

    .venv/bin/python benchmarks/cross_model_cost.py [--latents 512 1024 2048 4096] [--images 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from prisma_ray.evaluate.cross_model import cofiring, decoder_alignment
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
    print(f"{'latents':>8} {'matching s':>11} {'ratio':>7} {'with skip s':>12} {'speed-up':>9} {'co-firing s':>12}")
    first = None
    for n in args.latents:
        wa, wb = rng.normal(size=(n, args.width)), rng.normal(size=(n, args.width))
        acts = [rng.exponential(size=(args.images, n)) * (rng.random((args.images, n)) < 0.05) for _ in range(2)]
        matching, skip = timed(matched_fraction, wa, wb), timed(decoder_alignment, wa, wb)
        cofire = timed(cofiring, *acts)
        first = first or matching
        print(
            f"{n:>8} {matching:>11.2f} {matching / first:>7.1f} {skip:>12.2f} {matching / skip:>9.1f} {cofire:>12.2f}"
        )


if __name__ == "__main__":
    main()
