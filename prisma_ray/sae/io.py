"""Checkpoints in SAELens's layout: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`).

Exported weights act on raw activations: the input normalisation is folded into the weights
(in float64), so SAELens's `SAE.load_from_disk` runs them with `normalize_activations="none"`.
Names and shapes follow SAELens 6: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, `b_enc`,
`b_dec`, `threshold` (JumpReLU, and BatchTopK and Matryoshka BatchTopK, which export as JumpReLU like SAELens does),
`b_gate`/`r_mag`/`b_mag` (gated), `W_skip [d_out, d_in]` (skip transcoders). Architectures SAELens
has no class for (TopK and gated transcoders) load here only. Loading reads JSON and safetensors:
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import storage
from ..errors import InvalidRequest, PrismaRayError
from .config import BATCHTOPK_ARCHITECTURES, DictionaryConfig
from .dictionary import Dictionary, Site, Sites
from .trainer import Trainer

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_FORMAT_VERSION = "6.0.0"


class CheckpointConfigError(PrismaRayError, ValueError):
    """A `cfg.json` that does not describe a dictionary this library can load; the message names it and the key."""


class CheckpointFileError(PrismaRayError, ValueError):
    """A checkpoint's tensor file that is not a readable safetensors file (truncated, or not safetensors)."""


