"""Per-head, neuron and layer-norm hook sites and the weight views, from a block's `BlockParts`.

Every site is a PyTorch hook on a module that the source model calls (a projection's output, its input, a
norm's output), seen through a reshape: q/k/v/z `[batch, tokens, heads, d_head]`, neurons
`[batch, tokens, d_mlp]`. Reading them leaves the forward pass bit for bit as it is, and a replacement is
written back into that very tensor, so it changes the forward pass exactly as replacing it inside the module
would. Two sites are computed: `attn.hook_result` (each head's `z_h @ W_O[h]`; a replacement `r` makes the
output projection return `r.sum(heads) + b_O`) and `ln*.hook_scale` (`sqrt(var + eps)` of the norm's input,
`[batch, tokens, 1]`, read only). Weight views follow TransformerLens (`W_Q` `[heads, d_model, d_head]`,
`W_O` `[heads, d_head, d_model]`, `W_in` `[d_model, d_mlp]`, `W_out` `[d_mlp, d_model]`); they share storage
with the parameters, so writing into them (under `torch.no_grad()`) edits the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

from .sites import BlockParts, InnerSite

Fn = Callable[[torch.Tensor], torch.Tensor | None]
View = Callable[[torch.Tensor], torch.Tensor]
Unview = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ModuleTap:
    """A tensor at a module's first input (`"pre"`) or output (`"post"`, or its first element), seen as
    `view(raw)` and written back as `unview(raw, new)`; `path` is entered while attached."""

    def __init__(
        self,
        module: nn.Module,
        phase: Literal["pre", "post"],
        view: View,
        unview: Unview | None = None,
        path: Callable[[], object] | None = None,
    ):
        self.module, self.phase, self.view, self.unview, self.path = module, phase, view, unview, path
        self.replaceable = unview is not None
        self.exact = path is None

    @contextmanager
    def attach(self, fn: Fn) -> Iterator[None]:
        def apply(raw: torch.Tensor) -> torch.Tensor | None:
            new = fn(self.view(raw))
            return None if new is None else self.unview(raw, new)

        def pre_hook(_module, args):
            new = apply(args[0])
            return None if new is None else (new, *args[1:])

        def post_hook(_module, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            new = apply(first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        with ExitStack() as stack:
            stack.enter_context(self.path() if self.path else nullcontext())
            if self.phase == "pre":
                handle = self.module.register_forward_pre_hook(pre_hook)
            else:
                handle = self.module.register_forward_hook(post_hook)
            stack.callback(handle.remove)
            yield


class ResultTap:
    """`attn.hook_result` `[batch, tokens, heads, d_model]`: each head's term of the output projection
    `out(z) = sum_h z_h @ W_O[h] + b_O`, from the `z` the projection received; a replacement `r` makes `out`
    return `r.sum(heads) + b_O`. One PyTorch hook runs every attached function in order, each on the result
    the previous ones left."""

    replaceable = True

    def __init__(self, out: nn.Module, d_head: int, path: Callable[[], object] | None = None):
        self.out, self.d_head, self.path = out, d_head, path
        self.exact = path is None
        self._fns: list[Fn] = []
        self._handle = None

    def _post_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        z = args[0].unflatten(-1, (-1, self.d_head))
        result = torch.einsum("...hd,hdm->...hm", z, out_weight(module, self.d_head))
        current = result
        for fn in list(self._fns):
            new = fn(current)
            current = current if new is None else new.to(result.dtype)
        if current is result:
            return None
        return current.sum(-2) + module.bias if module.bias is not None else current.sum(-2)

    @contextmanager
    def attach(self, fn: Fn) -> Iterator[None]:
        with self.path() if self.path else nullcontext():
            self._fns.append(fn)
            if self._handle is None:
                self._handle = self.out.register_forward_hook(self._post_hook)
            try:
                yield
            finally:
                self._fns.remove(fn)
                if not self._fns:
                    self._handle.remove()
                    self._handle = None


def _heads(d_head: int) -> tuple[View, Unview]:
    return (lambda raw: raw.unflatten(-1, (-1, d_head))), (lambda _raw, new: new.flatten(-2))


def _fused(index: int, d_head: int) -> tuple[View, Unview]:
    """The `index`-th third of a fused `[q | k | v]` projection output, per head."""

    def view(raw: torch.Tensor) -> torch.Tensor:
        return raw.unflatten(-1, (3, -1, d_head))[..., index, :, :]

    def unview(raw: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        parts = list(raw.unflatten(-1, (3, -1, d_head)).unbind(-3))
        parts[index] = new.to(raw.dtype)
        return torch.stack(parts, dim=-3).flatten(-3)

    return view, unview


def _identity() -> tuple[View, Unview]:
    return (lambda raw: raw), (lambda _raw, new: new)


def norm_scale(norm: nn.Module) -> View | None:
    """`x -> sqrt(var(x) + eps)` (LayerNorm) or `sqrt(mean(x^2) + eps)` (RMSNorm) over the last axis, keepdim;
    None for a norm of another kind."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if isinstance(norm, nn.LayerNorm):
        return lambda x: (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    if eps is not None and "RMSNorm" in type(norm).__name__:
        return lambda x: (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return None


def _norm_sites(prefix: str, norm: nn.Module | None) -> dict[str, InnerSite]:
    if norm is None:
        return {}
    sites: dict[str, InnerSite] = {f"{prefix}.hook_normalized": ModuleTap(norm, "post", *_identity())}
    scale = norm_scale(norm)
    if scale is not None:
        sites[f"{prefix}.hook_scale"] = ModuleTap(norm, "pre", scale)
    return sites


def inner_sites(parts: BlockParts | None) -> dict[str, InnerSite]:
    """The `INNER_SITES` that `parts` reach, by site name."""
    if parts is None:
        return {}
    d, path = parts.d_head, parts.path
    sites = {**_norm_sites("ln1", parts.ln1), **_norm_sites("ln2", parts.ln2)}
    if parts.qkv is not None:
        for i, name in enumerate("qkv"):
            sites[f"attn.hook_{name}"] = ModuleTap(parts.qkv, "post", *_fused(i, d), path=path)
    for name in "qkv":
        module = getattr(parts, name)
        if module is not None:
            sites[f"attn.hook_{name}"] = ModuleTap(module, "post", *_heads(d), path=path)
    if parts.out is not None:
        sites["attn.hook_z"] = ModuleTap(parts.out, "pre", *_heads(d), path=path)
        sites["attn.hook_result"] = ResultTap(parts.out, d, path=path)
    if parts.fc_in is not None:
        sites["mlp.hook_pre"] = ModuleTap(parts.fc_in, "post", *_identity())
    if parts.fc_out is not None:
        sites["mlp.hook_post"] = ModuleTap(parts.fc_out, "pre", *_identity())
    return sites


def in_weight(weight: torch.Tensor, d_head: int) -> torch.Tensor:
    """`[heads * d_head, d_model]` (an `nn.Linear` weight) -> `[heads, d_model, d_head]`, a view."""
    return weight.unflatten(0, (-1, d_head)).transpose(1, 2)


def out_weight(out: nn.Module, d_head: int) -> torch.Tensor:
    """The output projection's weight `[d_model, heads * d_head]` -> `W_O` `[heads, d_head, d_model]`, a view."""
    return out.weight.unflatten(1, (-1, d_head)).permute(1, 2, 0)


def _bias(bias: torch.Tensor | None, d_head: int) -> torch.Tensor | None:
    return None if bias is None else bias.unflatten(0, (-1, d_head))


def block_weights(parts: BlockParts | None) -> dict[str, torch.Tensor | None]:
    """TransformerLens weight views of one block: `W_Q`, `W_K`, `W_V` `[heads, d_model, d_head]`, `b_Q`, `b_K`,
    `b_V` `[heads, d_head]`, `W_O` `[heads, d_head, d_model]`, `b_O` `[d_model]`, `W_in` `[d_model, d_mlp]`,
    `b_in` `[d_mlp]`, `W_out` `[d_mlp, d_model]`, `b_out` `[d_model]`: the ones `parts` reach, each a view of
    the parameter (a bias the model does not have is None)."""
    if parts is None:
        return {}
    d = parts.d_head
    weights: dict[str, torch.Tensor | None] = {}
    if parts.qkv is not None:
        w, b = parts.qkv.weight.chunk(3, dim=0), parts.qkv.bias
        bs = b.chunk(3, dim=0) if b is not None else (None, None, None)
        for name, wi, bi in zip("QKV", w, bs):
            weights[f"W_{name}"], weights[f"b_{name}"] = in_weight(wi, d), _bias(bi, d)
    for name in "QKV":
        module = getattr(parts, name.lower())
        if module is not None:
            weights[f"W_{name}"], weights[f"b_{name}"] = in_weight(module.weight, d), _bias(module.bias, d)
    if parts.out is not None:
        weights["W_O"], weights["b_O"] = out_weight(parts.out, d), parts.out.bias
    if parts.fc_in is not None:
        weights["W_in"], weights["b_in"] = parts.fc_in.weight.T, parts.fc_in.bias
    if parts.fc_out is not None:
        weights["W_out"], weights["b_out"] = parts.fc_out.weight.T, parts.fc_out.bias
    return weights
