"""`prisma-ray campaign`'s config: which models, their weights, the data per modality, the hook points, the
dictionaries, how long to train, what to evaluate, where everything goes and the actors that run it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import storage
from ..config import require_distinct
from ..data.sources import DatasetSpec, SyntheticSource
from ..data.synthetic import MovingShapesConfig, ShapesConfig
from ..errors import InvalidRequest
from ..evaluate.sweep import ModelSelection
from ..models.token_selection import TokenSelection
from ..runtime.devices import Device
from ..runtime.session import RayOptions
from ..sae import DictionaryConfig
from ..storage import StorageOptions


class Weights(BaseModel):
    """A model's weights: its published ones (`pretrained`), random ones drawn from `seed`, or a checkpoint
    file (`checkpoint`, as `prisma-ray extract`'s `weights`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrained: bool = Field(False, description="the model's published weights (false: random from `seed`)")
    seed: int = Field(0, description="seed of the random weights")
    checkpoint: str | None = Field(None, description="URI of a weights file loaded into the model (pretrained: false)")

    @model_validator(mode="after")
    def _one_kind(self) -> Weights:
        if self.pretrained and self.checkpoint:
            raise InvalidRequest("weights: give pretrained: true or a checkpoint, not both")
        return self


class Splits(BaseModel):
    """One modality's data: a train split (extracted, trained on) and a held-out test split (evaluated on)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: DatasetSpec = Field(description="the training inputs (images, videos, parquet, webdataset, synthetic)")
    test: DatasetSpec = Field(description="the held-out inputs, evaluated on and shown in the dashboard")
    at_model_size: bool = Field(
        False,
        description="synthetic data only: generate it at each model's input size, one ground-truth cell per patch "
        "(under `<uri>-<size>px-<patch>`), instead of resizing one dataset to every model",
    )

    @model_validator(mode="after")
    def _synthetic_when_sized(self) -> Splits:
        if self.at_model_size and not all(isinstance(s, SyntheticSource) for s in (self.train, self.test)):
            raise InvalidRequest("at_model_size: true needs synthetic train and test datasets; set it false")
        return self


def _shapes(n: int, seed: int) -> ShapesConfig:
    return ShapesConfig(n_images=n, seed=seed)


def _default_data() -> dict[str, Splits]:
    return {
        "image": Splits(
            train=SyntheticSource(uri="prisma-campaign-data/shapes-train", generator=_shapes(256, 0)),
            test=SyntheticSource(uri="prisma-campaign-data/shapes-test", generator=_shapes(64, 1)),
        ),
        "video": Splits(
            train=SyntheticSource(
                uri="prisma-campaign-data/moving-shapes-train", generator=MovingShapesConfig(n_clips=32, seed=0)
            ),
            test=SyntheticSource(
                uri="prisma-campaign-data/moving-shapes-test", generator=MovingShapesConfig(n_clips=8, seed=1)
            ),
        ),
    }


class CampaignResources(BaseModel):
    """The campaign's long-lived actors: each loads its models in turn and runs all of a model's stages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    actors: int | None = Field(
        None, ge=1, description="model actors (default: one per GPU; on CPU the cluster's CPUs, at most 8)"
    )
    cpus_per_actor: float = Field(1.0, gt=0, le=1, description="CPUs reserved per actor (at most 1)")
    device: Device = Field(
        "auto", description="cpu, cuda (one GPU per actor) or auto (cuda where the cluster has GPUs)"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per actor (default: CPUs / actors)")
    retries: int = Field(
        0,
        ge=0,
        description="times a model whose actor died (out of memory, a lost node) is run again on a fresh actor "
        "before it is recorded as failed in campaign.json (0: recorded at once, the campaign goes on; a rerun "
        "resumes it from its finished stages)",
    )


class CampaignConfig(BaseModel):
    """`prisma-ray campaign`: every selected model through extract -> train (the dictionary grid) -> evaluate
    (held-out metrics, spliced-in loss recovered, ground truth) -> dashboard of its best dictionary, on a pool
    of long-lived actors, then one leaderboard across models.

    Under `output`: `activations/<model>/<hook>/<split>`,
    `runs/`, `dictionaries/<model>/<hook>/<dictionary>`, `sweep/` (the leaderboard of every model),
    `interpret/<model>`, `dashboard/<model>` and `campaign.json` (each model's stage reached, seconds and error).
    Every stage resumes: a rerun skips finished work; a changed config is refused per model by its stores.
    """

    model_config = ConfigDict(extra="forbid")

    output: str = Field("prisma-campaign", description="root of every stage's output (local or s3://)")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `output`")
    models: ModelSelection = Field(description="the models: registry `names` plus every model of the filters given")
    weights: Weights = Field(Weights(), description="weights of every model not named in `model_weights`")
    model_weights: dict[str, Weights] = Field(default_factory=dict, description="weights per model name")
    data: dict[str, Splits] = Field(
        default_factory=_default_data,
        description="train and test data per modality (image, video; multimodal models read the image data)",
    )
    hooks: list[str] = Field(default_factory=list, description="hook points by name, for every model")
    depths: list[float] = Field(
        default_factory=list,
        description="hook points by relative depth in [0, 1]: the residual stream after the nearest block "
        "(block round(depth x blocks), at most the last) of each model; default when no hooks: [0.5]",
    )
    tokens: TokenSelection = Field(TokenSelection(mode="patches"), description="which tokens are stored")
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=lambda: [DictionaryConfig(architecture="topk", k=16, expansion_factor=4, lr=1e-3)],
        min_length=1,
        description="the grid of dictionaries trained per (model, hook) on the same batches",
    )
    training_tokens: int | None = Field(
        None, ge=1, description="training tokens per (model, hook) (default: `epochs` passes over the store)"
    )
    epochs: float = Field(2.0, gt=0, description="passes over the training store when `training_tokens` is not set")
    batch_size: int = Field(1024, ge=1, description="training tokens per step")
    eval_tokens: int = Field(
        4096, ge=1, description="held-out tokens evaluated per store (and scored for ground truth)"
    )
    splice_samples: int = Field(16, ge=0, description="held-out inputs run with each dictionary spliced in (0: skip)")
    dashboard_latents: int = Field(16, ge=1, description="latents with a page in each model's dashboard")
    shard_size: int = Field(64, ge=1, description="samples per extraction shard")
    resources: CampaignResources = Field(CampaignResources(), description="the campaign's model actors")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")

    @field_validator("hooks")
    @classmethod
    def _distinct_hooks(cls, hooks: list[str]) -> list[str]:
        return require_distinct(hooks, "hooks")

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[float]) -> list[float]:
        bad = [d for d in depths if not 0 <= d <= 1]
        if bad:
            raise InvalidRequest(f"depths {bad} are not in [0, 1] (0: the first block, 1: the last)")
        return require_distinct(depths, "depths")

    @field_validator("data")
    @classmethod
    def _modalities(cls, data: dict[str, Splits]) -> dict[str, Splits]:
        unknown = sorted(set(data) - {"image", "video"})
        if unknown:
            raise InvalidRequest(f"data has modalities {unknown}; use image and video (multimodal reads image)")
        return data

    def uri(self, *parts: str) -> str:
        """`output`/`parts` as an absolute URI."""
        return storage.join(storage.absolute(self.output), *parts)

    def weights_of(self, model: str) -> Weights:
        """The weights `model` runs with."""
        return self.model_weights.get(model, self.weights)
