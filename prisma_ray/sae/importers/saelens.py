"""SAELens checkpoints (`cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`)).

SAELens 6 keeps the model and hook under `metadata`, earlier versions at the top level with the
activation in `activation_fn_str` / `activation_fn_kwargs`. Differences from our conventions are
folded into the weights: `apply_b_dec_to_input` (into the encoder bias) and a fine-tuning
`scaling_factor` (into the decoder rows).
"""

from __future__ import annotations

from prisma_ray.errors import InvalidRequest

from ..io import SPARSITY_FILE, WEIGHTS_FILE, _parse_architecture, saelens_hooks
from .common import CheckpointImportError, Imported, SourceDir, fold_input_bias, require

FORMAT = "saelens"
CFG_FILE = "cfg.json"
FILES = (CFG_FILE, WEIGHTS_FILE)


def _architecture_name(cfg: dict) -> str:
    """The SAELens 6 architecture name of a `cfg.json` of any SAELens version."""
    arch = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if arch == "standard" and activation == "topk":
        return "topk"
    if activation not in ("relu", "topk"):
        raise InvalidRequest(f"activation {activation!r} has no equivalent here (relu and topk do)")
    return arch


def _refuse_unsupported(cfg: dict, meta: dict) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise InvalidRequest(
            f"normalize_activations={norm!r} rescales inputs at run time; only 'none' can be imported "
            "(fold the scaling into the weights with SAELens first)"
        )
    if meta.get("hook_head_index", cfg.get("hook_head_index")) is not None:
        raise InvalidRequest("dictionaries on one attention head (hook_head_index) cannot be imported")
    if cfg.get("reshape_activations", "none") != "none":
        raise InvalidRequest(f"reshape_activations={cfg['reshape_activations']!r} cannot be imported")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise InvalidRequest("rescale_acts_by_decoder_norm=true cannot be imported")


def read(src: SourceDir) -> Imported:
    cfg = src.read_json(CFG_FILE)
    meta = cfg.get("metadata") or {}
    try:
        _refuse_unsupported(cfg, meta)
        arch, transcoder, skip = _parse_architecture(_architecture_name(cfg))
        model_name, hook, hook_out = saelens_hooks(cfg, transcoder)
    except ValueError as e:
        raise CheckpointImportError(f"{src.path(CFG_FILE)}: {e}") from None
    weights = src.read_safetensors(WEIGHTS_FILE)
    require(weights, ("W_enc", "W_dec", "b_dec"), src.path(WEIGHTS_FILE))
    if "scaling_factor" in weights:
        scale = weights.pop("scaling_factor")
        weights["W_dec"] = weights["W_dec"].double() * scale.double()[:, None]
    applies_b_dec = cfg.get("apply_b_dec_to_input", not transcoder)
    if applies_b_dec and transcoder and weights["b_dec"].shape != weights["W_enc"].shape[:1]:
        raise CheckpointImportError(
            f"{src.path(CFG_FILE)}: apply_b_dec_to_input=true on a transcoder whose input and output widths differ"
        )
    if applies_b_dec and transcoder:
        weights = fold_input_bias(weights, weights["b_dec"])
    elif not applies_b_dec and not transcoder:
        weights = fold_input_bias(weights, -weights["b_dec"])
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    sparsity = src.read_safetensors(SPARSITY_FILE).get("sparsity") if SPARSITY_FILE in src.files else None
    return Imported(
        format=FORMAT,
        architecture=arch,
        weights=weights,
        hook_name=hook or "",
        hook_name_out=hook_out,
        model_name=model_name,
        k=k if arch == "topk" else None,
        transcoder=transcoder,
        skip=skip,
        sparsity=sparsity,
    )
