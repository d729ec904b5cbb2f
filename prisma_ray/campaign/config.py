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
from ..models import get_entry
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


class Entry(BaseModel):
    """One campaign entry with its own settings (each unset one is the campaign's): a registry model on its own data,
    hooks, dictionaries and training length, its dashboard over data of its own and, with `explain`, the offline
    explainer on the dashboard's latents. With `root`, everything of the entry goes under `output/<root>` (its own
    stores, dictionaries, sweep and leaderboard, apart from the campaign's), so that one model can be two entries
    on two datasets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="registry name of the model (default: the entry's name)")
    weights: Weights | None = Field(None, description="its weights (default: the campaign's for this model)")
    data: Splits | None = Field(None, description="its train and test data (default: the campaign's of its modality)")
    dashboard_data: DatasetSpec | None = Field(
        None, description="the data its dashboard shows (default: the test split)"
    )
    hooks: list[str] | None = Field(None, description="hook points by name (default: the campaign's hooks/depths)")
    tokens: TokenSelection | None = Field(None, description="which tokens are stored")
    dictionaries: list[DictionaryConfig] | None = Field(None, min_length=1, description="its dictionary grid")
    epochs: float | None = Field(None, gt=0, description="passes over its training store")
    eval_tokens: int | None = Field(None, ge=1, description="held-out tokens evaluated (one value per root)")
    shard_size: int | None = Field(None, ge=1, description="samples per extraction shard")
    dashboard_latents: int | None = Field(None, ge=1, description="latents with a page in its dashboard")
    explain: bool = Field(
        False,
        description="explain its dashboard's latents and its detector latents (ground truth, AUROC >= 0.95) with the "
        "offline explainer (`prisma-ray explain`), into its interpretation's explanations.jsonl",
    )
    root: str = Field("", description="sub-folder of `output` for all of its outputs (empty: the campaign's own)")

    @field_validator("hooks")
    @classmethod
    def _distinct_hooks(cls, hooks: list[str] | None) -> list[str] | None:
        return None if hooks is None else require_distinct(hooks, "hooks")

    @field_validator("root")
    @classmethod
    def _relative_root(cls, root: str) -> str:
        if root.startswith("/") or "://" in root or ".." in root.split("/"):
            raise InvalidRequest(f"entry root {root!r} must be a relative sub-folder of `output` (e.g. real)")
        return root.strip("/")


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
    models: ModelSelection = Field(
        ModelSelection(), description="the models: registry `names` plus every model of the filters given"
    )
    entries: dict[str, Entry] = Field(
        default_factory=dict,
        description="entries with settings of their own, by entry name (a model of `models` with the same name, "
        "and no root, is run as its entry)",
    )
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

    @model_validator(mode="after")
    def _entries(self) -> CampaignConfig:
        if not self.entries and self.models == ModelSelection():
            raise InvalidRequest("the campaign has no model: give models (names or filters) or entries")
        seen: dict[tuple[str, str], str] = {}
        sweeps: dict[str, tuple[int, str]] = {"": (self.eval_tokens, "the campaign")}
        for name, entry in self.entries.items():
            model = self.model_of(name)
            other = seen.setdefault((entry.root, model), name)
            if other != name:
                raise InvalidRequest(
                    f"entries {other} and {name} both run {model} under root {entry.root!r}; give one a root of its own"
                )
            tokens, first = sweeps.setdefault(entry.root, (self.entry(name).eval_tokens, name))
            if tokens != self.entry(name).eval_tokens:
                raise InvalidRequest(
                    f"entries {first} and {name} share root {entry.root!r} (one sweep) but evaluate {tokens} and "
                    f"{self.entry(name).eval_tokens} tokens; give them one eval_tokens or roots of their own"
                )
        return self

    def names(self) -> list[str]:
        """What the campaign runs, sorted: every selected model not run as an entry, and every entry's name (an
        unknown model name or family raises, naming it)."""
        selected = self.models.resolve() if self.models != ModelSelection() else []
        for name, entry in self.entries.items():
            model = get_entry(self.model_of(name)).name
            if not entry.root and model != name and model in selected:
                raise InvalidRequest(
                    f"entry {name} runs {model}, which `models` selects too, under the same root; name the entry "
                    f"{model} (its settings then apply to it) or give it a root"
                )
        return sorted({*selected, *self.entries})

    def model_of(self, name: str) -> str:
        """The registry model that `name` (a model or an entry's name) runs."""
        entry = self.entries.get(name)
        return (entry.model if entry is not None else None) or name

    def entry(self, name: str) -> Entry:
        """The settings of `name` (an entry's or a selected model's), every unset one filled in from the campaign."""
        given, model = self.entries.get(name, Entry()), self.model_of(name)
        fill = {
            "model": model,
            "weights": self.weights_of(model),
            "tokens": self.tokens,
            "dictionaries": self.dictionaries,
            "epochs": self.epochs,
            "eval_tokens": self.eval_tokens,
            "shard_size": self.shard_size,
            "dashboard_latents": self.dashboard_latents,
        }
        return given.model_copy(update={k: v for k, v in fill.items() if getattr(given, k) is None or k == "model"})

    def roots(self) -> list[str]:
        """The output roots: the campaign's own (`""`) first, then each entry's own `root`, in order."""
        return list(dict.fromkeys(["", *(e.root for e in self.entries.values())]))

    def root_uri(self, root: str = "") -> str:
        """The URI of output root `root` (`""`: the campaign's own, `output`)."""
        return self.uri(root) if root else self.uri()

    def root_models(self, root: str = "") -> list[str]:
        """The registry models run under `root` (the campaign's own by default): those its sweep keeps to."""
        return sorted({self.model_of(n) for n in self.names() if self.entries.get(n, Entry()).root == root})

    def uri(self, *parts: str) -> str:
        """`output`/`parts` as an absolute URI."""
        return storage.join(storage.absolute(self.output), *parts)

    def weights_of(self, model: str) -> Weights:
        """The weights `model` runs with."""
        return self.model_weights.get(model, self.weights)
