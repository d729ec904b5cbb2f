"""Steering: clamp or scale chosen latents of a dictionary spliced in at its hook point, and measure the effect.

At the dictionary's input hook point (and the chosen token positions) the activation `x` becomes
`x + decode(z') - decode(z)`, `z = encode(x)` and `z'` = `z` with the chosen latents set to `value`
(or multiplied by `scale`): the dictionary's error term is kept, so steering with no change is the
identity. With `keep_error=False` it becomes `decode(z')` (the reconstruction alone). The output is
compared through a head: the model's classifier, or a CLIP-style zero-shot head over text embeddings
(`prisma_ray.evaluate.splice.ZeroShotHead`), whose cosine similarities are reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prisma_ray.errors import InvalidRequest

from ..data.shards import InputFormat, ShardData, decode_first
from ..data.sources import DatasetSpec, SyntheticSource, with_resolved_storage
from ..evaluate.checkpoint import load_matrix
from ..evaluate.splice import Head, HookList, ZeroShotHead, classifier_head, outputs_logits, put_at_positions, take
from ..models import HookedVisionModel, ModelEntry
from ..models.inputs import DEFAULT_PROMPT, PixelInputs
from ..models.loading import TORCH_DTYPES, load_model, resolve_entry
from ..models.spec import ModelAsExtracted
from ..models.token_selection import TokenSelection, fixed_positions
from ..runtime.devices import Device, local_device
from ..sae import Dictionary, load_dictionary
from ..storage import StorageOptions
from .collect import default_dataset


class Intervention(BaseModel):
    """Which latents to steer and how: set them to `value`, or multiply them by `scale`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latents: list[int] = Field(min_length=1, description="indices of the latents steered")
    value: float | None = Field(None, description="clamp the latents to this activation (or set `scale`)")
    scale: float | None = Field(None, description="multiply the latents by this factor (or set `value`)")

    @model_validator(mode="after")
    def _one_rule(self) -> Intervention:
        if (self.value is None) == (self.scale is None):
            raise InvalidRequest("set exactly one of `value` (clamp the latents) or `scale` (multiply them)")
        return self


class SteerSpec(Intervention):
    """An `Intervention`, whether the error term is kept, and the tokens steered (vision models: all, patches or
    cls; multimodal language models choose the kinds of token with `GenerationSpec.token_kinds` instead)."""

    keep_error: bool = Field(True, description="add back the dictionary's error term x - x_hat")
    tokens: Literal["all", "patches", "cls"] = Field("all", description="the tokens steered: all, patches or cls")


def check_latents(d: Dictionary, latents: Sequence[int]) -> None:
    bad = [i for i in latents if not 0 <= i < d.n_latents]
    if bad:
        raise InvalidRequest(f"latents {bad} do not exist: the dictionary has {d.n_latents} (0..{d.n_latents - 1})")


def steered(d: Dictionary, x: torch.Tensor, spec: SteerSpec) -> torch.Tensor:
    """`x [..., d_in]` with the latents of `spec` steered (see the module docstring), row by row."""
    raw = x.to(d.W_enc.dtype)
    z = d.encode(raw)
    new = z.clone()
    idx = torch.as_tensor(spec.latents, device=z.device)
    new[..., idx] = spec.value if spec.value is not None else z[..., idx] * spec.scale
    out = raw + (d.decode(new) - d.decode(z)) if spec.keep_error else d.decode(new)  # no change: exactly `x`
    return out.to(x.dtype)


def steered_hook(model: HookedVisionModel, d: Dictionary, latents: Sequence[int]) -> str:
    """The hook point where `d` is spliced in to steer `latents` (its input hook point), after checking that `d` is
    an SAE over one hook point of `model`'s width there and that the latents exist (`InvalidRequest` otherwise)."""
    check_latents(d, latents)
    if d.sites.kind != "sae":
        raise InvalidRequest(f"steering needs an SAE over one hook point; this dictionary is a {d.sites.kind}")
    hook = d.sites.inputs[0].name
    if model.hook_point(hook).site == "attn.hook_pattern":
        raise InvalidRequest(
            f"the dictionary reads {hook}, an attention pattern (not one vector per token): steering needs a "
            "dictionary at a per-token hook point (e.g. hook_resid_post, hook_mlp_out, attn.hook_z)"
        )
    width = model.hook_width(hook)
    if d.sites.d_in != width:
        raise InvalidRequest(
            f"the dictionary reads {d.sites.d_in}-wide activations but {model.name} is {width} wide at {hook}"
        )
    return hook


