"""The final norm and head of a hooked model, applied to any layer's residual stream.

A `Readout` is the model's path from the last block's output to its output, split into the parts
that analysis needs: a norm over every token (`pre_norm`), pooling (the first token, or the mean of
the patch tokens), a norm after pooling (`post_norm`) and the head (a linear classifier, a
projection matrix, or nothing for towers that output the pooled embedding), optionally followed by
a CLIP-style `ZeroShotHead` over text embeddings. With every LayerNorm's scale frozen at a clean
run the whole path is affine, which is what direct attribution decomposes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..errors import PrismaRayError
from ..evaluate.splice import ZeroShotHead, outputs_logits
from ..models import HookedVisionModel

Pool = Literal["token", "avg"]
Head = nn.Module | torch.Tensor | None


class NoReadout(PrismaRayError, ValueError):
    """The model has no known final norm + head, or no class logits to read out."""


@dataclass(frozen=True, kw_only=True)
class Readout:
    """`output = zero_shot(head(post_norm(pool(pre_norm(resid)))))` for `resid [B, T, D]`."""

    pre_norm: nn.Module | None
    pool: Pool
    n_prefix: int
    post_norm: nn.Module | None
    head: Head
    zero_shot: ZeroShotHead | None = None

    def pool_weights(self, n_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[T]` on `device`: the weight of each token in the pooled vector (one-hot CLS, or uniform over patches)."""
        w = torch.zeros(n_tokens, device=device)
        if self.pool == "token":
            w[0] = 1.0
        else:
            w[self.n_prefix :] = 1.0 / (n_tokens - self.n_prefix)
        return w

    def _pooled(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0] if self.pool == "token" else z[:, self.n_prefix :].mean(dim=1)

    def _out(self, z: torch.Tensor) -> torch.Tensor:
        z = _apply(self.post_norm, z)
        z = _head(self.head, z)
        if self.zero_shot is None:
            return z
        return self.zero_shot(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)

    def pooled(self, resid: torch.Tensor) -> torch.Tensor:
        """`[B, C]`: the model's output computed from `resid [B, T, D]` (exact at the last block)."""
        return self._out(self._pooled(_apply(self.pre_norm, resid)))

    def tokens(self, resid: torch.Tensor) -> torch.Tensor:
        """`[B, T, C]`: the norms and head applied to every token on its own (the per-patch logit lens)."""
        return self._out(_apply(self.pre_norm, resid))

    def frozen(self, resid: torch.Tensor) -> FrozenReadout:
        """The affine map the readout is at `resid` once every LayerNorm's scale is frozen there."""
        pre_sigma = _sigma(self.pre_norm, resid)
        pooled = self._pooled(_apply(self.pre_norm, resid))
        post_sigma = _sigma(self.post_norm, pooled)
        emb_norm = None
        if self.zero_shot is not None:
            emb_norm = _head(self.head, _apply(self.post_norm, pooled)).norm(dim=-1, keepdim=True)
        return FrozenReadout(self, pre_sigma, post_sigma, emb_norm)


@dataclass(frozen=True)
class FrozenReadout:
    """The readout with LayerNorm scales (and, for zero-shot heads, the embedding norm) of one clean run."""

    readout: Readout
    pre_sigma: torch.Tensor | None  # [B, T, 1]
    post_sigma: torch.Tensor | None  # [B, 1]
    emb_norm: torch.Tensor | None  # [B, 1]

    def _pre(self, z: torch.Tensor, bias: bool) -> torch.Tensor:
        """`z [B, T, D]` through the frozen token norm, each token weighted by its pool weight."""
        z = _frozen_norm(self.readout.pre_norm, z, self.pre_sigma, bias)
        return z * self.readout.pool_weights(z.shape[1], z.device).to(z)[None, :, None]

    def _post(self, z: torch.Tensor, bias: bool) -> torch.Tensor:
        """`z [B, K, D]` (pooled parts) -> `[B, K, C]` through the frozen post-pool norm and the head."""
        r = self.readout
        post = None if self.post_sigma is None else self.post_sigma[:, None]
        z = _linear_head(r.head, _frozen_norm(r.post_norm, z, post, bias), bias)
        if r.zero_shot is None:
            return z
        text = nn.functional.normalize(r.zero_shot.text_embeddings.to(z), dim=1)
        return r.zero_shot.logit_scale * (z / self.emb_norm[:, None]) @ text.t()

    def contributions(self, component: torch.Tensor) -> torch.Tensor:
        """`[B, T, C]`: what each token of `component [B, T, D]` (a term of the residual stream) adds to the output."""
        return self._post(self._pre(component, bias=False), bias=False)

    def bias(self, like: torch.Tensor) -> torch.Tensor:
        """`[B, C]`: the output of a zero residual stream `like [B, T, D]` (the norms' and the head's biases)."""
        pooled = self._pre(torch.zeros_like(like), bias=True).sum(dim=1, keepdim=True)
        return self._post(pooled, bias=True)[:, 0]


def _apply(module: nn.Module | None, z: torch.Tensor) -> torch.Tensor:
    return z if module is None else module(z)


def _head(head: Head, z: torch.Tensor) -> torch.Tensor:
    if head is None:
        return z
    if isinstance(head, torch.Tensor):
        return z @ head
    return head(z)


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, (nn.Identity, nn.Dropout))


