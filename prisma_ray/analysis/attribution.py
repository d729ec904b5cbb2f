"""Direct attribution of a class logit or a dictionary latent to the outputs of earlier layers.

The residual stream at a hook point is the sum of the embedding and every earlier attention and MLP
output (`hook_attn_out`, `hook_mlp_out`). A class logit reads the last stream through the final
norm and head: with LayerNorm scales frozen at the clean run this is affine, so each component's
contribution is exact and, with the biases, they sum to the logit. A latent reads its hook point
through the dictionary's normalisation and encoder direction, which is affine already: the
contributions sum to its pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prisma_ray.errors import InvalidRequest

from ..models import HookedVisionModel
from ..sae import Dictionary
from .readout import Readout

RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass
class Attribution:
    """`per_token [B, components, T]`: what each component adds at each token to the target.

    `target` and `bias` are `[B]` for a class logit (the contributions of all tokens add up) and
    `[B, T]` for a latent (its pre-activation at each token); `per_token` summed over components
    (and for logits over tokens) plus `bias` equals `target`.
    """

    components: list[str]
    per_token: torch.Tensor
    bias: torch.Tensor
    target: torch.Tensor

    def per_component(self) -> torch.Tensor:
        """`[B, components]` (logits) or `[B, components, T]` (latents): contributions summed over tokens for logits."""
        return self.per_token.sum(-1) if self.target.dim() == 1 else self.per_token


def components(model: HookedVisionModel, hook: str) -> list[tuple[str, str]]:
    """`(label, hook name)` of every term of the residual stream at `hook` (a resid_pre/mid/post hook point)."""
    point = model.hook_point(hook)
    if point.site not in RESID_SITES:
        raise InvalidRequest(
            f"direct attribution reads a residual stream hook point ({', '.join(RESID_SITES)}); got {hook!r}"
        )
    out = [("embed", "hook_embed")]
    for layer in range(point.layer + 1):
        last = layer == point.layer
        if last and point.site == "hook_resid_pre":
            break
        out.append((f"blocks.{layer}.attn", f"blocks.{layer}.hook_attn_out"))
        if last and point.site == "hook_resid_mid":
            break
        out.append((f"blocks.{layer}.mlp", f"blocks.{layer}.hook_mlp_out"))
    return out


@torch.inference_mode()
def logit_attribution(
    model: HookedVisionModel, x: torch.Tensor, readout: Readout, classes: torch.Tensor | None = None
) -> Attribution:
    """Direct logit attribution of class `classes [B]` (default: each input's predicted class)."""
    final = f"blocks.{model.n_layers - 1}.hook_resid_post"
    terms = components(model, final)
    _, cache = model.run_with_cache(x, [final, *(h for _, h in terms)])
    resid = cache[final]
    frozen = readout.frozen(resid)
    logits = readout.pooled(resid)
    classes = logits.argmax(-1) if classes is None else torch.as_tensor(classes, device=logits.device)
    pick = lambda t: t.gather(-1, classes.view(-1, *[1] * (t.dim() - 1)).expand(*t.shape[:-1], 1))[..., 0]  # noqa: E731
    per_token = torch.stack([pick(frozen.contributions(cache[h])) for _, h in terms], dim=1)
    return Attribution([label for label, _ in terms], per_token, pick(frozen.bias(resid)), pick(logits))


@torch.inference_mode()
def latent_attribution(model: HookedVisionModel, x: torch.Tensor, dictionary: Dictionary, latent: int) -> Attribution:
    """Direct attribution of latent `latent`'s pre-activation (per token) at the dictionary's input hook point."""
    sites = dictionary.sites.inputs
    if len(sites) != 1 or sites[0].width != model.d_model:
        raise InvalidRequest(
            f"latent attribution needs a dictionary reading one hook point of width {model.d_model}; "
            f"this one reads {[(s.name, s.width) for s in sites]}"
        )
    if not 0 <= latent < dictionary.n_latents:
        raise InvalidRequest(f"latent {latent} is out of range: the dictionary has {dictionary.n_latents} latents")
    hook = sites[0].name
    terms = components(model, hook)
    _, cache = model.run_with_cache(x, [hook, *(h for _, h in terms)])
    d = dictionary
    direction = (d.in_scale * d.W_enc[:, latent]).to(cache[hook])
    b = d.b_enc if hasattr(d, "b_enc") else d.b_gate
    offset = float(
        (-d.in_mean * d.in_scale - (d.pre_bias if d.pre_bias is not None else 0)) @ d.W_enc[:, latent] + b[latent]
    )
    per_token = torch.stack([cache[h] @ direction for _, h in terms], dim=1)
    target = d.centered(d.normalize_in(cache[hook].to(d.W_enc))) @ d.W_enc[:, latent] + b[latent]
    return Attribution([label for label, _ in terms], per_token, torch.full_like(target, offset), target)
