"""Actor reuse in a campaign: wall time per model for N tiny models run by one long-lived `ModelRunner` actor
(`prisma_ray.campaign`: each model's stages one after another in the same process) against a fresh actor per
model (the start-up of a process, its imports and Ray's actor creation paid once per model), in the same
process, on the same Ray, each into its own fresh output. The work per model is the registry check's
(`registry_check.registry_config`: random weights, tiny data, half depth, a few steps, splicing, a dashboard).
The data are generated, and Ray started, before any timing; the two runs alternate order with `--repeats`.

    .venv/bin/python benchmarks/campaign_reuse.py [--models 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import ray

from prisma_ray.campaign.registry_check import registry_config
from prisma_ray.campaign.run import prepare_data
from prisma_ray.campaign.stages import ModelRunner
from prisma_ray.campaign.state import Outcome
from prisma_ray.runtime.pool import PoolSize, run_pool

TINY = [
    "prisma-toy-vit-shapes",
    "prisma-toy-video-moving-shapes",
    "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k",
    "timm-deit-tiny-patch16-224-fb-in1k",
    "timm-deit-tiny-distilled-patch16-224-fb-in1k",
    "timm-eva02-tiny-patch14-224-mim-in22k",
]


def campaign(names: list[str], root: str, reuse: bool) -> tuple[float, list[Outcome]]:
    """Run `names` on one actor (`reuse`) or one fresh actor each; return the wall seconds and the outcomes."""
    cfg = registry_config(names, root)
    ready, failed = prepare_data(cfg, names)
    assert not failed, failed
    size = PoolSize("cpu", 1, 1.0, 0.0, 1, 1)
    kwargs = {"cfg": cfg.model_dump(mode="json"), "device": "cpu", "threads": 1}
    start = time.perf_counter()
    if reuse:
        results = list(run_pool(ready, ModelRunner, kwargs, size, method="run"))
    else:
        results = [r for name in ready for r in run_pool([name], ModelRunner, kwargs, size, method="run")]
    return time.perf_counter() - start, [Outcome(**r) for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help=f"tiny models, at most {len(TINY)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, alternating which goes first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = TINY[: args.models]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for reuse in (True, False) if repeat % 2 == 0 else (False, True):
            with tempfile.TemporaryDirectory() as root:
                wall, outcomes = campaign(names, root, reuse)
            errors = [f"{o.model}: {o.error}" for o in outcomes if o.error]
            if errors:
                print("\n".join(errors))
                return 1
            times[reuse].append(wall)
            label = "one actor, reused" if reuse else "fresh actor each"
            print(f"{label:<18} {len(names)} models  {wall:7.1f} s  {wall / len(names):6.1f} s per model")
    reused, fresh = min(times[True]), min(times[False])
    print(
        f"per model: reused {reused / len(names):.1f} s, fresh {fresh / len(names):.1f} s; fresh / reused = {fresh / reused:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
