"""Every registry model through every stage: a campaign (`prisma_ray.campaign`) over the registry with random
weights (no download), tiny synthetic data at each model's input size, one hook point at half depth, one small
dictionary trained for a few steps, evaluated with splicing, one dashboard page
(`prisma_ray.campaign.registry_check.registry_config`).

Prints a table (model, stage reached, seconds, peak memory, error) and the count that passes every stage. Models
whose float32 weights (estimated) exceed `--memory-fraction` of this machine's memory are not run; their row
says so. The output folder is kept: a rerun skips what is finished (delete it to measure again).

    .venv/bin/python benchmarks/registry_campaign.py                      # the whole registry (hours on 2 CPUs)
    .venv/bin/python benchmarks/registry_campaign.py --sample             # one model per source and modality
    .venv/bin/python benchmarks/registry_campaign.py --names timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import psutil

from prisma_ray.campaign.registry_check import registry_config, sample, too_big
from prisma_ray.campaign.run import run_campaign
from prisma_ray.campaign.state import Outcome, outcome_table
from prisma_ray.models import get_entry, list_entries
from prisma_ray.runtime.session import RayOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="one model per source and modality (the smallest)")
    parser.add_argument("--names", nargs="+", help="these registry models only")
    parser.add_argument("--output", default="/tmp/prisma-registry-campaign", help="the campaign's output folder")
    parser.add_argument("--steps", type=int, default=4, help="training steps of 64 tokens")
    parser.add_argument("--memory-fraction", type=float, default=0.25, help="of this machine's memory per model")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = args.names or (sample() if args.sample else sorted(e.name for e in list_entries()))
    budget = psutil.virtual_memory().total * args.memory_fraction
    skipped = {n: Outcome(model=n, error=why) for n in names if (why := too_big(get_entry(n), budget))}
    run = [n for n in names if n not in skipped]
    print(f"{len(names)} models: {len(run)} run, {len(skipped)} over the memory budget; output {args.output}")
    start = time.perf_counter()
    summary = run_campaign(
        registry_config(run, os.path.abspath(args.output), RayOptions(num_cpus=args.num_cpus), args.steps)
    )
    wall = time.perf_counter() - start
    outcomes = sorted([*summary.outcomes, *skipped.values()], key=lambda o: o.model)
    print("\n".join(outcome_table(outcomes)))
    print(f"passed every stage: {sum(o.passed for o in outcomes)} of {len(outcomes)} ({len(skipped)} not run: memory)")
    print(f"wall {wall:.0f} s; leaderboard {summary.leaderboard or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
