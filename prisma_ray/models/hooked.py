"""`HookedVisionModel`: named hook points, caching and interventions over an unmodified model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..errors import PrismaRayError
from .hook_points import HookPoint, all_hook_names, lm_hook_names, parse_hook_name
from .sites import LanguageSites, LayerSites, ModelSites
from .spec import MultimodalLayout, PreprocessSpec, TokenLayout

HookFn = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]
ModelInput = torch.Tensor | Mapping[str, torch.Tensor]


class StopForward(Exception):
    """Raised inside the forward pass once every requested activation has been recorded."""


class InterventionNotSupported(PrismaRayError, NotImplementedError):
    """A hook function returned a replacement at a hook point that can only be read."""


class HookedVisionModel(nn.Module):
    """A vision or video transformer with TransformerLens-style hook points.

    Hooks are PyTorch forward hooks on the original modules, attached only inside `hooks(...)`
    or `run_with_cache(...)`, so outside them the model computes exactly what the source model
    computes. Every hook function receives `[batch, tokens, d_model]` (patterns:
    `[batch, heads, tokens, tokens]`) and may return a tensor of the same shape to replace it.

    Multimodal language models take their processor's output as input, keep `blocks.*` for the
    vision tower (a tower that packs all images into one sequence shows `[1, tokens, d]`) and add
    `lm.*` hook points on the language model (`[batch, seq, lm_d_model]`).
    """

    def __init__(self, sites: ModelSites, name: str):
        super().__init__()
        self.model = sites.model
        self.name = name
        self._sites = sites
        with_pattern = all(layer.pattern is not None for layer in sites.layers)
        self.hook_names: list[str] = all_hook_names(len(sites.layers), with_pattern)
        if sites.lm is not None:
            lm_pattern = all(layer.pattern is not None for layer in sites.lm.layers)
            self.hook_names += lm_hook_names(len(sites.lm.layers), lm_pattern)

    @property
    def n_layers(self) -> int:
        return len(self._sites.layers)

    @property
    def d_model(self) -> int:
        return self._sites.d_model

    @property
    def n_heads(self) -> int:
        return self._sites.n_heads

    @property
    def lm_n_layers(self) -> int | None:
        return None if self._sites.lm is None else len(self._sites.lm.layers)

    @property
    def lm_d_model(self) -> int | None:
        return None if self._sites.lm is None else self._sites.lm.d_model

    @property
    def token_layout(self) -> TokenLayout:
        """The token layout of `blocks.*` (for a multimodal model: its vision tower's nominal view)."""
        return self._sites.token_layout

    def multimodal_layout(self, inputs: Mapping[str, torch.Tensor]) -> MultimodalLayout:
        """Which positions of `inputs`' sequences are text and which image tokens (multimodal models)."""
        if self._sites.layout is None:
            raise TypeError(f"{self.name} is not a multimodal language model; use model.token_layout.")
        self.check_input(inputs)
        return self._sites.layout(inputs)

    def encode(self, visuals: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A multimodal model's input (its processor's output) for `uint8[H, W, 3]` images, or
        `uint8[T, H, W, 3]` videos (Qwen2-VL, Qwen2.5-VL), with one prompt each."""
        if self._sites.encode is None:
            raise TypeError(f"{self.name} is not a multimodal language model; it takes pixels (see model.preprocess).")
        return self._sites.encode(visuals, prompts)

    def hook_width(self, name: str) -> int:
        """The activation width at hook point `name` (`lm_d_model` on the language model, else `d_model`)."""
        return self.lm_d_model if self.hook_point(name).lm else self.d_model

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._sites.preprocess

    def hook_point(self, name: str) -> HookPoint:
        """The `HookPoint` for `name`; an unknown name raises an error listing the valid ones."""
        return parse_hook_name(name, self.hook_names)

    def forward(self, x: ModelInput) -> torch.Tensor:
        """The source model's output (logits, or the embedding for towers without a head)."""
        self.check_input(x)
        return self._sites.forward(x)

    def check_input(self, x: ModelInput) -> None:
        """Raise a `ValueError` that says what the model expects when `x` has the wrong shape."""
        spec = self.preprocess
        if spec.modality == "multimodal":
            if not isinstance(x, Mapping) or "input_ids" not in x:
                got = sorted(x) if isinstance(x, Mapping) else type(x).__name__
                raise InvalidRequest(
                    f"{self.name} expects its processor's output (a mapping with input_ids, attention_mask, "
                    f"pixel_values, ...); got {got}."
                )
            return
        expected = spec.input_shape()
        if x.dim() == len(expected) + 1 and tuple(x.shape[1:]) == expected:
            return
        layout = "[batch, frames, 3, height, width]" if spec.modality == "video" else "[batch, 3, height, width]"
        frames = f", {spec.num_frames} frames" if spec.modality == "video" else ""
        raise InvalidRequest(
            f"{self.name} expects {spec.modality} input {layout} = [B, {', '.join(map(str, expected))}] "
            f"({spec.image_size[0]}x{spec.image_size[1]} pixels{frames}); got {list(x.shape)}. "
            "Resize with prisma_ray.data.transforms using model.preprocess."
        )

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator[HookedVisionModel]:
        """Attach `(hook_name, fn)` pairs for the duration of the block; `fn(tensor, hook)` may
        return a replacement tensor of the same shape (ablate, patch, steer, splice)."""
        with ExitStack() as stack:
            for name, fn in fwd_hooks:
                self._attach(self.hook_point(name), fn, stack)
            yield self

    def run_with_cache(
        self,
        x: ModelInput,
        names: Iterable[str] | None = None,
        stop_early: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the model and return `(output, cache)` with the activations at `names` (all by default).

        With `stop_early=True` the forward pass ends after the last block that a requested hook
        point needs, and `output` is None.
        """
        names = list(self.hook_names if names is None else names)
        points = [self.hook_point(n) for n in names]
        cache: dict[str, torch.Tensor] = {}

        def record(t: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = t.detach()

        with ExitStack() as stack:
            for point in points:
                self._attach(point, record, stack)
            stop_block = self._stop_block(points) if stop_early else None
            if stop_block is not None:
                stack.enter_context(_raise_after(stop_block))
            try:
                output = self.forward(x)
            except StopForward:
                output = None
        return output, {n: cache[n] for n in names}

    def _stop_block(self, points: list[HookPoint]) -> nn.Module | None:
        """The block after which every requested point has run (the language model runs last)."""
        if any(p.site == "hook_final" for p in points):
            return None
        lm_points = [p for p in points if p.lm]
        points = lm_points or points
        layers = self._stack(points[0]).layers if points else self._sites.layers
        last = max((p.layer or 0) for p in points) if points else 0
        return layers[last].block if last < len(layers) - 1 else None

    def _stack(self, point: HookPoint) -> LanguageSites | ModelSites:
        return self._sites.lm if point.lm else self._sites

    def _attach(self, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        sites = self._stack(point)
        if point.site == "hook_embed":
            self._input_hook(sites.layers[0].block, point, fn, stack)
            return
        if point.site == "hook_final":
            self._output_hook(sites.final, None, point, fn, stack)
            return
        layer = sites.layers[point.layer]
        if point.site == "hook_resid_pre":
            self._input_hook(layer.block, point, fn, stack)
        elif point.site == "hook_resid_post":
            self._output_hook(layer.block, None, point, fn, stack)
        elif point.site == "hook_mlp_in":
            self._input_hook(layer.mlp_in, point, fn, stack)
        elif point.site == "hook_mlp_out":
            self._output_hook(layer.mlp_out, layer.mlp_scale, point, fn, stack)
        elif point.site == "hook_attn_out":
            if layer.attn_out is not None:
                self._output_hook(layer.attn_out, layer.attn_scale, point, fn, stack)
            else:
                self._derived_attn_out(layer, point, fn, stack)
        elif point.site == "hook_resid_mid":
            self._resid_mid(layer, point, fn, stack)
        elif point.site == "attn.hook_pattern":
            self._pattern(layer, point, fn, stack)

    def _to_btd(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:  # one packed sequence `[tokens, d]`
            return t.unsqueeze(0)
        return t.transpose(0, 1) if self._sites.seq_first else t

    def _from_btd(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:
            return t.squeeze(0)
        return t.transpose(0, 1) if self._sites.seq_first else t

    def _call_hook(self, fn: HookFn, raw: torch.Tensor, point: HookPoint) -> torch.Tensor | None:
        """Call `fn` on the batch-first view of `raw`; return the replacement in `raw`'s layout."""
        value = self._to_btd(raw)
        new = fn(value, point)
        if new is None:
            return None
        if new.shape != value.shape:
            raise ValueError(
                f"Hook function at {point.name} returned shape {list(new.shape)}; "
                f"it must keep the shape {list(value.shape)}."
            )
        return self._from_btd(new.to(raw.dtype), raw)

    def _input_hook(self, module: nn.Module, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        def pre_hook(_module, args, kwargs):
            raw = args[0] if args else kwargs["hidden_states"]
            new = self._call_hook(fn, raw, point)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        stack.callback(module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)

    def _output_hook(self, module, scale, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        def post_hook(_module, _args, output):
            raw = output[0] if isinstance(output, tuple) else output
            gamma = scale() if scale is not None else None
            value = raw if gamma is None else gamma * raw
            new = self._call_hook(fn, value, point)
            if new is None:
                return None
            if gamma is not None:
                new = new / gamma
            return (new, *output[1:]) if isinstance(output, tuple) else new

        stack.callback(module.register_forward_hook(post_hook).remove)

    def _stash_resid_pre(self, layer: LayerSites, stack: ExitStack) -> dict:
        stash: dict[str, torch.Tensor] = {}

        def pre_hook(_module, args, kwargs):
            stash["pre"] = args[0] if args else kwargs["hidden_states"]

        stack.callback(layer.block.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        return stash

    def _resid_mid(self, layer: LayerSites, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        if layer.attn_out is None:
            self._input_hook(layer.resid_mid, point, _read_only(fn, point), stack)
            return
        stash = self._stash_resid_pre(layer, stack)

        def on_attn_out(branch: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            pre = self._to_btd(stash["pre"])
            new = fn(pre + branch, point)
            return None if new is None else new - pre

        self._output_hook(layer.attn_out, layer.attn_scale, point, on_attn_out, stack)

    def _derived_attn_out(self, layer: LayerSites, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        stash = self._stash_resid_pre(layer, stack)
        read_only = _read_only(fn, point)

        def on_mid(mid: torch.Tensor, hook: HookPoint) -> None:
            read_only(mid - self._to_btd(stash["pre"]), point)

        self._input_hook(layer.resid_mid, point, on_mid, stack)

    def _pattern(self, layer: LayerSites, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        site = layer.pattern
        call = fn if site.replaceable else _read_only(fn, point)

        def on_pattern(pattern: torch.Tensor) -> torch.Tensor | None:
            new = call(pattern, point)
            if new is not None and new.shape != pattern.shape:
                raise ValueError(f"Hook function at {point.name} must keep the shape {list(pattern.shape)}.")
            return new

        stack.enter_context(site.attach(on_pattern))


def _read_only(fn: HookFn, point: HookPoint) -> HookFn:
    def wrapped(t: torch.Tensor, hook: HookPoint) -> None:
        if fn(t, hook) is not None:
            raise InterventionNotSupported(
                f"{point.name} can be read but not replaced in this model's implementation; "
                "intervene at a neighbouring hook point (e.g. hook_resid_pre or hook_mlp_out) instead."
            )

    return wrapped


@contextmanager
def _raise_after(module: nn.Module) -> Iterator[None]:
    def post_hook(_module, _args, _output):
        raise StopForward

    handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
