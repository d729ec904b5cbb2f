"""Direct attribution of a class logit or a dictionary latent to the outputs of earlier layers.

The residual stream at a hook point is the sum of the embedding and every earlier attention and MLP
output (`hook_attn_out`, `hook_mlp_out`). A class logit reads the last stream through the final
norm and head: with LayerNorm scales frozen at the clean run this is affine, so each component's
contribution is exact and, with the biases, they sum to the logit. A latent reads its hook point
through the dictionary's normalisation and encoder direction, which is affine already: the
contributions sum to its pre-activation. With `heads=True` each attention output is split further into its
heads' results (`attn.hook_result`, `z_h @ W_O[h]`) and the output bias, exact where the attention branch is
not scaled by a layer-scale parameter (checked: otherwise `InvalidRequest`).
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


def _terms(
    model: HookedVisionModel, x: torch.Tensor, hook: str, heads: bool
) -> tuple[dict[str, torch.Tensor], list[str], list[torch.Tensor]]:
    """The cache at `hook` and the residual stream's terms there, `(cache, labels, [B, T, D] tensors)`; with
    `heads`, each `blocks.{l}.attn` term becomes `blocks.{l}.attn.head{h}` (its result) and
    `blocks.{l}.attn.b_O` (the output bias)."""
    terms = components(model, hook)
    per_head = [f"{h.removesuffix('hook_attn_out')}attn.hook_result" for _, h in terms if h.endswith("hook_attn_out")]
    if heads:
        missing = [name for name in per_head if name not in model.hook_names]
        if missing:
            raise InvalidRequest(f"attribution per head needs attn.hook_result, which {model.name} lacks")
    _, cache = model.run_with_cache(x, [hook, *(h for _, h in terms), *(per_head if heads else [])])
    labels, tensors = [], []
    for label, name in terms:
        if not (heads and name.endswith("hook_attn_out")):
            labels.append(label)
            tensors.append(cache[name])
            continue
        layer = model.hook_point(name).layer
        result = cache[f"blocks.{layer}.attn.hook_result"]
        bias = model.weights(layer)["b_O"]
        bias = torch.zeros_like(result[:, :, 0]) if bias is None else bias.to(result).expand_as(result[:, :, 0])
        if not torch.allclose(result.sum(2) + bias, cache[name], atol=1e-4, rtol=1e-3):
            raise InvalidRequest(
                f"{model.name}'s attention branch of block {layer} is not the sum of its heads' results and b_O "
                "(a layer-scale parameter scales it); attribute per block (attribution.heads=false)."
            )
        labels += [f"{label}.head{h}" for h in range(result.shape[2])] + [f"{label}.b_O"]
        tensors += [*result.unbind(2), bias]
    return cache, labels, tensors


@torch.inference_mode()
def logit_attribution(
    model: HookedVisionModel,
    x: torch.Tensor,
    readout: Readout,
    classes: torch.Tensor | None = None,
    heads: bool = False,
) -> Attribution:
    """Direct logit attribution of class `classes [B]` (default: each input's predicted class); `heads`: per
    attention head (see the module docstring)."""
    final = f"blocks.{model.n_layers - 1}.hook_resid_post"
    cache, labels, tensors = _terms(model, x, final, heads)
    resid = cache[final]
    frozen = readout.frozen(resid)
    logits = readout.pooled(resid)
    classes = logits.argmax(-1) if classes is None else torch.as_tensor(classes, device=logits.device)
    pick = lambda t: t.gather(-1, classes.view(-1, *[1] * (t.dim() - 1)).expand(*t.shape[:-1], 1))[..., 0]  # noqa: E731
    per_token = torch.stack([pick(frozen.contributions(t)) for t in tensors], dim=1)
    return Attribution(labels, per_token, pick(frozen.bias(resid)), pick(logits))


@torch.inference_mode()
def latent_attribution(
    model: HookedVisionModel, x: torch.Tensor, dictionary: Dictionary, latent: int, heads: bool = False
) -> Attribution:
    """Direct attribution of latent `latent`'s pre-activation (per token) at the dictionary's input hook point;
    `heads`: per attention head."""
    sites = dictionary.sites.inputs
    if len(sites) != 1 or sites[0].width != model.d_model:
        raise InvalidRequest(
            f"latent attribution needs a dictionary reading one hook point of width {model.d_model}; "
            f"this one reads {[(s.name, s.width) for s in sites]}"
        )
    if not 0 <= latent < dictionary.n_latents:
        raise InvalidRequest(f"latent {latent} is out of range: the dictionary has {dictionary.n_latents} latents")
    hook = sites[0].name
    cache, labels, tensors = _terms(model, x, hook, heads)
    d = dictionary
    direction = (d.in_scale * d.W_enc[:, latent]).to(cache[hook])
    b = d.b_enc if hasattr(d, "b_enc") else d.b_gate
    offset = float(
        (-d.in_mean * d.in_scale - (d.pre_bias if d.pre_bias is not None else 0)) @ d.W_enc[:, latent] + b[latent]
    )
    per_token = torch.stack([t @ direction for t in tensors], dim=1)
    target = d.centered(d.normalize_in(cache[hook].to(d.W_enc))) @ d.W_enc[:, latent] + b[latent]
    return Attribution(labels, per_token, torch.full_like(target, offset), target)
