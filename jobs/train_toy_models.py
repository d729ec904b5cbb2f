"""Train the embedded toy models from scratch and write their weights into the package.

    python jobs/train_toy_models.py                        # both models, into prisma_ray/assets/
    python jobs/train_toy_models.py toy-vit-shapes --out /tmp/weights

Prints per model the training time and the accuracy of each output (the primary `label` task and each
auxiliary head) on a held-out split rendered in memory.
"""

import argparse
import sys
from pathlib import Path

import torch

from prisma_ray.models import toy, toy_training


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to train (default: all of {sorted(toy.SPECS)})"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for the .safetensors files (default: the package)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out samples to score (default 1000)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(toy.SPECS))
    if unknown:
        parser.error(f"unknown toy model(s) {unknown}; choose from {sorted(toy.SPECS)}")
    torch.set_num_threads(args.threads)
    for name in args.names or sorted(toy.SPECS):
        spec = toy.SPECS[name]
        model, run = toy_training.train_toy(spec, log=lambda line: print(line, flush=True))
        pixels, targets = toy_training.render_targets(spec.held_out(args.held_out), args.held_out, spec.aux_heads, spec)
        held_out = toy_training.head_accuracies(spec, model, toy_training.to_input(pixels, spec.preprocess), targets)
        wanted = {"label": spec.target_accuracy, **{h.name: h.target_accuracy for h in spec.aux_heads}}
        wanted |= {f"patch_{h.name}": h.target_accuracy for h in spec.patch_heads}
        path = (args.out / f"{name}.safetensors") if args.out else toy.weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        toy_training.save_weights(model, path)
        print(f"{name}: {run.steps} steps in {run.seconds:.0f}s, loss {run.final_loss:.3f} -> {path}", flush=True)
        for output, acc in held_out.items():
            print(
                f"  {output:<14} train acc {run.train_accuracy[output]:.3f}  held-out acc {acc:.3f}"
                f"  (target {wanted[output]})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