def steering_hooks(model: HookedVisionModel, d: Dictionary, spec: SteerSpec) -> HookList:
    """The forward hook that steers `d`'s latents at its input hook point; at a per-head point `d` reads every head
    flattened into the width (head-major, as extraction stores it by default)."""
    hook = steered_hook(model, d, spec.latents)
    positions = torch.as_tensor(
        fixed_positions(model.token_layout, TokenSelection(mode=spec.tokens)), device=d.W_dec.device
    )
    return [(hook, put_at_positions(positions, lambda cur: steered(d, take(cur, positions), spec)))]


def default_head(
    model: HookedVisionModel, text_embeddings: torch.Tensor | None = None, logit_scale: float = 100.0
) -> Head:
    """The model's classifier, or a zero-shot head over `text_embeddings` for an embedding tower."""
    if text_embeddings is not None:
        return ZeroShotHead(text_embeddings, logit_scale)
    if not outputs_logits(model):
        raise InvalidRequest(
            f"{model.name} outputs an embedding, not logits: pass text embeddings (.npy, [prompts, width])"
        )
    return classifier_head


@dataclass
class SteerResult:
    """Clean and steered logits `[B, classes]` (for a zero-shot head: `logit_scale` x cosine to each prompt)."""

    clean: torch.Tensor
    steered: torch.Tensor
    logit_scale: float | None = None

    @property
    def clean_probs(self) -> torch.Tensor:
        return self.clean.softmax(-1)

    @property
    def steered_probs(self) -> torch.Tensor:
        return self.steered.softmax(-1)

    def summary(self, labels: Sequence[str] | None = None) -> dict:
        """Per input: predicted class before and after, the largest probability gain; means over inputs."""
        names = list(labels) if labels else [str(i) for i in range(self.clean.shape[1])]
        delta = self.steered_probs - self.clean_probs
        clean_top, steered_top = self.clean.argmax(-1), self.steered.argmax(-1)
        logp, clean_logp = self.steered.log_softmax(-1), self.clean.log_softmax(-1)
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
        out = {
            "inputs": len(self.clean),
            "changed_prediction": float((clean_top != steered_top).float().mean()),
            "mean_kl": float(kl.mean()),
            "mean_prob_delta": {n: float(v) for n, v in zip(names, delta.mean(0))},
            "per_input": [
                {
                    "clean": names[int(a)],
                    "steered": names[int(b)],
                    "top_gain": names[int(g)],
                    "top_gain_delta": float(d[int(g)]),
                }
                for a, b, g, d in zip(clean_top, steered_top, delta.argmax(-1), delta)
            ],
        }
        if self.logit_scale:
            cos = (self.steered - self.clean) / self.logit_scale
            out["mean_cosine_delta"] = {n: float(v) for n, v in zip(names, cos.mean(0))}
        return out


@torch.inference_mode()
def steer(
    model: HookedVisionModel,
    d: Dictionary,
    x: torch.Tensor,
    spec: SteerSpec,
    head: Head | None = None,
    batch_size: int = 32,
) -> SteerResult:
    """Run `x` clean and steered per `spec` (on `model`'s device); return both outputs through `head` (default:
    `default_head`), as float32 on the CPU."""
    head = head or default_head(model)
    hooks = steering_hooks(model, d, spec)
    clean, steered_out = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        clean.append(head(model(xb)))
        with model.hooks(hooks):
            steered_out.append(head(model(xb)))
    scale = head.logit_scale if isinstance(head, ZeroShotHead) else None
    return SteerResult(torch.cat(clean).float().cpu(), torch.cat(steered_out).float().cpu(), scale)


TokenKinds = Literal["all", "image", "prompt", "generated"]


class GenerationSpec(BaseModel):
    """Multimodal language models: the prompts asked about each image and how the answers are generated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: list[str] = Field([DEFAULT_PROMPT], min_length=1, description="asked about every image, one by one")
    token_kinds: TokenKinds = Field(
        "all", description="the tokens steered: image (the image tokens), prompt (its text), generated, or all"
    )
    max_new_tokens: int = Field(32, ge=1, description="answer length, in tokens")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above: sampled (with the model's top-k / top-p)")
    seed: int = Field(0, description="seed of the sampling (temperature above 0), the same for clean and steered")


class SteerConfig(ModelAsExtracted):
    """`prisma-ray steer`: steer a checkpoint's latents on the first `samples` inputs of a dataset (multimodal
    language models: generate answers to `generation.prompts` about them, clean and steered)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory (cfg.json + sae_weights.safetensors), local or s3://")
    steer: SteerSpec | list[SteerSpec] = Field(
        description="which latents to steer and how; a list (multimodal language models): each on its own"
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="multimodal language models: prompts and generation"
    )
    output: str = Field(
        "prisma-steer", description="multimodal language models: where steer.json and steer.html are written"
    )
    dataset: DatasetSpec = Field(
        default_factory=default_dataset,
        description="the inputs, by `type`; the first `samples` are used (default: synthetic shapes)",
    )
    samples: int = Field(32, ge=1, description="inputs run with and without steering")
    model: str | ModelEntry | None = Field(None, description="default: the model named in the checkpoint")
    device: Device = Field(
        "auto", description="where the model and dictionary run: cpu, cuda, or auto (cuda when this machine has a GPU)"
    )
    text_embeddings: str | None = Field(None, description=".npy/.safetensors [prompts, width] for embedding towers")
    logit_scale: float = Field(100.0, gt=0, description="with text_embeddings: cosine similarity to logits factor")
    labels: list[str] | None = Field(
        None, description="class or prompt names (default: the synthetic dataset's shapes)"
    )
    storage: StorageOptions = Field(StorageOptions(), description="how to reach s3:// checkpoints, data and embeddings")


