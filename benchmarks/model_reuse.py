"""A campaign actor's model reuse: one model's stages (`campaign.stages.run_model`: extraction of the train and
test splits, training, evaluation with splicing, the dashboard's pass) with the model built once and reused by
every stage (`models.reuse.reuse_models`, what a campaign actor does) against built again by each stage (the same
code with the reuse switched off), in this process (its stages run inline, as in an actor, on this process's
Ray, started before any timing), each run into its own fresh output. The work is the
registry check's (`registry_check.registry_config`: random weights, tiny data at the model's input size, half
depth, a few steps, 2 spliced-in inputs, a one-page dashboard), so the model's build is a large part of it, as it is
for every model of `benchmarks/registry_campaign.py`. The data are generated before any timing; the two kinds
alternate order with `--repeats`.

    .venv/bin/python benchmarks/model_reuse.py [--model timm-vit-base-patch16-224-augreg2-in21k-ft-in1k] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time

import torch

from prisma_ray.campaign import stages
from prisma_ray.campaign.registry_check import registry_config
from prisma_ray.campaign.run import prepare_data
from prisma_ray.models import loading
from prisma_ray.runtime.session import RayOptions, ensure_ray


def run(name: str, data_root: str, reuse: bool, threads: int) -> tuple[float, float, int]:
    """One model's stages into a fresh output; return the wall seconds, the seconds spent building the model and
    how often it was built."""
    built: list[float] = []
    build = loading._build

    def timed(*args):  # the builds that allocate weights (not the meta-device descriptions)
        start = time.perf_counter()
        try:
            return build(*args)
        finally:
            if args[5] is None or torch.device(args[5]).type != "meta":
                built.append(time.perf_counter() - start)

    loading._build = timed
    stages.reuse_models = stages_reuse if reuse else contextlib.nullcontext
    try:
        with tempfile.TemporaryDirectory() as root:
            cfg = registry_config([name], root)
            cfg = cfg.model_copy(update={"data": registry_config([name], data_root).data})  # data generated once
            start = time.perf_counter()
            outcome = stages.run_model(cfg, name, "cpu", threads)
            wall = time.perf_counter() - start
    finally:
        loading._build, stages.reuse_models = build, stages_reuse
    if outcome.error:
        raise SystemExit(f"{name}: {outcome.error}")
    return wall, sum(built), len(built)


stages_reuse = stages.reuse_models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm-vit-base-patch16-224-augreg2-in21k-ft-in1k", help="registry name")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, alternating which goes first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    times: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    ensure_ray(RayOptions())  # the stages connect to this process's Ray (started before any timing)
    loading.load_model(args.model, pretrained=False)  # imports warmed before any timing
    with tempfile.TemporaryDirectory() as data_root:
        ready, failed = prepare_data(registry_config([args.model], data_root), [args.model])
        assert not failed, failed
        order = [kind for repeat in range(args.repeats) for kind in ((True, False), (False, True))[repeat % 2]]
        for reuse in order:
            wall, building, builds = run(args.model, data_root, reuse, args.threads)
            times[reuse].append((wall, building, builds))
            label = "built once, reused" if reuse else "built per stage"
            print(f"{label:<19} {args.model}  {wall:6.1f} s  ({builds} builds, {building:5.1f} s building)")
    best = {reuse: min(runs)[0] for reuse, runs in times.items()}
    ratio = best[False] / best[True]
    print(f"one model's stages: reused {best[True]:.1f} s, built per stage {best[False]:.1f} s; ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
