"""Ground-truth recovery on the embedded toy models: does a TopK SAE on the quickstart's hook detect the factor values?

    python benchmarks/toy_ground_truth.py                       # both models, the quickstart's hooks
    python benchmarks/toy_ground_truth.py --models prisma-toy-vit-shapes --hooks blocks.2.hook_resid_post,...

Per model and hook: a TopK SAE (the quickstart's: expansion 8, lr 1e-3, batches of 1,024 tokens, as many steps as
the quickstart's epochs give; k: the quickstart's, 8, 16 and 32) trained on the hook's tokens of `train_samples`
rendered samples, scored on the patch tokens of `test_samples` held-out ones (ambiguous edge patches left out; see `prisma_ray.models.toy_recovery`).
Prints the fraction of shape and colour values (and for the video model direction values) whose best latent has
AUROC >= 0.95, the mean best AUROC, and the same for the raw model dimensions (both signs).
"""

import argparse
import sys
import time

import torch

from prisma_ray.models import get_entry, load_model, toy
from prisma_ray.models.toy_recovery import RecoveryConfig, toy_recovery
from prisma_ray.quickstart import QuickstartConfig, toy_runs


def factors_of(spec: toy.ToySpec) -> list[str]:
    return ["shape", "colour"] + (["direction"] if spec.modality == "video" else [])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = {m.name: m for m in toy_runs()}
    parser.add_argument("--models", default=",".join(defaults), help="comma-separated embedded models")
    parser.add_argument("--hooks", default=None, help="comma-separated hooks (default: the quickstart's per model)")
    ks = ",".join(str(k) for k in sorted({d.k for d in QuickstartConfig().dictionaries}))
    parser.add_argument("--k", default=ks, help=f"comma-separated TopK k values (default: the quickstart's, {ks})")
    parser.add_argument("--test-samples", type=int, default=None, help="held-out samples (default: the quickstart's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':<32} {'hook':<26} {'dict':<8} {'detected':>8} {'mean AUROC':>10}  per factor (detected/mean)")
    for name in args.models.split(","):
        q = defaults[name]
        spec = toy.SPECS[get_entry(name).architecture]
        model = load_model(name, pretrained=True)
        tokens_per_sample = model.token_layout.n_tokens
        steps = max(1, int(q.epochs * q.train_samples * tokens_per_sample / 1024))
        factors = factors_of(spec)
        for hook in args.hooks.split(",") if args.hooks else [q.hook]:
            for k in (int(v) for v in args.k.split(",")):
                cfg = RecoveryConfig(
                    hook=hook,
                    train_samples=q.train_samples,
                    test_samples=args.test_samples or q.test_samples,
                    k=k,
                    steps=steps,
                )
                start = time.perf_counter()
                result = toy_recovery(model, spec, cfg, factors)
                for kind, r in result.items():
                    label = f"topk{k}" if kind == "sae" else "raw dims"
                    per = "  ".join(f"{f} {v['detected']:.2f}/{v['mean']:.3f}" for f, v in r["per_factor"].items())
                    print(
                        f"{name:<32} {hook:<26} {label:<8} {r['fraction_detected']:>8.3f} "
                        f"{r['mean_best_auroc']:>10.3f}  {per}",
                        flush=True,
                    )
                missed = [
                    f"{v} {a:.3f}" for v, a in zip(result["sae"]["values"], result["sae"]["best_auroc"]) if a < 0.95
                ]
                print(f"  missed by the SAE: {', '.join(missed) or 'none'}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