def steering_inputs(cfg: SteerConfig, model: HookedVisionModel) -> ShardData:
    """The dataset's first `cfg.samples` inputs, decoded for `model` (`uint8` pixels, sample ids); `InvalidRequest`
    naming each file
    that could not be read (corrupt, truncated, too large, ...): steering runs on the inputs asked for, none
    skipped."""
    spec = with_resolved_storage(cfg.dataset)
    data = decode_first(spec, InputFormat.create(spec, model.preprocess), cfg.samples)
    if data.errors:
        bad = "; ".join(f"{e.path} ({e.reason}{': ' + e.detail if e.detail else ''})" for e in data.errors[:5])
        more = f" and {len(data.errors) - 5} more" if len(data.errors) > 5 else ""
        raise InvalidRequest(f"dataset: cannot read {bad}{more}. Fix or remove these files, or point --data elsewhere.")
    return data


def steered_pair(cfg: SteerConfig) -> tuple[Dictionary, HookedVisionModel]:
    """The dictionary and the model `cfg` steers, both on `cfg.device`, the model at `cfg.model_dtype` (`device:
    cuda` where torch sees no GPU raises `InvalidRequest` naming the field)."""
    device = local_device(cfg.device)
    d = load_dictionary(cfg.checkpoint, cfg.storage.resolved()).to(device).eval()
    entry = resolve_entry(cfg.model or d.sites.inputs[0].model or "")
    model = load_model(
        entry,
        cfg.pretrained,
        weights=cfg.weights,
        storage=cfg.storage.resolved(),
        seed=cfg.seed,
        device=device,
        dtype=TORCH_DTYPES[cfg.model_dtype],
    )
    return d, model


def run_steer(cfg: SteerConfig) -> dict:
    """Steer per `cfg` and return `SteerResult.summary` plus what was steered (multimodal language models:
    `steer_generate.run_generation`)."""
    options = cfg.storage.resolved()
    d, model = steered_pair(cfg)
    if model.preprocess.modality == "multimodal":
        from .steer_generate import run_generation

        return run_generation(cfg, d, model)
    if given := sorted({"generation", "output"} & cfg.model_fields_set):
        raise InvalidRequest(
            f"{', '.join(given)} (--prompt, --token-kinds, --max-new-tokens, --temperature, --output) are for "
            f"multimodal language models; {model.name} is a vision model: its steering prints the change as JSON"
        )
    if isinstance(cfg.steer, list) and len(cfg.steer) != 1:
        raise InvalidRequest(
            f"steer: {len(cfg.steer)} interventions given; {model.name} is steered by one at a time (a list of "
            "several is for multimodal language models)"
        )
    rule = cfg.steer[0] if isinstance(cfg.steer, list) else cfg.steer
    device = d.W_enc.device
    x = PixelInputs(model, device=device).pixels(steering_inputs(cfg, model).pixels)
    embeddings = load_matrix(cfg.text_embeddings, options).to(device) if cfg.text_embeddings else None
    result = steer(model, d, x, rule, default_head(model, embeddings, cfg.logit_scale))
    spec = cfg.dataset
    labels = cfg.labels or (
        list(spec.generator.shapes) if isinstance(spec, SyntheticSource) and spec.generator.name == "shapes" else None
    )
    if labels is not None and len(labels) != result.clean.shape[1]:
        raise InvalidRequest(f"{len(labels)} labels given but the head has {result.clean.shape[1]} classes")
    return {
        "checkpoint": cfg.checkpoint,
        "model": model.name,
        "hook": d.sites.inputs[0].name,
        **rule.model_dump(),
        **result.summary(labels),
    }
