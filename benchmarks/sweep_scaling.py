"""Sweep scaling: wall time of `prisma_ray.evaluate.sweep.run_sweep` over 1, 4 and 16 checkpoints of one model.

Every sweep writes to a fresh output and runs one evaluation actor, so it pays once for what the
checkpoints of a model share (the actor, the model, the held-out rows, the decoded inputs and clean
runs of the spliced-in evaluation, the zero ablation, the ground-truth labels) and then per
checkpoint only for its own metrics. The cost per checkpoint must therefore fall as checkpoints are
added; the script prints the ratio to the single-checkpoint sweep and exits 1 if it does not fall.
The activation store is extracted and Ray started before any timing.

    .venv/bin/python benchmarks/sweep_scaling.py [--sizes 1 4 16] [--images 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from prisma_ray.evaluate.sweep import SweepConfig, run_sweep
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.pipeline import run_extract
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from prisma_ray.store import read_manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images", type=int, default=64, help="held-out shapes images")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--splice-samples", type=int, default=16)
    parser.add_argument("--expansion", type=int, default=8, help="latents per model dimension")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    with tempfile.TemporaryDirectory(prefix="sweep-scaling-") as tmp:
        root = Path(tmp)
        dataset = dict(type="synthetic", uri=str(root / "shapes"), generator=dict(name="shapes", n_images=args.images))
        stores = run_extract(
            ExtractConfig(
                model=args.model,
                hooks=[args.hook],
                dataset=dataset,
                split="test",
                output=str(root / "acts"),
                shard_size=32,
                resources={"actors": 1},
                progress=False,
            )
        )
        width = read_manifest(stores.stores[args.hook]).d_model
        files = [_checkpoint(args.model, args.hook, width, args.expansion, i) for i in range(max(args.sizes))]

        rows = []
        for n in args.sizes:
            for i, exported in enumerate(files[:n]):
                write_files(exported, str(root / f"ckpts-{n}" / f"sae-{i:02d}"))
            cfg = SweepConfig.model_validate(
                {
                    "checkpoints": [str(root / f"ckpts-{n}")],
                    "output": str(root / f"out-{n}"),
                    "resources": {"actors": 1, "torch_threads": 1},
                    "progress": False,
                    "evaluation": {
                        "stores": str(root / "acts"),
                        "split": "test",
                        "max_tokens": args.max_tokens,
                        "splice_samples": args.splice_samples,
                        "device": "cpu",
                    },
                }
            )
            start = time.perf_counter()
            summary = run_sweep(cfg)
            wall = time.perf_counter() - start
            if summary.failed or summary.evaluated != n:
                print(f"sweep of {n} failed: {summary.failed}", file=sys.stderr)
                return 1
            rows.append((n, wall, summary.model_loads.get(args.model, 0)))

    per = {n: wall / n for n, wall, _ in rows}
    print(
        f"model {args.model} (random weights), {args.hook}, {args.images} shapes images, "
        f"{args.max_tokens} held-out tokens, {args.splice_samples} spliced-in samples, d_sae {width * args.expansion}, "
        f"1 actor, 1 torch thread"
    )
    print(f"{'checkpoints':>11} {'wall s':>8} {'s/checkpoint':>13} {'ratio to 1':>11} {'model loads':>12}")
    first = per[rows[0][0]]
    for n, wall, loads in rows:
        print(f"{n:>11} {wall:8.2f} {per[n]:13.3f} {per[n] / first:11.3f} {loads:>12}")
    costs = [per[n] for n, _, _ in rows]
    falls = all(b < a for a, b in zip(costs, costs[1:]))
    print(f"per-checkpoint cost falls as checkpoints are added: {'yes' if falls else 'NO'}")
    ray.shutdown()
    return 0 if falls else 1


def _checkpoint(model: str, hook: str, width: int, expansion: int, i: int) -> dict[str, bytes]:
    """A random TopK SAE on `hook` (k from 8 to 128, several seeds), as checkpoint files."""
    k = (8, 16, 32, 64, 128)[i % 5]
    cfg = DictionaryConfig(architecture="topk", d_sae=width * expansion, k=k, seed=i, name=f"topk-{k}-s{i}")
    return export_files(Dictionary(cfg, Sites(inputs=(Site(name=hook, width=width, model=model),))), tokens=1)


if __name__ == "__main__":
    sys.exit(main())
