"""`prisma-ray train`: the job config (YAML in, validated, clear errors out)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..models import default_hook, default_model
from ..models.spec import TokenKind
from ..runtime.pool import TrainResources
from ..runtime.session import RayOptions
from ..sae.config import DictionaryConfig
from ..sae.io import check_dictionary_names
from ..sae.trainer import NormalizeMode
from ..storage import StorageOptions
from ..store import store_uri


def default_store() -> str:
    """The store `prisma-ray extract` writes with its defaults (model, hook point, output and split)."""
    return store_uri("prisma-activations", default_model(), default_hook(), "train")


TokenKindName = Literal[tuple(kind.name.lower() for kind in TokenKind)]


class TrainData(BaseModel):
    """Which activation stores feed the dictionaries, and how.

    One input store: an SAE. Several input stores (layers of one model, or models run on the same
    images): a crosscoder over their concatenation. `targets` set: a transcoder from the inputs to
    the targets (e.g. `hook_mlp_in` -> `hook_mlp_out`). Rows of different stores are matched by
    `(sample_id, frame, token)`.
    """

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(
        default_factory=lambda: [default_store()],
        min_length=1,
        description="activation store URIs read as the dictionaries' input (several: a crosscoder over them)",
    )
    targets: list[str] = Field(
        default_factory=list, description="store URIs the dictionaries reconstruct (empty: the inputs, an SAE)"
    )
    kinds: list[TokenKindName] | None = Field(None, description="train on these token kinds only (default: all)")
    normalize: NormalizeMode = Field(
        "center_scale", description="from the store statistics: subtract the mean and scale to E‖x‖² = d"
    )
    shuffle_seed: int = Field(0, description="seed of the row shuffle")

    @model_validator(mode="after")
    def _distinct(self) -> TrainData:
        uris = [*self.inputs, *self.targets]
        if len(set(uris)) != len(uris):
            raise InvalidRequest(f"a store appears twice in data.inputs/data.targets: {uris}")
        return self


class TrainConfig(BaseModel):
    """`prisma-ray train`: one or more dictionaries trained together on the same batches with Ray Train.

    Checkpoints go to `<runs>/<name>/` (local or `s3://`); relaunching with the same `name` and
    `runs` resumes from the latest one. The final dictionaries are written to
    `<output>/<dictionary name>/` (default output: `<runs>/<name>/dictionaries`).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field("sae", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$", description="the run's name")
    runs: str = Field("prisma-runs", description="where checkpoints go: <runs>/<name>/... (local or s3://)")
    output: str | None = Field(
        None, description="where the final dictionaries go, one folder each (default: <runs>/<name>/dictionaries)"
    )
    storage: StorageOptions = Field(StorageOptions(), description="how to reach s3:// stores, `runs` and `output`")
    data: TrainData = Field(default_factory=TrainData, description="which activation stores feed the dictionaries")
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=lambda: [DictionaryConfig()],
        min_length=1,
        description="the dictionaries trained together on the same batches (default: one TopK SAE)",
    )
    batch_size: int = Field(4096, ge=1, description="tokens per optimizer step, over all workers")
    steps: int | None = Field(None, ge=1, description="optimizer steps (default: `tokens` or `epochs` worth)")
    tokens: int | None = Field(None, ge=1, description="training tokens, if `steps` is not set")
    epochs: float = Field(1.0, gt=0, description="passes over the data, if neither `steps` nor `tokens` is set")
    autocast: bool | None = Field(
        None,
        description="bf16 autocast of the encoder and decoder products, float32 master weights and Adam state "
        "(SAELens's `autocast`; default: on for CUDA, off on CPU)",
    )
    log_every: int = Field(100, ge=1, description="report metrics every this many steps")
    checkpoint_every: int = Field(1000, ge=1, description="checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept (the latest ones)")
    workers: int = Field(1, ge=0, description="data-parallel workers (0: train in the driver process)")
    resources: TrainResources = Field(
        TrainResources(),
        description="where the workers train and what each worker and each store-reading task reserves",
    )
    max_failures: int = Field(3, ge=-1, description="worker failures survived per run (-1: unlimited)")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")

    @field_validator("dictionaries")
    @classmethod
    def _unique_names(cls, dictionaries: list[DictionaryConfig]) -> list[DictionaryConfig]:
        names = [d.display_name() for d in dictionaries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidRequest(f"dictionary names must be unique; set `name` on the ones called {duplicates}")
        check_dictionary_names(names)
        return dictionaries

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.steps is not None and self.tokens is not None:
            raise InvalidRequest("set steps or tokens, not both")
        if self.batch_size % max(self.workers, 1):
            raise InvalidRequest(f"batch_size={self.batch_size} must be divisible by workers={self.workers}")
        if not self.data.targets and any(d.skip_connection for d in self.dictionaries):
            raise InvalidRequest("skip_connection is for transcoders: set data.targets to the output hook's store")
        return self

    @property
    def output_uri(self) -> str:
        return self.output or storage.join(storage.absolute(self.runs), self.name, "dictionaries")
