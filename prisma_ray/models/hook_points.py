"""Hook-point names (TransformerLens style) shared by every model source."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import PrismaRayError

BLOCK_SITES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_in",
    "hook_mlp_out",
    "attn.hook_pattern",
)
# Per-head, neuron and layer-norm sites inside a block (TransformerLens names), listed for a model where its
# adapter reaches them (`HookedVisionModel.hook_shape` gives each shape).
INNER_SITES = (
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_result",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
)
HEAD_SITES = INNER_SITES[2:7]  # attn.hook_q, k, v, z, result: `[batch, tokens, heads, d]`
GLOBAL_SITES = ("hook_embed", "hook_final")
FINAL_SCALE = "ln_final.hook_scale"  # listed where the final module is a layer norm
# The order in which the forward pass reaches the sites of a stack: `hook_embed` is block 0's input, then each
# block's sites in this order (a block's attention pattern is inside its attention branch), `hook_final` last.
FORWARD_ORDER = (
    "hook_embed",
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "hook_mlp_in",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
    FINAL_SCALE,
    "hook_final",
)
LM_PREFIX = "lm."
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in BLOCK_SITES + INNER_SITES) + r")$")


class UnknownHookPoint(PrismaRayError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class HookPoint:
    """One named place in the forward pass; passed as `hook` to every hook function."""

    name: str
    site: str
    layer: int | None = None
    lm: bool = False


def block_hook_names(layer: int, with_pattern: bool = True, inner: Collection[str] = ()) -> list[str]:
    """The hook names of block `layer`: the block-level sites, then the `inner` sites (of `INNER_SITES`)."""
    names = [f"blocks.{layer}.{s}" for s in BLOCK_SITES if with_pattern or s != "attn.hook_pattern"]
    return names + [f"blocks.{layer}.{s}" for s in INNER_SITES if s in inner]


def all_hook_names(
    n_layers: int, with_pattern: bool = True, inner: Collection[str] = (), final_scale: bool = False
) -> list[str]:
    """Every hook name of a model with `n_layers` blocks, block by block (`FORWARD_ORDER` orders sites in a block);
    `inner`: the `INNER_SITES` every block has; `final_scale`: whether `ln_final.hook_scale` is listed."""
    names = ["hook_embed"]
    for layer in range(n_layers):
        names += block_hook_names(layer, with_pattern, inner)
    return names + ([FINAL_SCALE] if final_scale else []) + ["hook_final"]


def lm_hook_names(
    n_layers: int, with_pattern: bool = True, inner: Collection[str] = (), final_scale: bool = False
) -> list[str]:
    """Hook names of a multimodal model's language model: `lm.` + the usual names."""
    return [LM_PREFIX + name for name in all_hook_names(n_layers, with_pattern, inner, final_scale)]


def parse_hook_name(name: str, valid: list[str]) -> HookPoint:
    """Turn a name into a `HookPoint`, or raise `UnknownHookPoint` listing the valid names.

    `lm.`-prefixed names (the language model of a multimodal model) are valid only where listed.
    """
    if name in valid:
        lm = name.startswith(LM_PREFIX)
        local = name[len(LM_PREFIX) :] if lm else name
        if local in GLOBAL_SITES or local == FINAL_SCALE:
            return HookPoint(name=name, site=local, lm=lm)
        match = _BLOCK_RE.match(local)
        if match:
            return HookPoint(name=name, site=match.group(2), layer=int(match.group(1)), lm=lm)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    sample = ", ".join(valid[:8] + ["..."] + valid[-3:]) if len(valid) > 12 else ", ".join(valid)
    raise UnknownHookPoint(f"Unknown hook point {name!r}.{hint} Valid hook points: {sample}")
