"""Import another tool's published dictionary: detect its layout, map its names onto ours, write
our checkpoint (`cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`))."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as save_safetensors

from ... import storage
from ...storage import MissingInputError, StorageOptions
from ..config import DictionaryConfig
from ..dictionary import Dictionary, Site, Sites
from ..io import (
    CFG_FILE,
    SPARSITY_FILE,
    as_float32,
    build_dictionary,
    export_files,
    saelens_architecture,
    write_files,
)
from . import saelens, sparsify, vit_prisma
from .common import CheckpointImportError, Imported, SourceDir
from .names import hook_name, module_hooks, registry_model

Format = Literal["auto", "vit-prisma", "saelens", "sparsify"]
READERS = {saelens.FORMAT: saelens.read, sparsify.FORMAT: sparsify.read, vit_prisma.FORMAT: vit_prisma.read}


class ImportConfig(BaseModel):
    """One import: published files in `source`, our checkpoint written to `output`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="directory of the published files (local path or s3://)")
    output: str = Field(description="checkpoint directory to write (local path or s3://); must not hold one yet")
    format: Format = Field("auto", description="layout of `source`: vit-prisma, saelens, sparsify or auto (detected)")
    model: str | None = Field(
        None,
        description="model the dictionary reads (registry name or the source's own "
        "name); default: the one the source files name",
    )
    skip_includes_identity: bool | None = Field(
        None,
        description="ViT-Prisma skip transcoders: true if the source computes x @ (I + W_skip).T (some ViT-Prisma "
        "versions), false if x @ W_skip.T (others); the checkpoint does not record it. Default: decided from "
        "W_skip where only one is plausible, else the import is refused",
    )
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `source` and `output` on s3://")


class ImportResult(BaseModel):
    """What was imported, and under which of our names."""

    format: str
    source: str
    output: str
    kind: str
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    model: str
    hook_name: str
    hook_name_out: str | None
    notes: list[str]


def detect_format(src: SourceDir) -> str:
    """The layout of the files in `src`; raises naming what each layout needs when none matches."""
    files = set(src.files)
    if set(saelens.FILES) <= files:
        return saelens.FORMAT
    if set(sparsify.FILES) <= files:
        return sparsify.FORMAT
    if vit_prisma.CONFIG_FILE in files and vit_prisma.weights_file(src):
        return vit_prisma.FORMAT
    raise CheckpointImportError(
        f"{src.uri}: no known checkpoint layout among its files {sorted(files)}. Expected SAELens "
        f"({' + '.join(saelens.FILES)}), sparsify ({' + '.join(sparsify.FILES)}, in the hook's own directory) "
        f"or ViT-Prisma ({vit_prisma.CONFIG_FILE} + {vit_prisma.WEIGHTS_FILE} or another "
        f"{'/'.join(vit_prisma.PICKLE_SUFFIXES)} file)"
    )


def _hook_names(imp: Imported) -> tuple[str, str | None, list[str]]:
    """Our `(input hook, output hook or None, notes)` for the hook names of `imp`."""
    if imp.transcoder and imp.hook_name_out is None:  # sparsify: the input and output of a module
        pairs = list(zip((f"{imp.hook_name}.input", f"{imp.hook_name}.output"), module_hooks(imp.hook_name)))
    else:
        theirs = (imp.hook_name, imp.hook_name_out) if imp.transcoder else (imp.hook_name,)
        pairs = [(name, hook_name(name)) for name in theirs]
    notes = [
        f"hook {name!r} has no equivalent among our hook points; kept as named" for name, ours in pairs if ours is None
    ]
    names = [ours or name for name, ours in pairs]
    return names[0], (names[1] if len(names) > 1 else None), notes


def _model_name(imp: Imported, model: str | None) -> tuple[str, list[str]]:
    theirs = model or imp.model_name
    if not theirs:
        return "", ["the source does not name its model; pass --model"]
    ours = registry_model(theirs)
    return ours or theirs, [] if ours else [f"model {theirs!r} is not in the registry; kept as named"]


