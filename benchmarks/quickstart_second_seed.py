"""What the quickstart's second seed of its k 4 SAE costs: training steps of its default dictionaries (k 4, 8, 16
and k 4 from seed 1) against the same dictionaries without the second seed, on the toy models' width (64) and
the quickstart's batch (1,024 tokens), one torch thread, interleaved so that a noisy machine slows both alike;
the median step time of each and their ratio. The step is all a training worker does per batch, so the ratio
bounds the train stage's growth (Ray start-up and reading the store do not grow).

    python benchmarks/quickstart_second_seed.py [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prisma_ray.quickstart import QuickstartConfig
from prisma_ray.sae import Site, Sites, Trainer

WIDTH, BATCH = 64, 1024


def step_time(trainer: Trainer, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    trainer.train_step(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dictionaries = QuickstartConfig().dictionaries
    without = [d for d in dictionaries if d.seed == 0]
    sites = Sites(inputs=(Site(name="blocks.2.hook_resid_post", width=WIDTH),))
    batches = [torch.randn(BATCH, WIDTH) for _ in range(args.steps + 5)]
    trainers = {
        "with the second seed": Trainer(dictionaries, sites, len(batches)),
        "without": Trainer(without, sites, len(batches)),
    }
    for trainer in trainers.values():
        trainer.initialize(batches[0])
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i, batch in enumerate(batches):
        for name, trainer in trainers.items():
            t = step_time(trainer, batch)
            if i >= 5:  # warm-up
                times[name].append(t)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, trainer in trainers.items():
        print(f"{name:<22} {len(trainer.dictionaries)} dictionaries  median step {medians[name]:.2f} ms")
    ratio = medians["with the second seed"] / medians["without"]
    print(f"ratio {ratio:.2f} ({args.steps} steps each, batch {BATCH}, width {WIDTH}, 1 torch thread)")


if __name__ == "__main__":
    main()
