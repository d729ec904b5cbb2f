"""Cost of the ground-truth metrics at the size the evaluation runs them: 4,096 scored tokens, a 3,072-latent
TopK dictionary (k = 32 active per token), 12 factor values (6 shapes x 6 colours), and the four baselines on
384-wide activations (ViT-S). Prints seconds per stage and, as the reference measured in the same run, the
per-(latent, value) `sklearn.metrics.roc_auc_score` loop timed on a slice of latents and scaled to all of them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from prisma_ray.evaluate.baselines import BASELINES, baseline_recovery
from prisma_ray.evaluate.ground_truth import factor_recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--reference-latents", type=int, default=48, help="latents timed with the sklearn loop")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n, n_latents = args.tokens, args.latents
    objects = rng.integers(0, 37, size=n)  # 0: background, else one of 36 (shape, colour) pairs
    shape = np.array([None if o == 0 else f"s{(o - 1) // 6}" for o in objects], dtype=object)
    colour = np.array([None if o == 0 else f"c{(o - 1) % 6}" for o in objects], dtype=object)
    latents = np.zeros((n, n_latents), dtype=np.float32)
    active = np.argsort(rng.random((n, n_latents)), axis=1)[:, : args.k]
    np.put_along_axis(latents, active, rng.exponential(size=(n, args.k)).astype(np.float32), axis=1)
    factors = {"shape": shape, "colour": colour}

    start = time.perf_counter()
    result = factor_recovery(latents, factors)
    ours = time.perf_counter() - start
    print(f"factor_recovery: {n} tokens x {n_latents} latents x {len(result['values'])} values: {ours:.2f} s")

    m = args.reference_latents
    start = time.perf_counter()
    for values in factors.values():
        for value in sorted({v for v in values if v is not None}):
            y = values == value
            for j in range(m):
                roc_auc_score(y, latents[:, j])
    reference = (time.perf_counter() - start) * n_latents / m
    print(f"sklearn roc_auc_score per (latent, value), {m} latents timed, scaled to {n_latents}: {reference:.1f} s")
    print(f"ratio: {reference / ours:.0f}x faster than the per-pair loop")

    x = rng.normal(size=(n, args.width)).astype(np.float32)
    fit = rng.normal(size=(n, args.width)).astype(np.float32)
    for name in BASELINES:
        start = time.perf_counter()
        out = baseline_recovery(x, fit, factors, [name])[name]
        print(f"baseline {name:<6}: {out['directions']:>4} directions x 2 signs: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
