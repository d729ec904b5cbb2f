"""Ground-truth recovery on an embedded toy model, in memory: does a TopK SAE on a hook detect the factor values?

Held-out samples of the toy model's own distribution are rendered (`synthetic.render_shapes` /
`render_moving_shapes`), run through the hooked model (`run_with_cache`), and a TopK SAE (`sae.Trainer`,
the quickstart's recipe) is trained on the hook's tokens of a training split. On the held-out patch tokens
every factor value (`shape=circle`, `colour=red`, `direction=3`) is scored by its best single latent's
AUROC (`evaluate.ground_truth.factor_recovery`), and likewise by the raw model dimensions (each with both
signs). Patch labels follow the shared definition: a token's cell is its own patch (the dataset grid is the
model's grid), positive where the cell's dominant object has the value and covers >= `min_coverage` of it,
negative where it holds no object pixel or a dominant object with another value, ambiguous (left out) where
0 < coverage < `min_coverage`. A video token (a tubelet of `tubelet` frames) takes the factors of its first
frame. Prefix tokens (CLS) are trained on but never scored.

This is the check behind `benchmarks/toy_ground_truth.py` and the slow test of the toy models' target.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.synthetic import ShapesConfig, render_moving_shapes, render_shapes, unambiguous_cells
from ..errors import InvalidRequest
from ..evaluate.ground_truth import factor_recovery
from ..sae import DictionaryConfig
from ..sae.fit import fit_dictionaries
from .spec import TokenLayout
from .toy import ToySpec
from .toy_training import to_input, token_cells

DETECT_AUROC = 0.95


class RecoveryConfig(BaseModel):
    """How much data and training the check uses (defaults: the quickstart's toy ViT run, one dictionary)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hook: str = Field(description="hook point, e.g. blocks.3.hook_resid_post")
    train_samples: int = Field(1024, ge=1, description="training samples (images or clips)")
    test_samples: int = Field(128, ge=1, description="held-out samples scored")
    k: int = Field(8, ge=1, description="TopK active latents")
    expansion_factor: int = Field(8, ge=1, description="latents per model dimension")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(1024, ge=1, description="tokens per SAE step")
    steps: int = Field(800, ge=1, description="SAE training steps")
    min_coverage: float = Field(0.5, gt=0, le=1, description="cell coverage from which a patch is labelled")
    seed: int = 0


def render(spec: ToySpec, n: int, held_out: bool) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
    """`n` samples of `spec`'s distribution (its held-out seed if `held_out`): `(pixels uint8[n, (T,) H, W, 3],
    masks uint8[n, (T,) H, W], object rows per sample)`."""
    cfg = spec.held_out(n) if held_out else spec.dataset
    draw = render_shapes if isinstance(cfg, ShapesConfig) else render_moving_shapes
    samples = [draw(cfg, i) for i in range(n)]
    return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples]), [s[2] for s in samples]


def patch_labels(
    masks: np.ndarray, objects: list[list[dict]], layout: TokenLayout, factors: list[str], min_coverage: float = 0.5
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per patch token of every sample (row-major `[sample, patch token]`): `(kept bool[N], values)`, `kept`
    False for ambiguous tokens (0 < coverage < `min_coverage`), `values[factor]` the cell's dominant object's
    value (None off-object). `masks` is `[n, H, W]` or `[n, T, H, W]` with the grid `layout.grid` laid over it
    (`toy_training.token_cells`, the cells the toy models' dense heads are trained on); `layout` must be `"thw"`
    (the toy models' order), else `InvalidRequest`."""
    if layout.patch_order != "thw":
        raise InvalidRequest(f"toy ground truth: expected a 'thw' token layout, got {layout.patch_order!r}")
    kept, values = [], {f: [] for f in factors}
    for mask, rows in zip(masks, objects):
        for obj, coverage, by_id in token_cells(mask, rows, layout.grid, layout.tubelet)[: layout.time]:
            kept.extend(unambiguous_cells(coverage, min_coverage).tolist())
            for f in factors:
                values[f].extend(str(by_id[o][f]) if o else None for o in obj)
    return np.asarray(kept, dtype=bool), {f: np.asarray(v, dtype=object) for f, v in values.items()}


@torch.no_grad()
def hook_tokens(model, pixels: np.ndarray, hook: str, batch_size: int = 128) -> torch.Tensor:
    """`float32[n, tokens, d]`: the activations at `hook` of rendered `pixels` through hooked `model`."""
    out = []
    for i in range(0, len(pixels), batch_size):
        _, cache = model.run_with_cache(to_input(pixels[i : i + batch_size], model.preprocess), [hook], stop_early=True)
        out.append(cache[hook].float())
    return torch.cat(out)


def train_topk(tokens: torch.Tensor, cfg: RecoveryConfig, name: str = ""):
    """A TopK SAE (`cfg.k`, `cfg.expansion_factor`) trained on `tokens` (`[N, d]`) for `cfg.steps` steps as the
    training job trains it (`sae.fit.fit_dictionaries`: `center_scale`, first-batch initialisation, a seeded row
    order); returns the dictionary in eval mode."""
    dictionary = DictionaryConfig(architecture="topk", k=cfg.k, expansion_factor=cfg.expansion_factor, lr=cfg.lr)
    fitted = fit_dictionaries(
        tokens, [dictionary], steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, site=cfg.hook, model=name
    )
    return next(iter(fitted.values()))


def summarize(result: dict, factors: list[str]) -> dict:
    """`factor_recovery`'s result with the fraction detected and mean best AUROC per factor added."""
    best = dict(zip(result["values"], result["best_auroc"]))
    per = {}
    for f in factors:
        scores = [a for v, a in best.items() if v.split("=", 1)[0] == f]
        per[f] = {"detected": float(np.mean([a >= DETECT_AUROC for a in scores])), "mean": float(np.mean(scores))}
    return {**result, "per_factor": per}


def toy_recovery(model, spec: ToySpec, cfg: RecoveryConfig, factors: list[str]) -> dict[str, dict]:
    """Recovery of `factors` on held-out patch tokens of toy model `model` (a `HookedVisionModel` of `spec`):
    `{"sae": ..., "raw": ...}`, each `factor_recovery`'s result plus `per_factor` (see `summarize`)."""
    torch.manual_seed(cfg.seed)
    train = hook_tokens(model, render(spec, cfg.train_samples, held_out=False)[0], cfg.hook)
    sae = train_topk(train.reshape(-1, train.shape[-1]), cfg, model.name)
    pixels, masks, objects = render(spec, cfg.test_samples, held_out=True)
    layout = model.token_layout
    test = hook_tokens(model, pixels, cfg.hook)[:, layout.n_prefix :].reshape(-1, train.shape[-1])
    kept, values = patch_labels(masks, objects, layout, factors, cfg.min_coverage)
    with torch.no_grad():
        latents = sae.encode(test).numpy()[kept]
    raw = test.numpy()[kept]
    kept_values = {f: v[kept] for f, v in values.items()}
    return {
        "sae": summarize(factor_recovery(latents, kept_values, DETECT_AUROC), factors),
        "raw": summarize(factor_recovery(np.concatenate([raw, -raw], 1), kept_values, DETECT_AUROC), factors),
    }