def _sigma(norm: nn.Module | None, z: torch.Tensor) -> torch.Tensor | None:
    if _is_identity(norm):
        return None
    if not isinstance(norm, nn.LayerNorm):
        raise NoReadout(f"direct attribution freezes LayerNorm scales; {type(norm).__name__} is not a LayerNorm")
    return (z.float().var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt().to(z)


def _frozen_norm(norm: nn.Module | None, z: torch.Tensor, sigma: torch.Tensor | None, bias: bool) -> torch.Tensor:
    if _is_identity(norm):
        return z
    z = (z - z.mean(dim=-1, keepdim=True)) / sigma
    if norm.weight is not None:
        z = z * norm.weight
    if bias and norm.bias is not None:
        z = z + norm.bias
    return z


def _linear_head(head: Head, z: torch.Tensor, bias: bool) -> torch.Tensor:
    if head is None:
        return z
    if isinstance(head, torch.Tensor):
        return z @ head
    if _is_identity(head):
        return z
    if isinstance(head, nn.Linear):
        z = z @ head.weight.t()
        return z + head.bias if bias and head.bias is not None else z
    if isinstance(head, nn.Sequential):
        for part in head:
            z = _linear_head(part, z, bias)
        return z
    raise NoReadout(f"direct attribution needs a linear head; {type(head).__name__} is not linear")


def _timm_readout(net: nn.Module, head: Head = None) -> Readout:
    if getattr(net, "attn_pool", None) is not None or net.global_pool not in ("token", "avg"):
        raise NoReadout(
            f"{type(net).__name__} pools with {net.global_pool or 'attention'!r}; the logit lens knows "
            "'token' (CLS) and 'avg' pooling"
        )
    own = None if isinstance(net.head, nn.Identity) else net.head
    return Readout(
        pre_norm=net.norm,
        pool=net.global_pool,
        n_prefix=int(net.num_prefix_tokens),
        post_norm=net.fc_norm,
        head=head if own is None else own,
    )


def _open_clip_readout(visual: nn.Module) -> Readout:
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise NoReadout("OpenCLIP towers with attention pooling or pool_type 'none' have no per-token readout")
    pool: Pool = "token" if visual.pool_type == "tok" else "avg"
    if visual.final_ln_after_pool:
        return Readout(pre_norm=None, pool=pool, n_prefix=1, post_norm=visual.ln_post, head=visual.proj)
    return Readout(pre_norm=visual.ln_post, pool=pool, n_prefix=1, post_norm=None, head=visual.proj)


# transformers classifier class -> its backbone attribute (whose `layernorm`, if any, normalises every token).
_HF_CLS_HEADS = {
    "ViTForImageClassification": "vit",
    "DeiTForImageClassification": "deit",
    "TimesformerForVideoClassification": "timesformer",
    "VivitForVideoClassification": "vivit",
    "VideoMAEForVideoClassification": "videomae",
}


def _hf_readout(net: nn.Module, n_prefix: int) -> Readout:
    kind = type(net).__name__
    if kind == "CLIPVisionModelWithProjection":
        return Readout(
            pre_norm=None,
            pool="token",
            n_prefix=n_prefix,
            post_norm=net.vision_model.post_layernorm,
            head=net.visual_projection,
        )
    if kind not in _HF_CLS_HEADS:
        raise NoReadout(
            f"no readout known for transformers class {kind}; known: "
            f"{', '.join(sorted([*_HF_CLS_HEADS, 'CLIPVisionModelWithProjection']))}"
        )
    pre = getattr(getattr(net, _HF_CLS_HEADS[kind]), "layernorm", None)
    fc_norm = getattr(net, "fc_norm", None)
    if fc_norm is not None:
        return Readout(pre_norm=pre, pool="avg", n_prefix=n_prefix, post_norm=fc_norm, head=net.classifier)
    return Readout(pre_norm=pre, pool="token", n_prefix=n_prefix, post_norm=None, head=net.classifier)


def source_readout(model: HookedVisionModel) -> Readout:
    """The final norm, pooling and head of `model`'s source network (timm, OpenCLIP or transformers)."""
    net = model.model
    if hasattr(net, "trunk") and hasattr(net.trunk, "global_pool"):
        return _timm_readout(net.trunk, head=net.head)
    if hasattr(net, "global_pool") and hasattr(net, "fc_norm"):
        return _timm_readout(net)
    if hasattr(net, "ln_post") and hasattr(net, "pool_type"):
        return _open_clip_readout(net)
    if type(net).__module__.startswith("transformers."):
        return _hf_readout(net, model.token_layout.n_prefix)
    raise NoReadout(f"no readout (final norm + head) known for {model.name} ({type(net).__name__})")


def class_readout(model: HookedVisionModel, zero_shot: ZeroShotHead | None = None) -> Readout:
    """A readout that ends in class logits: the model's classifier, or `zero_shot` over its embedding.

    Raises `NoReadout`, naming the model, when it outputs an embedding and no text embeddings are given.
    """
    readout = source_readout(model)
    if zero_shot is not None:
        return replace(readout, zero_shot=zero_shot)
    if outputs_logits(model):
        return readout
    raise NoReadout(
        f"{model.name} has no classification head (it outputs an embedding): give text embeddings "
        "([classes, width] .npy) for a zero-shot head (`head.text_embeddings`), or pick a model with one "
        "(e.g. `--set model=prisma-toy-vit-shapes`)"
    )
