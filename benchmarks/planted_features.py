"""Planted features: does every dictionary architecture recover a known dictionary?

Activations are planted from known unit directions in superposition (`prisma_ray.sae.synthetic.planted_features`:
more features than dimensions, power-law frequencies, correlated and hierarchical pairs, random magnitudes,
an offset). One dictionary per architecture is trained with `prisma_ray.sae.Trainer` on them, and the table
gives, per architecture: the mean over true directions of the best cosine with a decoder row (exported, raw
units), the fraction of true directions recovered (best cosine >= 0.9), and on held-out rows the L0 and the
explained variance of the inference encoder, and the training time. Targets (issue 18): mean max cosine >= 0.9
and >= 90% recovered for every architecture.

    python benchmarks/planted_features.py [--quick] [--threads 1]

The per-architecture settings (`SETTINGS`) were tuned on this data; `--quick` trains fewer steps on a smaller
pool (what `tests/unit/test_planted_features.py` runs).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from prisma_ray.evaluate.metrics import Reconstruction, Sparsity
from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.synthetic import PlantedData, max_cosines, mean_max_cosine, planted_features, recovered_fraction
from prisma_ray.sae.trainer import Normalization, SiteStats


@dataclass(frozen=True)
class Size:
    """How much data and training: a pool of `rows` planted rows (the last `held_out` for evaluation),
    `steps` steps of `batch` rows each."""

    rows: int
    held_out: int
    steps: int
    batch: int


D, N_FEATURES, MEAN_ACTIVE, ZIPF_EXPONENT = 64, 256, 5.0, 1.0
N_CORRELATED, N_HIERARCHICAL = 8, 8
WIDTH = 2 * N_FEATURES
FULL = Size(rows=131_072, held_out=8_192, steps=1_000, batch=1_024)
QUICK = Size(rows=65_536, held_out=4_096, steps=600, batch=1_024)
THRESHOLD = 0.9
MAX_L0_RATIO = 4.0
"""The test requires L0 <= MAX_L0_RATIO x the true L0: recovered by a sparse code, not a dense one."""

# Tuned on this data (d 64, 256 features, true L0 about 5.2) at the QUICK size, several settings per architecture
# trained side by side: 512 latents (2 per feature), lr 2e-3 (stable for all), k = 5 (the true L0), AuxK reviving
# latents unfired for 50k tokens, a 100-step warm-up of the L1/L0 coefficients. What the tuning showed:
# - relu: with the default free decoder norm (Anthropic 2024) L1 0.3-2 recovered only 50-92% at L0 34-116, and a
#   lower lr (5e-4) was worse; with unit-norm decoders L1 1 gives L0 31, L1 3 L0 12 (99% recovered), L1 10 L0 1.8
#   with everything recovered but explained variance below 0 (L1 shrinks every activation): L1 2, unit decoder.
# - jumprelu: the default threshold init (0.01) and bandwidth (0.05) left L0 at 10 whatever the L0 coefficient
#   (1 or 3): few pre-activations fall in so narrow a window of so low a threshold, so it barely moves. Threshold
#   init 0.5, bandwidth 0.2 and coefficient 3 give L0 6.6 with every feature recovered.
# - gated: L1 3 gives L0 16, L1 5 L0 10.5, L1 10 L0 5.7 with explained variance 0.59: L1 5.
# - topk, batchtopk, matryoshka_batchtopk: k 5 recovers 96-98% with the defaults; the Matryoshka prefixes are
#   64 / 256 / 512 latents (a quarter of the true features, all of them, the whole dictionary). What they miss
#   is mostly the children of hierarchical pairs, partly absorbed into their parents' latents (best cosine
#   0.77-0.9; Chanin et al. 2024). Matryoshka prefixes did not reduce that here: trained side by side for 1,000
#   steps, batchtopk recovered 98.0%, matryoshka 64/256/512 97.7%, a finer ladder 16/32/.../512 96.9%.
_COMMON = {"d_sae": WIDTH, "lr": 2e-3, "dead_after_tokens": 50_000, "seed": 0}
_WARMUP = {"sparsity_warmup_steps": 100}
SETTINGS: dict[str, DictionaryConfig] = {
    "relu": DictionaryConfig(architecture="relu", l1_coefficient=2.0, decoder_norm="unit", **_WARMUP, **_COMMON),
    "topk": DictionaryConfig(architecture="topk", k=5, **_COMMON),
    "batchtopk": DictionaryConfig(architecture="batchtopk", k=5, **_COMMON),
    "jumprelu": DictionaryConfig(
        architecture="jumprelu",
        l0_coefficient=3.0,
        jumprelu_init_threshold=0.5,
        jumprelu_bandwidth=0.2,
        **_WARMUP,
        **_COMMON,
    ),
    "gated": DictionaryConfig(architecture="gated", l1_coefficient=5.0, **_WARMUP, **_COMMON),
    "matryoshka_batchtopk": DictionaryConfig(
        architecture="matryoshka_batchtopk", k=5, matryoshka_widths=(64, 256, WIDTH), **_COMMON
    ),
}


@dataclass(frozen=True)
class Result:
    architecture: str
    mean_max_cosine: float
    recovered: float
    l0: float
    explained_variance: float
    seconds: float
    cpu_seconds: float
    missed: str


def make_data(size: Size, seed: int = 0) -> PlantedData:
    """The benchmark's planted data (`size.rows` rows)."""
    return planted_features(
        size.rows,
        D,
        N_FEATURES,
        MEAN_ACTIVE,
        zipf_exponent=ZIPF_EXPONENT,
        n_correlated=N_CORRELATED,
        n_hierarchical=N_HIERARCHICAL,
        seed=seed,
    )