def convert(imp: Imported, source: str, model: str | None = None) -> tuple[Dictionary, list[str]]:
    """Our dictionary for `imp` (read from `source`), and notes on names it could not map."""
    shapes = {key: tuple(imp.weights[key].shape) for key in ("W_enc", "W_dec")}
    if any(len(shape) != 2 for shape in shapes.values()):
        raise CheckpointImportError(f"{source}: W_enc and W_dec must be matrices, found shapes {shapes}")
    if imp.architecture == "topk" and imp.k is None:
        raise CheckpointImportError(f"{source}: a TopK dictionary whose config does not say k")
    hook_in, hook_out, hook_notes = _hook_names(imp)
    model_name, model_notes = _model_name(imp, model)
    d_in, d_sae = imp.weights["W_enc"].shape
    d_out = imp.weights["W_dec"].shape[1]
    inputs = (Site(name=hook_in, width=d_in, model=model_name),)
    outputs = (Site(name=hook_out, width=d_out, model=model_name),) if hook_out is not None else ()
    try:
        cfg = DictionaryConfig(
            architecture=imp.architecture, d_sae=d_sae, k=imp.k, skip_connection=imp.skip, decoder_norm="free"
        )
        d = build_dictionary(cfg, Sites(inputs=inputs, outputs=outputs), imp.weights, f"{imp.format} weights")
    except ValueError as e:
        raise CheckpointImportError(f"{source}: {e}") from e
    return d, hook_notes + model_notes + list(imp.notes)


def import_files(cfg: ImportConfig) -> tuple[dict[str, bytes], ImportResult]:
    """`{file name: bytes}` of our checkpoint for `cfg.source`, and what was imported (no writes)."""
    src = SourceDir.open(cfg.source, cfg.storage)
    fmt = detect_format(src) if cfg.format == "auto" else cfg.format
    if cfg.skip_includes_identity is not None and fmt != vit_prisma.FORMAT:
        raise CheckpointImportError(
            f"{src.uri}: skip_includes_identity applies to ViT-Prisma skip transcoders, not to a {fmt} checkpoint; "
            "remove it"
        )
    try:
        imp = vit_prisma.read(src, cfg.skip_includes_identity) if fmt == vit_prisma.FORMAT else READERS[fmt](src)
    except RuntimeError as e:  # torch: tensors of shapes that do not fit together
        raise CheckpointImportError(f"{src.uri}: tensors of unexpected shapes ({e})") from e
    d, notes = convert(imp, src.uri, cfg.model)
    origin = {
        "format": fmt,
        "source": src.uri,
        "model_name": imp.model_name,
        "hook_name": imp.hook_name,
        "hook_name_out": imp.hook_name_out,
        **({} if imp.skip_includes_identity is None else {"skip_includes_identity": imp.skip_includes_identity}),
    }
    files = export_files(d, extra={"imported_from": origin})
    if imp.sparsity is not None:
        if imp.sparsity.shape != (d.n_latents,):
            raise CheckpointImportError(
                f"{src.path(SPARSITY_FILE)}: shape {tuple(imp.sparsity.shape)}, expected ({d.n_latents},)"
            )
        files[SPARSITY_FILE] = save_safetensors(as_float32({"sparsity": imp.sparsity}, src.path(SPARSITY_FILE)))
    sites = d.sites
    result = ImportResult(
        format=fmt,
        source=src.uri,
        output=cfg.output,
        kind=sites.kind,
        architecture=saelens_architecture(d.cfg, sites),
        d_in=sites.d_in,
        d_sae=d.n_latents,
        d_out=sites.d_out,
        model=sites.inputs[0].model,
        hook_name=sites.inputs[0].name,
        hook_name_out=None if sites.autoencoder else sites.targets[0].name,
        notes=notes,
    )
    return files, result


def import_dictionary(cfg: ImportConfig) -> ImportResult:
    """Convert `cfg.source` and write our checkpoint to `cfg.output` (which must not hold one yet)."""
    if _exists(storage.join(cfg.output, CFG_FILE), cfg.storage):
        raise CheckpointImportError(
            f"{cfg.output}: already holds a checkpoint; choose another output (nothing was written)"
        )
    files, result = import_files(cfg)
    write_files(files, cfg.output, cfg.storage)
    return result


def _exists(uri: str, options: StorageOptions) -> bool:
    storage.require_bucket(uri, options)
    try:
        storage.require_exists(uri, options)
    except MissingInputError:
        return False
    return True
