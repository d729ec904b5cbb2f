"""ViT-Prisma checkpoints: `config.json` + a pickled state dict (`weights.pt`, `n_images_*.pt`, ...).

SAEs encode `act((x - b_dec) @ W_enc + b_enc)` and decode `f @ W_dec + b_dec` (relu, or topk with
`activation_fn_kwargs.k`). Transcoders centre the input on `b_dec` and decode with `b_dec_out`; with
a skip connection some ViT-Prisma versions add `x @ (I + W_skip).T` and others `x @ W_skip.T`, and
neither the config nor the weights record which. `skip_includes_identity` says it; without it, the
import decides only where `W_skip` leaves one answer plausible (see `skip_includes_identity`) and
refuses otherwise. The hook point is `hook_point`, or `blocks.{hook_point_layer}.{layer_subtype}`
(older versions always `hook_mlp_out`).
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


SKIP_TOLERANCE = 0.25
"""How close (root mean square over rows of the difference) a skip map must be to 0 or to I to count as one."""
SKIP_OPTION = "skip_includes_identity (CLI: --skip-includes-identity or --no-skip-includes-identity)"


def _zero_or_identity(m: torch.Tensor) -> bool:
    """Whether the square map `m` is within `SKIP_TOLERANCE` of 0 or of the identity (where learned skips end)."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return min(float(m.norm()), float((m - eye).norm())) <= SKIP_TOLERANCE * m.shape[0] ** 0.5


def skip_includes_identity(w_skip: torch.Tensor, given: bool | None, where: str) -> tuple[bool, str | None]:
    """Whether the source's skip connection is `x @ (I + W_skip).T` (True) or `x @ W_skip.T` (False), and a
    note saying how that was decided (None when `given`).

    `given` (the user's `skip_includes_identity`) wins, except that a `W_skip` that is not square cannot
    have the identity added (refused if `given` says it was). Otherwise a `W_skip` close to I is the
    whole map (adding I would double the input); one close to -I is added to I (alone it would negate
    the input). Anything else (close to 0, where both readings are plausible, or far from 0 and I)
    raises `CheckpointImportError` naming the option.
    """
    shape = tuple(w_skip.shape)
    if shape[0] != shape[1]:
        if given:
            raise CheckpointImportError(
                f"{where}: skip_includes_identity is true but W_skip is {shape}, not square: no identity can be "
                "added to it"
            )
        note = f"W_skip is {shape}, not square: no identity can be added to it, so it is used as saved"
        return False, None if given is False else note
    if given is not None:
        return given, None
    w = w_skip.double()
    as_saved, plus_identity = (
        _zero_or_identity(w),
        _zero_or_identity(torch.eye(shape[0], dtype=w.dtype, device=w.device) + w),
    )
    if as_saved and not plus_identity:
        return False, (
            "W_skip is close to the identity, so it is taken as the whole skip map (x @ W_skip.T; adding the "
            f"identity would double the input); set {SKIP_OPTION} if that is wrong"
        )
    if plus_identity and not as_saved:
        return True, (
            "W_skip is close to minus the identity, so it is taken as added to it (x @ (I + W_skip).T; alone it "
            f"would negate the input); set {SKIP_OPTION} if that is wrong"
        )
    raise CheckpointImportError(
        f"{where}: a skip transcoder, and its W_skip does not tell whether the ViT-Prisma version that trained "
        "it added the identity (x @ (I + W_skip).T, some versions) or not (x @ W_skip.T, others); set "
        f"{SKIP_OPTION} (true: the identity is added)"
    )


def read(src: SourceDir, skip_identity: bool | None = None) -> Imported:
    """The dictionary in `src`; `skip_identity` is the user's `skip_includes_identity` (skip transcoders)."""
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
    identity, notes = None, ()
    if transcoder:
        weights = fold_input_bias(weights, state["b_dec"])
        weights["b_dec"] = state["b_dec_out"]
        if skip:
            identity, note = skip_includes_identity(state["W_skip"], skip_identity, where)
            notes = () if note is None else (note,)
            w_skip = state["W_skip"].double()
            weights["W_skip"] = (
                torch.eye(*w_skip.shape, dtype=w_skip.dtype, device=w_skip.device) + w_skip if identity else w_skip
            )
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
        skip_includes_identity=identity,
        notes=notes,
    )
