"""Activation patching between a clean and a corrupted input, one (layer, position) at a time.

With `heads=True` at a per-head site (`attn.hook_z`, `hook_q/k/v/result`) one head at a time instead,
at all (or the given) positions: a layer x head map. Noising puts the corrupted run's activation into the clean run; denoising the clean run's into the
corrupted run. The metric is the logit difference `LD = logit[clean class] - logit[corrupted
class]` (the classes each run predicts; if both predict the same class, the corrupted run's best
other class), normalised so that 0 is the receiving run's own LD and 1 the donor run's LD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from prisma_ray.errors import InvalidRequest

from ..models import HookedVisionModel
from ..models.hook_points import HEAD_SITES

Mode = Literal["noising", "denoising"]
Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class PatchingResult:
    """`effect [layers, positions]` (per head: `[layers, heads]`), normalised; the hook names patched (one per row),
    the positions patched (per head: all at once) and the classes compared."""

    effect: torch.Tensor
    hooks: list[str]
    positions: list[int]
    heads: list[int] | None
    clean_class: int
    corrupted_class: int
    clean_ld: float
    corrupted_ld: float
    mode: Mode


def site_hooks(model: HookedVisionModel, site: str, layers: list[int] | None = None) -> list[str]:
    """Hook names to patch: `site` itself if it names one hook point, else `blocks.{l}.{site}` for `layers`."""
    if site in model.hook_names:
        return [site]
    layers = list(range(model.n_layers)) if layers is None else layers
    names = [f"blocks.{l}.{site}" for l in layers]
    for name in names:
        model.hook_point(name)
    return names


def _classes(clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[int, int]:
    a = int(clean.argmax())
    order = corrupted.argsort(descending=True).tolist()
    return a, next(c for c in order if c != a)


def _position_axis(name: str) -> int:
    return 2 if name.endswith("hook_pattern") else 1


def _patch_one_per_row(donor: torch.Tensor, positions: list[int], axis: int) -> Callable:
    """Hook: batch row i gets the donor's activation at `positions[i]` (along the token axis `axis`)."""

    def hook(cur: torch.Tensor, _hook) -> torch.Tensor:
        out = cur.clone()
        for row, p in enumerate(positions):
            index = (row, slice(None), p) if axis == 2 else (row, p)
            out[index] = donor[(0, slice(None), p) if axis == 2 else (0, p)]
        return out

    return hook


def _patch_head_per_row(donor: torch.Tensor, heads: list[int], positions: list[int]) -> Callable:
    """Hook at a per-head point `[batch, tokens, heads, d]`: batch row i gets the donor's head `heads[i]` at
    `positions`."""

    def hook(cur: torch.Tensor, _hook) -> torch.Tensor:
        out = cur.clone()
        for row, h in enumerate(heads):
            out[row, positions, h] = donor[0, positions, h]
        return out

    return hook


@torch.inference_mode()
def activation_patching(
    model: HookedVisionModel,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    site: str = "hook_resid_pre",
    layers: list[int] | None = None,
    positions: list[int] | None = None,
    mode: Mode = "noising",
    head: Head | None = None,
    batch_size: int = 64,
    heads: bool = False,
) -> PatchingResult:
    """Patch each of `positions` (default: every token) at each hook point of `site` and measure the effect.

    `clean` and `corrupted` are single inputs `[1, ...]`; `site` is a hook point name or a per-block
    site (`hook_resid_pre`, `hook_attn_out`, `attn.hook_pattern` (query rows), ...); `head` turns
    the model's output into class logits (default: the output itself). `heads=True`: patch one attention head
    at a time (all of `positions` at once) at a per-head site (`attn.hook_z`, ...); other sites raise
    `InvalidRequest`.
    """
    head = head or (lambda out: out)
    if clean.shape[0] != 1 or corrupted.shape != clean.shape:
        raise InvalidRequest(
            f"patching takes one clean and one corrupted input of the same shape; got "
            f"{list(clean.shape)} and {list(corrupted.shape)}"
        )
    hooks = site_hooks(model, site, layers)
    if heads and any(model.hook_point(h).site not in HEAD_SITES for h in hooks):
        raise InvalidRequest(
            f"patching per head needs a per-head site ({', '.join(HEAD_SITES)}); got {site!r}. "
            "Use site=attn.hook_z (each head's output), or heads=false."
        )
    out_clean, cache_clean = model.run_with_cache(clean, hooks)
    out_corrupt, cache_corrupt = model.run_with_cache(corrupted, hooks)
    logits_clean, logits_corrupt = head(out_clean)[0], head(out_corrupt)[0]
    a, b = _classes(logits_clean, logits_corrupt)
    ld = lambda logits: logits[..., a] - logits[..., b]  # noqa: E731
    receiver, donor_cache = (clean, cache_corrupt) if mode == "noising" else (corrupted, cache_clean)
    base = float(ld(logits_clean if mode == "noising" else logits_corrupt))
    target = float(ld(logits_corrupt if mode == "noising" else logits_clean))
    n_tokens = model.token_layout.n_tokens
    positions = list(range(n_tokens)) if positions is None else positions
    bad = [p for p in positions if not -n_tokens <= p < n_tokens]
    if bad:
        raise InvalidRequest(f"positions {bad} lie outside the {n_tokens} tokens of {model.name}")
    units = list(range(model.hook_shape(hooks[0])[2])) if heads else positions  # what one row of a batch patches
    effect = torch.zeros(len(hooks), len(units), device=clean.device)
    for row, name in enumerate(hooks):
        axis = _position_axis(name)
        for start in range(0, len(units), batch_size):
            chunk = units[start : start + batch_size]
            batch = receiver.expand(len(chunk), *receiver.shape[1:])
            donor = donor_cache[name]
            patch = _patch_head_per_row(donor, chunk, positions) if heads else _patch_one_per_row(donor, chunk, axis)
            with model.hooks([(name, patch)]):
                patched = ld(head(model(batch)))
            effect[row, start : start + len(chunk)] = (patched.float() - base) / (target - base)
    return PatchingResult(
        effect=effect,
        hooks=hooks,
        positions=positions,
        heads=units if heads else None,
        clean_class=a,
        corrupted_class=b,
        clean_ld=float(ld(logits_clean)),
        corrupted_ld=float(ld(logits_corrupt)),
        mode=mode,
    )


@torch.inference_mode()
def patch_positions(
    model: HookedVisionModel, receiver: torch.Tensor, donor: torch.Tensor, hook: str, positions: list[int]
) -> torch.Tensor:
    """The output of `receiver [1, ...]` with `positions` at `hook` all taken from the run on `donor` at once."""
    _, cache = model.run_with_cache(donor, [hook])
    axis = _position_axis(hook)

    def put(cur: torch.Tensor, _hook) -> torch.Tensor:
        out = cur.clone()
        index = (slice(None), slice(None), positions) if axis == 2 else (slice(None), positions)
        out[index] = cache[hook][index]
        return out

    with model.hooks([(hook, put)]):
        return model(receiver)
