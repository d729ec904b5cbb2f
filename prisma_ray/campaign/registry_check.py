"""Every registry model through every stage, with random weights (no download): the campaign that
`benchmarks/registry_campaign.py` runs over the registry (or a sample of it) and CI runs over one model per
source and modality. Tiny synthetic data at each model's input size, one hook point at half depth, one small
dictionary trained for a few steps, evaluated with splicing, one dashboard page.

A model whose float32 weights alone would take more than `memory_budget` bytes is not run: its row says so
(`too_big`), a limit of the machine, not of the model."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from ..models import ModelEntry, list_entries
from ..runtime.session import RayOptions
from .config import CampaignConfig, CampaignResources


def estimated_params(entry: ModelEntry) -> int:
    """About how many parameters `entry` has: 12 x blocks x width^2 for the (vision) transformer, and for
    multimodal models the language model's blocks (4 x hidden^2 attention + 3 x hidden x intermediate MLP) and
    its embedding and output matrices (2 x vocab x hidden)."""
    params = 12 * entry.layers * entry.width**2
    text = entry.config.get("text_config")
    if entry.modality == "multimodal" and text:
        hidden, blocks = int(text["hidden_size"]), int(text["num_hidden_layers"])
        mlp = int(text.get("intermediate_size", 4 * hidden))
        params += blocks * (4 * hidden**2 + 3 * hidden * mlp) + 2 * int(text.get("vocab_size", 0)) * hidden
    return params


def too_big(entry: ModelEntry, memory_budget: float) -> str:
    """Why `entry` is not run on a machine whose campaign may take `memory_budget` bytes ("" where it fits)."""
    need = 4 * estimated_params(entry)
    if need <= memory_budget:
        return ""
    return (
        f"not run: about {need / 2**30:.1f} GiB of float32 weights (estimated), over this machine's budget of "
        f"{memory_budget / 2**30:.1f} GiB"
    )


def sample(entries: Iterable[ModelEntry] | None = None) -> list[str]:
    """One model per (source, modality): the one with the fewest parameters (`estimated_params`), then by name."""
    smallest: dict[tuple[str, str], ModelEntry] = {}
    for e in entries if entries is not None else list_entries():
        key, best = (e.source, e.modality), smallest.get((e.source, e.modality))
        if best is None or (estimated_params(e), e.name) < (estimated_params(best), best.name):
            smallest[key] = e
    return sorted(e.name for e in smallest.values())


def dictionary_seed(name: str) -> int:
    """The initialisation seed of model `name`'s dictionaries in the registry check: the CRC-32 of its name, the
    same in every run and (almost always) different across models, so that no two models' dictionaries of one width
    start from the same decoder (which would align them whatever the models: `evaluate.cross_model.shared_init`)."""
    return zlib.crc32(name.encode())


def registry_config(names: list[str], output: str, ray: RayOptions | None = None, steps: int = 4) -> CampaignConfig:
    """The campaign of `names` with random weights (seed 0) on tiny synthetic data at each model's input size
    (4 train and 2 test images, or 2 and 1 clips), the residual stream at half depth, patch tokens,
    one TopK SAE (k 4, 2x; initialised from each model's own `dictionary_seed`) for `steps` steps of 64 tokens,
    2 held-out inputs spliced in, one dashboard page."""

    def synthetic(split: str, generator: dict) -> dict:
        return {"type": "synthetic", "uri": f"{output}/data/{split}", "generator": generator}

    shapes = {"name": "shapes", "n_objects": [1, 2]}
    moving = {"name": "moving-shapes", "n_objects": [1, 1]}
    data = {
        "image": {
            "train": synthetic("shapes-train", {**shapes, "n_images": 4}),
            "test": synthetic("shapes-test", {**shapes, "n_images": 2, "seed": 1}),
            "at_model_size": True,
        },
        "video": {
            "train": synthetic("moving-train", {**moving, "n_clips": 2}),
            "test": synthetic("moving-test", {**moving, "n_clips": 1, "seed": 1}),
            "at_model_size": True,
        },
    }
    sae = {"architecture": "topk", "k": 4, "expansion_factor": 2, "lr": 1e-3}
    return CampaignConfig.model_validate(
        {
            "output": output,
            "models": {"names": names},
            "entries": {name: {"dictionaries": [{**sae, "seed": dictionary_seed(name)}]} for name in names},
            "weights": {"pretrained": False, "seed": 0},
            "data": data,
            "depths": [0.5],
            "tokens": {"mode": "patches"},
            "dictionaries": [sae],
            "training_tokens": 64 * steps,
            "batch_size": 64,
            "eval_tokens": 256,
            "splice_samples": 2,
            "dashboard_latents": 1,
            "shard_size": 4,
            "resources": CampaignResources(actors=1).model_dump(),
            "ray": (ray or RayOptions()).model_dump(),
        }
    )