def read_tensors(uri: str, options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `uri` (never unpickled). Raises `CheckpointFileError` naming it."""
    try:
        return load_safetensors(storage.read_bytes(uri, options))
    except SafetensorError as exc:
        raise CheckpointFileError(f"{uri}: not a readable safetensors file ({exc}); rewrite the checkpoint") from exc


_SAE_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
_TRANSCODER_PREFIX = {
    "relu": "",
    "topk": "topk_",
    "batchtopk": "jumprelu_",
    "matryoshka_batchtopk": "jumprelu_",
    "jumprelu": "jumprelu_",
    "gated": "gated_",
}


def saelens_architecture(cfg: DictionaryConfig, sites: Sites) -> str:
    """The `architecture` written to `cfg.json` for an exported dictionary."""
    if sites.autoencoder:
        return _SAE_ARCH[cfg.architecture]
    return f"{_TRANSCODER_PREFIX[cfg.architecture]}{'skip_' if cfg.skip_connection else ''}transcoder"


def _parse_architecture(name: str) -> tuple[str, bool, bool]:
    """`(architecture, transcoder, skip)` of a `cfg.json` architecture name."""
    for ours, theirs in _SAE_ARCH.items():
        if name == theirs and ours not in BATCHTOPK_ARCHITECTURES:
            return ours, False, False
    for ours, prefix in _TRANSCODER_PREFIX.items():
        if ours in BATCHTOPK_ARCHITECTURES:
            continue
        for skip in (False, True):
            if name == f"{prefix}{'skip_' if skip else ''}transcoder":
                return ours, True, skip
    raise InvalidRequest(f"cfg.json architecture {name!r} is not one this library can load")


@torch.no_grad()
def inference_weights(d: Dictionary) -> dict[str, torch.Tensor]:
    """The weights of `d` with its normalisation folded in, as SAELens names them (float32, on the CPU whatever
    `d`'s device: folded there in float64)."""

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    p = {k: host(v) for k, v in d.named_parameters()}
    mu_in, s_in = host(d.in_mean), host(d.in_scale)
    mu_out, s_out = host(d.out_mean), host(d.out_scale)
    out = dict(p)
    out["W_enc"] = s_in[:, None] * p["W_enc"]
    out["W_dec"] = p["W_dec"] / s_out[None, :]
    out["b_dec"] = p["b_dec"] / s_out + mu_out
    if not d.sites.autoencoder:
        shift = (mu_in * s_in) @ p["W_enc"]
        if d.cfg.architecture == "gated":
            out["b_gate"] = p["b_gate"] - shift
            out["b_mag"] = p["b_mag"] - shift * p["r_mag"].exp()
        else:
            out["b_enc"] = p["b_enc"] - shift
        if d.cfg.skip_connection:
            out["W_skip"] = p["W_skip"] * s_in[None, :] / s_out[:, None]
            out["b_dec"] = out["b_dec"] - out["W_skip"] @ mu_in
    if d.cfg.architecture in BATCHTOPK_ARCHITECTURES:
        out["threshold"] = torch.full(  # host: exported weights are folded on the CPU
            (d.n_latents,), float(d.topk_threshold), dtype=torch.float64
        )
    site = d.sites.inputs[0]
    return as_float32(out, f"dictionary on {site.model} {site.name} (export)")


def as_float32(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`tensors` cast to contiguous float32. Raises `InvalidRequest` naming `where`, the tensors and their
    largest magnitude when the cast would turn a finite value into inf (beyond float32's range); NaN or inf
    already there are kept as they are (the cast does not make them)."""
    out = {k: v.float().contiguous() for k, v in tensors.items()}
    overflow = {
        k: float(tensors[k].double().abs().max())
        for k, v in out.items()
        if bool(torch.isinf(v).any()) and bool((torch.isinf(v) & torch.isfinite(tensors[k])).any())
    }
    if overflow:
        parts = "; ".join(f"{k} reaches magnitude {m:.6g}" for k, m in sorted(overflow.items()))
        raise InvalidRequest(
            f"{where}: weights {parts}, beyond float32's largest value {torch.finfo(torch.float32).max:.6g}; "
            "a float32 checkpoint cannot hold them"
        )
    return out


def cfg_dict(d: Dictionary, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `cfg.json` of an exported dictionary (SAELens 6 keys, ours under `metadata.prisma_ray`)."""
    sites = d.sites
    arch = saelens_architecture(d.cfg, sites)
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sites.d_in,
        "d_sae": d.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sites.autoencoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if not sites.autoencoder:
        cfg["d_out"] = sites.d_out
    if d.cfg.architecture == "topk":
        cfg.update(k=d.cfg.top_k, rescale_acts_by_decoder_norm=False)
    metadata = {
        "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": sites.inputs[0].model,
        "hook_name": sites.inputs[0].name,
        "prisma_ray": {
            "kind": sites.kind,
            "sites": sites.model_dump(),
            "config": d.cfg.model_dump(mode="json"),
            **(extra or {}),
        },
    }
    if not sites.autoencoder:
        metadata["hook_name_out"] = sites.targets[0].name
    cfg["metadata"] = metadata
    return cfg


def export_files(
    d: Dictionary, fire_counts: torch.Tensor | None = None, tokens: int = 0, extra: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """`{file name: bytes}` of a checkpoint directory for `d`; `sparsity.safetensors` holds the
    log10 firing frequency per latent over `tokens` tokens when `fire_counts` is given."""
    files = {
        CFG_FILE: json.dumps(cfg_dict(d, {"trained_tokens": tokens, **(extra or {})}), indent=1).encode(),
        WEIGHTS_FILE: save_safetensors(inference_weights(d)),
    }
    if fire_counts is not None:
        fire_counts = fire_counts.cpu()
        # log10 of a frequency in [1e-10, 1 + 1e-10]: in [-10, 1e-10], so the float32 cast cannot overflow
        density = (fire_counts.double() / max(tokens, 1) + 1e-10).log10().float()
        files[SPARSITY_FILE] = save_safetensors({"sparsity": density.contiguous()})
    return files


def write_files(files: dict[str, bytes], uri: str, options: storage.StorageOptions | None = None) -> None:
    """Write `{file name: bytes}` under the directory `uri` (local path or `s3://`)."""
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data, options)


def load_dictionary(checkpoint: str | CheckpointInfo, options: storage.StorageOptions | None = None) -> Dictionary:
    """The dictionary saved at `checkpoint` (a URI, or what `read_checkpoint_info` read there): ours, or a
    SAELens 6 checkpoint of a supported architecture. Raises `CheckpointConfigError` as `read_checkpoint_info`."""
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint_info(checkpoint, options)
    weights = read_tensors(storage.join(info.uri, WEIGHTS_FILE), options)
    return build_dictionary(info.config, info.sites, weights, info.uri)


def build_dictionary(cfg: DictionaryConfig, sites: Sites, weights: dict[str, torch.Tensor], where: str) -> Dictionary:
    """The dictionary `cfg` on `sites` with `weights` (SAELens 6 names, normalisation folded in);
    `where` names the weights in errors."""
    d = Dictionary(cfg, sites)
    weights = as_float32(weights, where)  # the parameters are float32: refuse what they cannot hold
    expected = d.state_dict()
    missing = set(expected) - set(weights) - {"in_mean", "in_scale", "out_mean", "out_scale"}
    unexpected = set(weights) - set(expected)
    wrong = {k: tuple(v.shape) for k, v in weights.items() if k in expected and v.shape != expected[k].shape}
    if missing or unexpected or wrong:
        raise InvalidRequest(
            f"{where}: the weights do not match architecture {saelens_architecture(cfg, sites)!r} "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)}, wrong shapes {wrong})"
        )
    d.load_state_dict(weights, strict=False)
    return d


def load_sparsity(uri: str, options: storage.StorageOptions | None = None) -> torch.Tensor:
    """The log10 firing frequency per latent saved beside a dictionary."""
    return read_tensors(storage.join(uri, SPARSITY_FILE), options)["sparsity"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as its `cfg.json` describes it: what loading builds and what discovery reports.

    `config` and `sites` are the dictionary its weights load as ((Matryoshka) BatchTopK exports as JumpReLU);
    `architecture` and `k` are those it was trained with, as our metadata records them. `seed` is its
    initialisation seed and `seed_group` a hash of everything else it was trained with (sites, dictionary
    config but for `seed` and `name`, trained tokens, token kinds): checkpoints sharing it differ only in
    seed (`evaluate.stability`). Both are None for checkpoints without our metadata.
    """

    uri: str
    name: str
    config: DictionaryConfig
    sites: Sites
    architecture: str
    k: int | None
    trained_tokens: int | None = None
    steps: int | None = None
    token_kinds: tuple[str, ...] | None = None
    seed: int | None = None
    seed_group: str | None = None

    @property
    def d_sae(self) -> int:
        return self.config.latents(self.sites.d_in)

    @property
    def kind(self) -> str:
        return self.sites.kind

    @property
    def models(self) -> tuple[str, ...]:
        """The models whose activations it reads or writes, sorted."""
        return tuple(sorted({s.model for s in (*self.sites.inputs, *self.sites.targets)}))

    def row(self) -> dict[str, Any]:
        """The descriptive columns of its metrics row."""
        return {
            "checkpoint": self.uri,
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "model": "+".join(self.models),
            "hook": "+".join(s.name for s in self.sites.inputs),
            "hook_out": "+".join(s.name for s in self.sites.targets),
            "d_in": self.sites.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "trained_tokens": self.trained_tokens,
            "steps": self.steps,
            "token_kinds": ",".join(self.token_kinds) if self.token_kinds else "all",
            "seed": self.seed,
            "seed_group": self.seed_group,
        }


def read_checkpoint_info(uri: str, options: storage.StorageOptions | None = None) -> CheckpointInfo:
    """Parse and check `<uri>/cfg.json` (ours, or SAELens 6 with `hook_name`/`model_name` metadata); reads no weights.

    Raises `MissingInputError` when it does not exist, `CheckpointConfigError` (naming the file and
    the key) when it does not describe a dictionary this library can load: a transcoder must name its
    output hook (`metadata.hook_name_out`), activations must not be normalised at run time.
    """
    cfg_uri = storage.join(uri, CFG_FILE)
    storage.require_exists(cfg_uri, options)
    try:
        cfg = json.loads(storage.read_bytes(cfg_uri, options))
        if not isinstance(cfg, dict):
            raise TypeError(f"a JSON {type(cfg).__name__}, not an object")
        return _checkpoint_info(cfg, uri, cfg_uri)
    except CheckpointConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise CheckpointConfigError(
            f"{cfg_uri}: not a dictionary checkpoint's cfg.json ({type(exc).__name__}: {exc})"
        ) from None


def saelens_hooks(cfg: dict[str, Any], transcoder: bool) -> tuple[str, str | None, str | None]:
    """`(model name, input hook, output hook)` a SAELens `cfg.json` names (under `metadata` since SAELens 6,
    at the top level before); `None` for a hook it does not name. Raises `InvalidRequest` when a
    transcoder does not name its output hook."""
    meta = cfg.get("metadata") or {}

    def named(key: str) -> Any:
        return meta.get(key) or cfg.get(key)

    hook_out = named("hook_name_out") if transcoder else None
    if transcoder and not hook_out:
        raise InvalidRequest(
            f"architecture {cfg.get('architecture')!r} is a transcoder, but metadata.hook_name_out (the hook "
            "point it predicts) is not set; add it to the cfg.json"
        )
    return named("model_name") or "", named("hook_name"), hook_out


def _checkpoint_info(cfg: dict[str, Any], uri: str, where: str) -> CheckpointInfo:
    if cfg.get("normalize_activations", "none") != "none":
        raise CheckpointConfigError(
            f"{where}: normalize_activations={cfg['normalize_activations']!r}; only checkpoints with the "
            "normalisation folded into the weights ('none') can be loaded"
        )
    try:
        arch, transcoder, skip = _parse_architecture(cfg["architecture"])
    except ValueError as e:
        raise CheckpointConfigError(f"{where}: {e}") from None
    if cfg.get("apply_b_dec_to_input", not transcoder) == transcoder:
        raise CheckpointConfigError(
            f"{where}: apply_b_dec_to_input={cfg['apply_b_dec_to_input']} is not supported for "
            f"{cfg['architecture']!r} (autoencoders subtract b_dec from the input, transcoders do not)"
        )
    ours = (cfg.get("metadata") or {}).get("prisma_ray") or {}
    trained = ours.get("config") or {}
    if "sites" in ours:
        sites = Sites.model_validate(ours["sites"])
        if sites.autoencoder == transcoder:
            raise CheckpointConfigError(
                f"{where}: architecture {cfg['architecture']!r} but metadata.prisma_ray.sites describes a {sites.kind}"
            )
    else:
        try:
            model, hook, hook_out = saelens_hooks(cfg, transcoder)
        except ValueError as e:
            raise CheckpointConfigError(f"{where}: {e}") from None
        inputs = (Site(name=hook or "input", model=model, width=cfg["d_in"]),)
        outputs = (Site(name=hook_out, model=model, width=cfg["d_out"]),) if transcoder else ()
        sites = Sites(inputs=inputs, outputs=outputs)
    fields: dict[str, Any] = {"architecture": arch, "d_sae": cfg["d_sae"], "skip_connection": skip}
    if arch == "topk":
        fields["k"] = cfg["k"]
    for key in ("decoder_norm", "name"):
        if trained.get(key):
            fields[key] = trained[key]
    config = DictionaryConfig(**fields)
    return CheckpointInfo(
        uri=uri,
        name=config.name or posixpath.basename(uri.rstrip("/")),
        config=config,
        sites=sites,
        architecture=trained.get("architecture") or arch,
        k=cfg.get("k") or trained.get("k"),
        trained_tokens=ours.get("trained_tokens"),
        steps=ours.get("steps"),
        token_kinds=tuple(ours["token_kinds"]) if ours.get("token_kinds") else None,
        seed=trained.get("seed"),
        seed_group=_seed_group(ours, sites) if trained else None,
    )


def _seed_group(ours: dict[str, Any], sites: Sites) -> str:
    """A hash of what a checkpoint was trained with but its seed and name (`sites`, `metadata.prisma_ray`)."""
    same = {
        "sites": sites.model_dump(mode="json"),
        "config": {k: v for k, v in ours["config"].items() if k not in ("seed", "name")},
        "trained_tokens": ours.get("trained_tokens"),
        "token_kinds": ours.get("token_kinds"),
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_META_FILE = "trainer_state.json"


def check_dictionary_names(names: Iterable[str]) -> None:
    """Raise `InvalidRequest` when one of `names` is that of a file a resumable checkpoint keeps beside the
    dictionaries' directories (`checkpoint_files`: `<name>/cfg.json`, ...)."""
    taken = sorted(set(names) & {STATE_TENSORS_FILE, STATE_META_FILE})
    if taken:
        raise InvalidRequest(
            f"dictionary names {taken} are those of the trainer state files a checkpoint holds beside the "
            "dictionaries; set another `name`"
        )


def dictionary_files(trainer: Trainer, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """`{"<dictionary name>/<file>": bytes}`: every dictionary of `trainer`, exported (with `extra` metadata)."""
    files = {}
    for name, d in trainer.dictionaries.items():
        exported = export_files(d, trainer.fire_counts[name], trainer.tokens, {"steps": trainer.step, **(extra or {})})
        files.update({f"{name}/{file}": data for file, data in exported.items()})
    return files


def checkpoint_files(trainer: Trainer, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A resumable checkpoint: the exact trainer state plus every dictionary exported (`dictionary_files`)."""
    check_dictionary_names(trainer.dictionaries)
    return {
        STATE_TENSORS_FILE: save_safetensors(trainer.state_tensors()),
        STATE_META_FILE: json.dumps(trainer.state_meta(), indent=1).encode(),
        **dictionary_files(trainer, extra),
    }


def latest_checkpoint_state(run: str, options: storage.StorageOptions | None = None) -> tuple[str, dict] | None:
    """The latest training checkpoint under a run folder (`<run>/checkpoint_<step>/`, as `prisma-ray train`
    writes them, local or s3://) and its trainer state meta (`state_meta`), or None when the run has none."""
    fs, path = storage.resolve(storage.absolute(run), options)
    steps = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        match = re.fullmatch(r"checkpoint_(\d+)", info.base_name)
        if match and info.type == pafs.FileType.Directory:
            steps[int(match[1])] = info.base_name
    for step in sorted(steps, reverse=True):
        uri = storage.join(run, steps[step])
        try:
            return uri, json.loads(storage.read_bytes(storage.join(uri, STATE_META_FILE), options))
        except FileNotFoundError:  # a checkpoint being written: Ray Train resumes from an earlier one
            continue
    return None


def restore_checkpoint(trainer: Trainer, directory: str) -> None:
    """Load into `trainer` the state saved by `checkpoint_files` under the local `directory`."""
    with open(os.path.join(directory, STATE_META_FILE), "rb") as f:
        meta = json.loads(f.read())
    with open(os.path.join(directory, STATE_TENSORS_FILE), "rb") as f:
        tensors = load_safetensors(f.read())
    trainer.load_state(tensors, meta)
