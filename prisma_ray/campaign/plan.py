"""The campaign's plan (pure; no Ray, no model built): the selected models, each one's hook points and data,
and the configs of its stages, which are the library's own jobs (`run_extract`, `run_training`, `run_sweep`,
`run_interpret`) with their outputs under the campaign's `output`."""

from __future__ import annotations

from dataclasses import dataclass

from .. import storage
from ..data.sources import DatasetSpec, SyntheticSource
from ..evaluate import EvalConfig
from ..evaluate.sweep import ModelSelection, SweepConfig
from ..extract.config import ExtractConfig
from ..interpret.collect import InterpretConfig
from ..models import ModelEntry, get_entry
from ..runtime.pool import Resources, ShardResources, TrainResources
from ..store import store_uri
from ..train.config import TrainConfig, TrainData
from .config import CampaignConfig, Entry, Splits

SPLITS = ("train", "test")


def block_at_depth(blocks: int, depth: float) -> int:
    """The block nearest relative depth `depth` in [0, 1] of a model of `blocks` blocks: round(depth x blocks)
    (halves up), at most the last; 0.5 is the middle block `models.default_hook` reads (6 of 12)."""
    return min(int(depth * blocks + 0.5), blocks - 1)


def hooks_of(cfg: CampaignConfig, entry: ModelEntry) -> list[str]:
    """`entry`'s hook points: `cfg.hooks` by name, then the residual stream after the block nearest each of
    `cfg.depths` (default [0.5] when neither is given). Multimodal models: the language model's blocks (`lm.*`,
    `config.text_config.num_hidden_layers`), the stream whose tokens extraction stores."""
    depths = cfg.depths or ([] if cfg.hooks else [0.5])
    prefix, blocks = "", entry.layers
    if entry.modality == "multimodal":
        prefix, blocks = "lm.", int(entry.config["text_config"]["num_hidden_layers"])
    named = [f"{prefix}blocks.{block_at_depth(blocks, d)}.hook_resid_post" for d in depths]
    return list(dict.fromkeys([*cfg.hooks, *named]))


def sized(spec: DatasetSpec, entry: ModelEntry) -> DatasetSpec:
    """Synthetic `spec` generated at `entry`'s input size with one ground-truth cell per patch, under its own URI
    (`<uri>-<size>px-<patch>`); clips of a video model get at least the frames one sample takes
    (`<uri>-<size>px-<patch>-<frames>f`: TimeSformer-L samples 96 frames, V-JEPA 2 64)."""
    assert isinstance(spec, SyntheticSource)
    grid = entry.image_size // entry.patch_size
    update: dict = {"image_size": entry.image_size, "patch_grid": (grid, grid)}
    uri = f"{spec.uri}-{entry.image_size}px-{entry.patch_size}"
    frames = getattr(spec.generator, "num_frames", None)
    if frames is not None and entry.frames and entry.frames > frames:
        update["num_frames"] = entry.frames
        uri += f"-{entry.frames}f"
    return spec.model_copy(update={"uri": uri, "generator": spec.generator.model_copy(update=update)})


@dataclass(frozen=True)
class ModelPlan:
    """One entry of the campaign (a model, or an entry of `entries`): its model's registry entry, hook points, data
    splits (`dashboard`: what its dashboard shows), settings, outputs' root and the configs of its stages."""

    entry: ModelEntry
    hooks: tuple[str, ...]
    data: dict[str, DatasetSpec]
    extracts: tuple[ExtractConfig, ...]
    trains: tuple[TrainConfig, ...]
    sweep: SweepConfig
    label: str
    root: str
    settings: Entry

    @property
    def name(self) -> str:
        """The registry name of the model."""
        return self.entry.name

    def interpret_uri(self) -> str:
        """Where the interpretation of its best dictionary goes: `<root>/interpret/<model>`."""
        return storage.join(self.root, "interpret", self.name)

    def interpret(self, cfg: CampaignConfig, checkpoint: str, device: str, threads: int | None) -> InterpretConfig:
        """The interpretation of `checkpoint` on this entry's dashboard data (default: its test data), under
        `<root>/interpret/<model>`: the model rebuilt as extraction ran it (weights, seed, dtype)."""
        extract = self.extracts[0]
        return InterpretConfig(
            checkpoint=checkpoint,
            pretrained=extract.pretrained,
            seed=extract.seed,
            weights=extract.weights,
            model_dtype=extract.model_dtype,
            dataset=self.data.get("dashboard", self.data["test"]),
            output=self.interpret_uri(),
            storage=cfg.storage,
            k=8,
            shard_size=extract.shard_size,
            resources=_shard_resources(device, threads),
            progress=False,
            ray=cfg.ray,
        )


def splits_of(cfg: CampaignConfig, entry: ModelEntry) -> Splits | None:
    """The data of `entry`'s modality (multimodal models read images); None where the config has none."""
    return cfg.data.get("image" if entry.modality == "multimodal" else entry.modality)