def train_and_score(cfg: DictionaryConfig, data: PlantedData, size: Size, seed: int = 0) -> Result:
    """Train `cfg` on the first `rows - held_out` rows of `data` (random batches drawn from `seed`) and score it."""
    train, held_out = data.acts[: -size.held_out], data.acts[-size.held_out :]
    sites = Sites(inputs=(Site(name="planted", width=D),))
    norm = Normalization.from_stats([SiteStats.of(train)], None, "center_scale")
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = Trainer([cfg], sites, size.steps, norm)
    gen = torch.Generator().manual_seed(seed)
    trainer.initialize(train[: size.batch])
    for _ in range(size.steps):
        trainer.train_step(train[torch.randint(0, len(train), (size.batch,), generator=gen)])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    d = trainer.first
    with torch.no_grad():
        decoder = d.W_dec / d.out_scale  # the exported decoder rows: raw activation units
        z = d.encode(held_out)
        reconstruction, sparsity = Reconstruction(), Sparsity(d.n_latents)
        reconstruction.update(held_out, d(held_out))
        sparsity.update(z)
    return Result(
        architecture=cfg.architecture,
        mean_max_cosine=mean_max_cosine(decoder, data.features),
        recovered=recovered_fraction(decoder, data.features, THRESHOLD),
        l0=float(sparsity.summary()["l0"]),
        explained_variance=reconstruction.explained_variance,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        missed=missed_summary(max_cosines(decoder, data.features), data),
    )


def missed_summary(best: torch.Tensor, data: PlantedData) -> str:
    """Which true features were not recovered (best cosine < THRESHOLD): how many are hierarchical children,
    parents, in a correlated pair, among the rarest quarter, and their median firing frequency."""
    missed = (best < THRESHOLD).nonzero().flatten()
    if len(missed) == 0:
        return "none"
    rare = data.frequencies <= data.frequencies.quantile(0.25)
    kinds = {
        "child": set(data.hierarchical[:, 1].tolist()),
        "parent": set(data.hierarchical[:, 0].tolist()),
        "correlated": set(data.correlated.flatten().tolist()),
        "rarest quarter": set(rare.nonzero().flatten().tolist()),
    }
    counts = ", ".join(f"{sum(int(i) in members for i in missed)} {kind}" for kind, members in kinds.items())
    return f"{len(missed)} ({counts}; median frequency {float(data.frequencies[missed].median()):.4f})"


HEADER = (
    "| architecture | mean max cosine | recovered (cos >= 0.9) | L0 | explained var. | seconds (CPU) | not recovered |\n"
    "|---|---|---|---|---|---|---|"
)


def row(r: Result) -> str:
    return (
        f"| {r.architecture} | {r.mean_max_cosine:.3f} | {r.recovered:.1%} | {r.l0:.2f} | "
        f"{r.explained_variance:.3f} | {r.seconds:.0f} ({r.cpu_seconds:.0f}) | {r.missed} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps on a smaller pool (the unit test's size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="train only these architectures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    data = make_data(size)
    print(
        f"planted: d {D}, {N_FEATURES} features (Zipf exponent {ZIPF_EXPONENT}, frequencies "
        f"{float(data.frequencies.min()):.4f}..{float(data.frequencies.max()):.3f}), true L0 {data.l0:.2f}, "
        f"{N_CORRELATED} correlated + {N_HIERARCHICAL} hierarchical pairs; {WIDTH} latents; "
        f"{size.steps} steps x {size.batch} rows; {args.threads} torch thread(s)"
    )
    print(HEADER, flush=True)
    wall = cpu = 0.0
    for name, cfg in SETTINGS.items():
        if not args.only or name in args.only:
            result = train_and_score(cfg, data, size)
            wall, cpu = wall + result.seconds, cpu + result.cpu_seconds
            print(row(result), flush=True)
    print(f"training: {wall:.0f} s wall, {cpu:.0f} s CPU (this process)")


if __name__ == "__main__":
    main()
