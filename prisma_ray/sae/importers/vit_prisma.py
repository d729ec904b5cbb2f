"""ViT-Prisma checkpoints: `config.json` + a pickled state dict (`weights.pt`, `n_images_*.pt`, ...).

SAEs encode `act((x - b_dec) @ W_enc + b_enc)` and decode `f @ W_dec + b_dec` (relu, or topk with
`activation_fn_kwargs.k`). Transcoders centre the input on `b_dec` and decode with `b_dec_out`; with
a skip connection they add `x @ (I + W_skip).T`. The hook point is `hook_point`, or
`blocks.{hook_point_layer}.{layer_subtype}` (older versions always `hook_mlp_out`).
"""

from __future__ import annotations

import torch

from prisma_ray.errors import InvalidRequest

from .common import CheckpointImportError, Imported, SourceDir, fold_input_bias, require

FORMAT = "vit-prisma"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def weights_file(src: SourceDir) -> str | None:
    """The pickled weights of a ViT-Prisma directory (`weights.pt`, or its only pickled file)."""
    found = [f for f in src.files if f.endswith(PICKLE_SUFFIXES)]
    if WEIGHTS_FILE in found:
        return WEIGHTS_FILE
    if len(found) > 1:
        raise CheckpointImportError(f"{src.uri}: several pickled files {found}; keep only the checkpoint to import")
    return found[0] if found else None


def _layer(value: int | list[int]) -> int:
    if isinstance(value, list):
        if len(value) != 1:
            raise InvalidRequest(f"hook_point_layer={value}: one layer per dictionary can be imported")
        return value[0]
    return value


def _hooks(cfg: dict) -> tuple[str, str | None]:
    hook = cfg.get("hook_point") or (
        f"blocks.{_layer(cfg['hook_point_layer'])}.{cfg.get('layer_subtype', 'hook_mlp_out')}"
    )
    if not cfg.get("is_transcoder"):
        return hook, None
    out = cfg.get("out_hook_point") or (
        f"blocks.{_layer(cfg['out_hook_point_layer'])}.{cfg.get('layer_out_subtype', 'hook_mlp_out')}"
    )
    return hook, out


def _architecture(cfg: dict) -> tuple[str, int | None]:
    if cfg.get("normalize_activations") not in (None, "none", "null"):
        raise InvalidRequest(
            f"normalize_activations={cfg['normalize_activations']!r} normalises each token at run time, which "
            "a linear dictionary cannot hold; only checkpoints trained without it can be imported"
        )
    if cfg.get("hook_point_head_index") is not None:
        raise InvalidRequest("dictionaries on one attention head (hook_point_head_index) cannot be imported")
    arch = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", "relu")
    if arch == "jumprelu":
        return "jumprelu", None
    if arch != "standard" or activation not in ("relu", "topk"):
        raise InvalidRequest(
            f"architecture {arch!r} with activation {activation!r} cannot be imported (standard relu or "
            "topk and jumprelu can)"
        )
    if activation == "topk":
        return "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    return "relu", None


def read(src: SourceDir) -> Imported:
    cfg = src.read_json(CONFIG_FILE)
    try:
        arch, k = _architecture(cfg)
        hook, hook_out = _hooks(cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointImportError(f"{src.path(CONFIG_FILE)}: {e}") from None
    name = weights_file(src)
    if name is None:
        raise CheckpointImportError(
            f"{src.uri}: no pickled weights ({', '.join(PICKLE_SUFFIXES)}) beside {CONFIG_FILE}"
        )
    state = src.read_pickled_tensors(name)
    where = src.path(name)
    keys = ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
    transcoder, skip = hook_out is not None, bool(cfg.get("transcoder_with_skip_connection"))
    require(state, keys + (("b_dec_out",) if transcoder else ()) + (("W_skip",) if transcoder and skip else ()), where)
    weights = {key: state[key] for key in keys}
    if transcoder:
        weights = fold_input_bias(weights, state["b_dec"])
        weights["b_dec"] = state["b_dec_out"]
        if skip:
            weights["W_skip"] = torch.eye(*state["W_skip"].shape, dtype=torch.float64) + state["W_skip"].double()
    return Imported(
        format=FORMAT,
        architecture=arch,
        weights=weights,
        hook_name=hook,
        hook_name_out=hook_out,
        model_name=cfg.get("model_name") or "",
        k=k,
        transcoder=transcoder,
        skip=transcoder and skip,
    )