def plan_model(cfg: CampaignConfig, name: str, device: str = "cpu", threads: int | None = None) -> ModelPlan:
    """The stages of `name` (a model, or an entry of `cfg.entries`) run by an actor on `device` with `threads`
    torch threads (None: torch's default). Raises `InvalidRequest` where neither the entry nor the config has data
    of the model's modality."""
    from ..errors import InvalidRequest

    settings = cfg.entry(name)
    entry = get_entry(settings.model)
    splits = settings.data or splits_of(cfg, entry)
    if splits is None:
        raise InvalidRequest(
            f"{name} is a {entry.modality} model but `data` has no {entry.modality} entry; add data.{entry.modality} "
            "(train and test), or the entry's own data, or leave the model out"
        )
    data = {s: sized(getattr(splits, s), entry) if splits.at_model_size else getattr(splits, s) for s in SPLITS}
    if settings.dashboard_data is not None:
        data["dashboard"] = settings.dashboard_data
    hooks = tuple(settings.hooks or hooks_of(cfg, entry))
    root = cfg.root_uri(settings.root)
    weights = settings.weights
    extracts = tuple(
        ExtractConfig(
            model=entry.name,
            pretrained=weights.pretrained,
            weights=weights.checkpoint,
            seed=weights.seed,
            hooks=list(hooks),
            tokens=settings.tokens,
            dataset=data[split],
            split=split,
            output=storage.join(root, "activations"),
            storage=cfg.storage,
            shard_size=settings.shard_size,
            resources=_shard_resources(device, threads),
            progress=False,
            ray=cfg.ray,
        )
        for split in SPLITS
    )
    trains = tuple(_train_config(cfg, settings, root, hook, device, threads) for hook in hooks)
    own = [storage.join(root, "dictionaries", entry.name)]
    sweep = sweep_config(cfg, own, threads, settings.root, [entry.name], cross_model=False)
    return ModelPlan(entry, hooks, data, extracts, trains, sweep, name, root, settings)


def plan_campaign(cfg: CampaignConfig) -> list[str]:
    """What the campaign runs, sorted: the selected models and the entries (an unknown name or family raises,
    naming it)."""
    return cfg.names()


def _shard_resources(device: str, threads: int | None) -> ShardResources:
    """One model in the calling actor (`runtime.pool.inline`): its device and threads."""
    return ShardResources(actors=1, device=device, torch_threads=threads)


def _train_config(
    cfg: CampaignConfig, settings: Entry, root: str, hook: str, device: str, threads: int | None
) -> TrainConfig:
    """The grid of the entry's dictionaries on the same batches of its model's train store at `hook`, trained in the
    calling actor (`workers: 0`); dictionaries under `<root>/dictionaries/<model>/<hook>/<name>`."""
    model = settings.model
    return TrainConfig(
        name=hook,
        runs=storage.join(root, "runs", model),
        output=storage.join(root, "dictionaries", model, hook),
        storage=cfg.storage,
        data=TrainData(inputs=[store_uri(storage.join(root, "activations"), model, hook, "train")]),
        dictionaries=settings.dictionaries,
        batch_size=cfg.batch_size,
        tokens=cfg.training_tokens,
        epochs=settings.epochs,
        log_every=50,
        checkpoint_every=500,
        workers=0,
        resources=TrainResources(device=device, torch_threads=threads),
        ray=cfg.ray,
    )


def sweep_config(
    cfg: CampaignConfig,
    checkpoints: list[str],
    threads: int | None = None,
    root: str = "",
    models: list[str] | None = None,
    cross_model: bool = True,
) -> SweepConfig:
    """The sweep of the dictionaries under `checkpoints` into the one sweep output of `root` (`<root>/sweep`; the
    campaign's own by default: every model's results side by side, so the last sweep over all of them evaluates
    nothing twice), of `models` only (default: the models run under `root`; dictionaries of models left out of the
    config stay out of its leaderboard). `cross_model=False` (one model's own sweep) leaves the cross-model page,
    which compares every pair of the root's models, to the campaign's last sweep of the root: written by each model
    in turn, it made a campaign's evaluations quadratic in its models. The evaluation's device stays `auto` (the actor's GPU where it has one): it
    is part of what the sweep output records."""
    base = cfg.root_uri(root)
    tokens = next((cfg.entry(n).eval_tokens for n, e in cfg.entries.items() if e.root == root), cfg.eval_tokens)
    evaluation = EvalConfig(
        stores=storage.join(base, "activations"),
        split="test",
        max_tokens=tokens,
        ground_truth_tokens=tokens,
        splice_samples=cfg.splice_samples,
        storage=cfg.storage,
    )
    return SweepConfig(
        checkpoints=checkpoints,
        models=ModelSelection(names=cfg.root_models(root) if models is None else models),
        output=storage.join(base, "sweep"),
        evaluation=evaluation,
        resources=Resources(actors=1, torch_threads=threads),
        cross_model=cross_model,
        progress=False,
        ray=cfg.ray,
    )
