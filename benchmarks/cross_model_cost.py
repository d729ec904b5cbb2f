"""Cost of the cross-model comparison of one pair of dictionaries, by number of latents.

Times, on two random (unrelated) decoders of width 768, `stability.matched_fraction` (Hungarian matching of
unit decoder rows, cubic in the latents) and `cross_model.decoder_alignment` (which skips the matching when no
row can reach cosine 0.7, as for unrelated models), and `cross_model.cofiring` (Pearson correlations over pooled
images, `images x latents^2`) on random sparse activations of `--images` images, at each of `--latents`, one
thread. Prints seconds per pair, the matching's ratio to the smallest size and the skip's speed-up over it.

`--shared-init N`: the cross-model page of a campaign of N models whose dictionaries of one shape (`--latents`,
first value, by `--width`) all start from one initialisation (`sae.Dictionary`, seed 0) and are trained a little
(a few rows nudged, as 4 steps of a TopK SAE that fire few latents), so that every pair passes the decoder bound.
Times `decoder_alignment` (now: one float32 product, no Hungarian where each row's best partner differs) against the
previous path (the float32 bound, then the float64 cosines matched by `scipy.optimize.linear_sum_assignment`) on
`--sample` pairs each, checks that both give the same figures, and prints seconds per pair, the ratio, and both
totals over the N (N - 1) / 2 pairs.

    .venv/bin/python benchmarks/cross_model_cost.py [--latents 512 1024 2048 4096] [--images 256]
    .venv/bin/python benchmarks/cross_model_cost.py --shared-init 144 --latents 1536 --width 768 [--sample 24]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from prisma_ray.evaluate.cross_model import cofiring, decoder_alignment
from prisma_ray.evaluate.stability import STABILITY_THRESHOLD, matched_fraction, unit_rows
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def hungarian_alignment(a: np.ndarray, b: np.ndarray, threshold: float = STABILITY_THRESHOLD) -> dict:
    """The previous `decoder_alignment`: a float32 bound, then the Hungarian matching of the float64 cosines."""
    bound = float(((unit_rows(a).astype(np.float32) @ unit_rows(b).astype(np.float32).T).max(axis=1) >= 0.7).mean())
    if bound == 0:
        return {"decoder_matched": 0.0, "decoder_cosine": None, "decoder_bound": 0.0}
    cosine = unit_rows(a) @ unit_rows(b).T
    matched = cosine[linear_sum_assignment(cosine, maximize=True)]
    return {"decoder_matched": float((matched >= threshold).mean()), "decoder_cosine": float(matched.mean())}


def shared_init_decoders(n: int, latents: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """`n` decoders `[latents, width]` from one initialisation (`Dictionary`, seed 0), each a little trained: 3% of
    its rows (the latents that fired) moved by about 10%, as 4 Adam steps at lr 1e-3 do."""
    cfg = DictionaryConfig(architecture="topk", k=4, d_sae=latents, seed=0)
    init = Dictionary(cfg, Sites(inputs=(Site(name="blocks.0.hook_resid_post", width=width),))).W_dec.detach().numpy()
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        w = init.astype(np.float64)
        fired = rng.random(latents) < 0.03
        w[fired] += 0.1 * rng.normal(size=(int(fired.sum()), width)) / np.sqrt(width)
        out.append(w)
    return out


def shared_init_campaign(n: int, latents: int, width: int, sample: int) -> None:
    decoders = shared_init_decoders(n, latents, width)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    picked = [pairs[k] for k in np.random.default_rng(1).choice(len(pairs), min(sample, len(pairs)), replace=False)]
    new = old = 0.0
    for i, j in picked:
        start = time.perf_counter()
        now = decoder_alignment(decoders[i], decoders[j])
        middle = time.perf_counter()
        before = hungarian_alignment(decoders[i], decoders[j])
        old, new = old + time.perf_counter() - middle, new + middle - start
        assert now["decoder_matched"] == before["decoder_matched"], (now, before)
        assert abs(now["decoder_cosine"] - before["decoder_cosine"]) < 1e-12, (now, before)
    per_new, per_old = new / len(picked), old / len(picked)
    print(f"{n} models, {len(pairs)} pairs of [{latents}, {width}] decoders from one initialisation")
    print(f"{'path':>30} {'s per pair':>11} {'total s':>9}")
    print(f"{'Hungarian (previous)':>30} {per_old:>11.3f} {per_old * len(pairs):>9.0f}")
    print(f"{'row maxima, no Hungarian (now)':>30} {per_new:>11.3f} {per_new * len(pairs):>9.0f}")
    print(f"speed-up {per_old / per_new:.1f}x over {len(picked)} sampled pairs, same matched fractions and cosines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--shared-init", type=int, default=0, metavar="N", help="time a campaign of N models")
    parser.add_argument("--sample", type=int, default=24, help="pairs timed in the --shared-init campaign")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.shared_init:
        shared_init_campaign(args.shared_init, args.latents[0], args.width, args.sample)
        return
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
