"""`HookedVisionModel`: named hook points, caching and interventions over an unmodified model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..errors import PrismaRayError
from .hook_points import (
    FINAL_SCALE,
    FORWARD_ORDER,
    HEAD_SITES,
    INNER_SITES,
    HookPoint,
    all_hook_names,
    lm_hook_names,
    parse_hook_name,
)
from .inner_sites import ModuleTap, block_weights, inner_sites, norm_scale
from .sites import ENCODED, InnerSite, LanguageSites, ModelSites, Scale
from .spec import MultimodalLayout, PreprocessSpec, TokenLayout

HookFn = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]
Slot = Callable[[torch.Tensor], "torch.Tensor | None"]
ModelInput = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(eq=False)
class _Entry:
    """One active `(hook point, fn)` pair of a `hooks(...)` block."""

    point: HookPoint
    fn: HookFn


class StopForward(Exception):
    """Raised inside the forward pass once every requested activation has been recorded."""


class InterventionNotSupported(PrismaRayError, NotImplementedError):
    """A hook function returned a replacement at a hook point that can only be read."""


class HookedVisionModel(nn.Module):
    """A vision or video transformer with TransformerLens-style hook points.

    Hooks are PyTorch forward hooks on the original modules, attached only inside `hooks(...)`
    or `run_with_cache(...)`, so outside them the model computes exactly what the source model
    computes. Every hook function receives the activation batch first (`hook_shape(name)`: `[batch, tokens,
    d_model]`; patterns `[batch, heads, tokens, tokens]`; q/k/v/z `[batch, tokens, heads, d_head]`; neurons
    `[batch, tokens, d_mlp]`) and may return a tensor of the same shape to replace it. `weights(layer)`, `W_E`
    and `W_pos` are TransformerLens-named views of the parameters.

    Multimodal language models take their processor's output as input, keep `blocks.*` for the
    vision tower (a tower that packs all images into one sequence shows `[1, tokens, d]`) and add
    `lm.*` hook points on the language model (`[batch, seq, lm_d_model]`).
    """

    def __init__(self, sites: ModelSites, name: str):
        super().__init__()
        self.model = sites.model
        self.name = name
        self._sites = sites
        self._hook_entries: list[_Entry] = []  # the active hooks, in registration order
        self._dispatch_handles: list = []  # the PyTorch hooks attached for them
        self._attached: list[HookPoint] = []  # the points of every attached hook, inner ones included
        self._inner = {False: _stack_inner(sites)}  # by `HookPoint.lm`: per layer, site -> InnerSite, and global
        self.hook_names: list[str] = all_hook_names(len(sites.layers), *_listed(sites, self._inner[False]))
        if sites.lm is not None:
            self._inner[True] = _stack_inner(sites.lm)
            self.hook_names += lm_hook_names(len(sites.lm.layers), *_listed(sites.lm, self._inner[True]))

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

    @property
    def tokenizer(self):
        """A multimodal model's tokenizer (its processor's, a transformers `PreTrainedTokenizerBase`: `decode(ids)`
        gives the text of token ids)."""
        if self._sites.tokenizer is None:
            raise TypeError(f"{self.name} is not a multimodal language model; it has no tokenizer.")
        return self._sites.tokenizer

    def hook_width(self, name: str, head: int | None = None) -> int:
        """The width of one token's activation at hook point `name` as stored (`per_token`): `d_model`
        (`lm_d_model` on the language model), `d_mlp` for neurons, 1 for norm scales; for the per-head points
        (`attn.hook_q/k/v/z/result`) all heads flattened into the width, or one head's width when `head` is given.
        (`attn.hook_pattern` is not one vector per token; it gives `d_model`.)"""
        point = self.hook_point(name)
        if point.site == "attn.hook_pattern":
            return self.lm_d_model if point.lm else self.d_model
        shape = self.hook_shape(name)
        if point.site in HEAD_SITES:
            return shape[3] if head is not None else shape[2] * shape[3]
        return shape[2]

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._sites.preprocess

    def hook_point(self, name: str) -> HookPoint:
        """The `HookPoint` for `name`; an unknown name raises an error listing the valid ones."""
        return parse_hook_name(name, self.hook_names)

    def forward(self, x: ModelInput, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The source model's output (logits, or the embedding for towers without a head).

        `logits_at` (multimodal language models only): a `bool[B, T]` mask of the positions whose next-token
        logits are wanted; the output is then `[N, vocab]` for its N true positions, as `output[logits_at]` of the
        full run, and the vocabulary projection runs on those positions alone (transformers' `logits_to_keep`).
        """
        self.check_input(x)
        if isinstance(x, Mapping) and ENCODED in x and any(not p.lm for p in self._attached):
            raise InvalidRequest(
                f"{self.name}: a vision tower hook (blocks.*) is attached but this input's images are already "
                "encoded (lm_input), so the tower does not run; run the processor's output instead"
            )
        if logits_at is None:
            return self._sites.forward(x)
        if self._sites.lm is None:
            raise InvalidRequest(f"{self.name} is not a multimodal language model: logits_at is for those only")
        if logits_at.dtype != torch.bool or tuple(logits_at.shape) != tuple(x["input_ids"].shape):
            raise InvalidRequest(
                f"logits_at must be a bool mask shaped as input_ids {list(x['input_ids'].shape)}; got "
                f"{logits_at.dtype} {list(logits_at.shape)}"
            )
        return self._sites.forward(x, logits_at=logits_at)

    def lm_input(self, x: Mapping[str, torch.Tensor]) -> dict:
        """A multimodal language model's input `x` with its images and videos already through the vision tower
        and projector (transformers' `mm_encoder_outputs` in place of the pixels; one tower run, here). The model
        gives the same output on it without running the tower again, so runs hooked on the language model only
        (`lm.*`) can share one tower run; with a `blocks.*` hook attached, running it raises `InvalidRequest`."""
        if self._sites.visual_features is None:
            raise InvalidRequest(f"{self.name} is not a multimodal language model: it has no language model input")
        self.check_input(x)
        return self._sites.visual_features(x)

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
        return a replacement tensor of the same shape (ablate, patch, steer, splice).

        Hook functions run in the order of the forward pass, whatever the order of registration or the
        nesting of `hooks(...)` blocks: each sees the value the forward pass carries at its hook point,
        with every replacement made at earlier points (`resid_mid` is `resid_pre` as replaced plus the
        attention branch as replaced). Functions at one hook point run in registration order (outer
        blocks first).
        """
        entries = [_Entry(self.hook_point(name), fn) for name, fn in fwd_hooks]
        with ExitStack() as stack:
            points = [e.point for e in entries]
            self._attached = [*self._attached, *points]
            stack.callback(self._release, points)
            for entry in entries:
                if _is_inner(entry.point):
                    self._attach_inner(entry.point, entry.fn, stack)
            mine = [entry for entry in entries if not _is_inner(entry.point)]
            self._hook_entries = [*self._hook_entries, *mine]
            stack.callback(self._detach, mine)
            self._dispatch()
            yield self

    def run_with_cache(
        self,
        x: ModelInput,
        names: Iterable[str] | None = None,
        stop_early: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the model and return `(output, cache)` with the activations at `names` (by default every hook
        point but `attn.hook_result`, which holds heads x d_model values per token: name it to cache it, as
        TransformerLens caches it only on request).

        Inside `hooks(...)` the cache holds the values as the forward pass carries them, after every
        replacement at or before each hook point. With `stop_early=True` the forward pass ends after
        the last block that a requested hook point needs, and `output` is None. `logits_at`: as in `forward`.
        """
        default = [n for n in self.hook_names if not n.endswith("attn.hook_result")]
        names = list(default if names is None else names)
        points = [self.hook_point(n) for n in names]
        cache: dict[str, torch.Tensor] = {}

        def record(t: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = t.detach()

        with ExitStack() as stack:
            stack.enter_context(self.hooks([(name, record) for name in names]))
            stop_block = self._stop_block(points) if stop_early else None
            if stop_block is not None:
                stack.enter_context(_raise_after(stop_block))
            try:
                output = self.forward(x, logits_at)
            except StopForward:
                output = None
        return output, {n: cache[n] for n in names}

    def _stop_block(self, points: list[HookPoint]) -> nn.Module | None:
        """The block after which every requested point has run (the language model runs last)."""
        if any(p.site in ("hook_final", FINAL_SCALE) for p in points):
            return None
        lm_points = [p for p in points if p.lm]
        points = lm_points or points
        layers = self._stack(points[0]).layers if points else self._sites.layers
        last = max((p.layer or 0) for p in points) if points else 0
        return layers[last].block if last < len(layers) - 1 else None

    def _stack(self, point: HookPoint) -> LanguageSites | ModelSites:
        return self._sites.lm if point.lm else self._sites

    def _release(self, points: list[HookPoint]) -> None:
        self._attached = [p for p in self._attached if all(p is not q for q in points)]  # by identity

    @contextmanager
    def resume(self, layer: int, resid_pre: torch.Tensor) -> Iterator[HookedVisionModel]:
        """Within the block the language model's layers before `layer` do not run: layer `layer` takes `resid_pre`,
        the clean value of `lm.blocks.{layer}.hook_resid_pre` for the same input, so a run hooked at that layer or
        later (a dictionary spliced in there) costs only the layers from there on, with the output of the full
        run. Hooks attached before `layer` (or on the vision tower, or at `lm.hook_embed`) would not run: running
        with one raises `InvalidRequest`."""
        if self._sites.lm is None:
            raise InvalidRequest(f"{self.name} is not a multimodal language model: resume is for its language model")
        if not 0 <= layer < len(self._sites.lm.layers):
            raise InvalidRequest(f"resume: layer {layer} is not one of the language model's 0..{self.lm_n_layers - 1}")
        blocks = [sites.block for sites in self._sites.lm.layers[:layer]]

        def replay(*_args, **_kwargs) -> torch.Tensor:
            early = [
                p.name
                for p in self._attached
                if not p.lm or p.site == "hook_embed" or (p.layer is not None and p.layer < layer)
            ]
            if early:
                raise InvalidRequest(f"resume at lm layer {layer}: hooks {early} come before it and would not run")
            return resid_pre

        saved = [block.__dict__.get("forward") for block in blocks]  # an instance's own forward (accelerate's)
        try:
            for block in blocks:
                block.forward = replay
            yield self
        finally:
            for block, forward in zip(blocks, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def _detach(self, entries: list[_Entry]) -> None:
        self._hook_entries = [e for e in self._hook_entries if e not in entries]  # by identity
        self._dispatch()

    def _dispatch(self) -> None:
        """(Re)attach one PyTorch hook per (module, pre/post) that the active entries need.

        Each runs its module's hook points in forward order (`FORWARD_ORDER`, then registration order)
        and is prepended to the module's hooks, so that the model's own hooks (transformers' recorded
        `hidden_states`) see the replaced values too. Outside every `hooks(...)` block nothing is attached.
        """
        for handle in self._dispatch_handles:
            handle.remove()
        self._dispatch_handles, saved = [], {}
        groups: dict[tuple[int, str], tuple[nn.Module, list[tuple[float, int, Slot]]]] = {}
        for index, entry in enumerate(self._hook_entries):
            for module, phase, rank, slot in self._slots(entry.point, entry.fn, saved):
                groups.setdefault((id(module), phase), (module, []))[1].append((rank, index, slot))
        for (_, phase), (module, slots) in groups.items():
            run = _chain([slot for *_, slot in sorted(slots, key=lambda s: s[:2])])
            if phase == "pre":
                handle = module.register_forward_pre_hook(_pre_hook(run), with_kwargs=True, prepend=True)
            else:
                handle = module.register_forward_hook(_post_hook(run), prepend=True)
            self._dispatch_handles.append(handle)

    def _slots(self, point: HookPoint, fn: HookFn, saved: dict) -> list[tuple[nn.Module, str, float, Slot]]:
        """Where `point` runs: `(module, "pre" | "post", forward rank, slot)`; a point derived from the block
        input adds a slot that saves that input once the hooks at `hook_resid_pre` (and `hook_embed`) ran."""
        sites = self._stack(point)
        rank = float(FORWARD_ORDER.index(point.site))
        if point.site == "hook_embed":
            return [(sites.layers[0].block, "pre", rank, self._slot(point, fn))]
        if point.site == "hook_final":
            return [(sites.final, "post", rank, self._slot(point, fn))]
        layer = sites.layers[point.layer]
        key = (point.lm, point.layer)

        def pre() -> torch.Tensor:
            return saved[key]

        def minus_pre() -> torch.Tensor:
            return -saved[key]

        def save(raw: torch.Tensor) -> None:
            saved[key] = raw

        saver = (layer.block, "pre", FORWARD_ORDER.index("hook_resid_pre") + 0.5, save)
        site = point.site
        if site == "hook_resid_pre":
            return [(layer.block, "pre", rank, self._slot(point, fn))]
        if site == "hook_resid_post":
            return [(layer.block, "post", rank, self._slot(point, fn))]
        if site == "hook_mlp_in":
            return [(layer.mlp_in, "pre", rank, self._slot(point, fn))]
        if site == "hook_mlp_out":
            return [(layer.mlp_out, "post", rank, self._slot(point, fn, layer.mlp_scale))]
        if site == "hook_attn_out" and layer.attn_out is not None:
            return [(layer.attn_out, "post", rank, self._slot(point, fn, layer.attn_scale))]
        if site == "hook_attn_out":  # resid_mid - resid_pre, read only
            return [saver, (layer.resid_mid, "pre", rank, self._slot(point, _read_only(fn, point), offset=minus_pre))]
        if layer.attn_out is None:  # hook_resid_mid read at the module that takes it, read only
            return [(layer.resid_mid, "pre", rank, self._slot(point, _read_only(fn, point)))]
        # hook_resid_mid: resid_pre (as the block received it) + the attention branch, replaced through the branch
        return [saver, (layer.attn_out, "post", rank, self._slot(point, fn, layer.attn_scale, offset=pre))]

    def _slot(
        self,
        point: HookPoint,
        fn: HookFn,
        scale: Scale | None = None,
        offset: Callable[[], torch.Tensor] | None = None,
    ) -> Slot:
        """`raw -> replacement | None` for a module's input or output `raw`: `fn` sees `scale() * raw + offset()`
        (batch first) and a replacement `new` is passed on as `(new - offset()) / scale()`."""

        def slot(raw: torch.Tensor) -> torch.Tensor | None:
            gamma = scale() if scale is not None else None
            base = offset() if offset is not None else None
            value = raw if gamma is None else gamma * raw
            value = value if base is None else base + value
            new = self._call_hook(fn, value, point)
            if new is None:
                return None
            new = new if base is None else new - base
            return new if gamma is None else new / gamma

        return slot

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

    def _inner_site(self, point: HookPoint) -> InnerSite:
        """The site of an `attn.hook_pattern`, `INNER_SITES` or `ln_final.hook_scale` point."""
        per_layer, final = self._inner[point.lm]
        if point.site == FINAL_SCALE:
            return final
        if point.site == "attn.hook_pattern":
            return self._stack(point).layers[point.layer].pattern
        return per_layer[point.layer][point.site]

    def _attach_inner(self, point: HookPoint, fn: HookFn, stack: ExitStack) -> None:
        site = self._inner_site(point)
        call = fn if site.replaceable else _read_only(fn, point)

        def on_pattern(pattern: torch.Tensor) -> torch.Tensor | None:
            new = call(pattern, point)
            if new is not None and new.shape != pattern.shape:
                raise ValueError(f"Hook function at {point.name} must keep the shape {list(pattern.shape)}.")
            return new

        def on_value(raw: torch.Tensor) -> torch.Tensor | None:
            return self._call_hook(call, raw, point)

        stack.enter_context(site.attach(on_pattern if point.site == "attn.hook_pattern" else on_value))

    def hook_shape(self, name: str) -> tuple[int | str, ...]:
        """The shape of the activation at `name`, `"batch"` first (`"seq"` for the tokens of `lm.` points):
        `[batch, tokens, d_model]`; `attn.hook_pattern` `[batch, heads, tokens, tokens]`; `attn.hook_q/k/v/z`
        `[batch, tokens, heads, d_head]` (k and v: the model's key/value heads); `attn.hook_result`
        `[batch, tokens, heads, d_model]`; `mlp.hook_pre/post` `[batch, tokens, d_mlp]`; `*.hook_scale`
        `[batch, tokens, 1]`. An unknown name raises `UnknownHookPoint`."""
        point = self.hook_point(name)
        tokens: int | str = "seq" if point.lm else self.token_layout.n_tokens
        d_model = self.lm_d_model if point.lm else self.d_model
        n_heads = self._stack(point).n_heads
        if point.site == "attn.hook_pattern":
            return ("batch", n_heads, tokens, tokens)
        if point.site.endswith("hook_scale"):
            return ("batch", tokens, 1)
        parts = self._stack(point).layers[point.layer].parts if point.layer is not None else None
        weights = block_weights(parts)
        if point.site in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"):
            w = weights["W_O" if point.site == "attn.hook_z" else "W_" + point.site[-1].upper()]
            return ("batch", tokens, int(w.shape[0]), parts.d_head)
        if point.site == "attn.hook_result":
            return ("batch", tokens, int(weights["W_O"].shape[0]), d_model)
        if point.site in ("mlp.hook_pre", "mlp.hook_post"):
            w = weights["W_in"] if point.site == "mlp.hook_pre" else weights["W_out"].T
            return ("batch", tokens, int(w.shape[1]))
        return ("batch", tokens, d_model)

    def read_is_exact(self, name: str) -> bool:
        """Whether reading `name` leaves the forward pass bit for bit as it is. False for `attn.hook_pattern`
        (except where it is recomputed on the side) and for the per-head points of OpenCLIP's
        `nn.MultiheadAttention`, whose attention then takes its explicit path (float rounding only)."""
        point = self.hook_point(name)
        return not _is_inner(point) or self._inner_site(point).exact

    def weights(self, layer: int, lm: bool = False) -> dict[str, torch.Tensor | None]:
        """Block `layer`'s weights in TransformerLens names and shapes, as views of the model's parameters
        (edit them under `torch.no_grad()` to edit the model): `W_Q`, `W_K`, `W_V` `[heads, d_model, d_head]`,
        `b_Q`, `b_K`, `b_V` `[heads, d_head]`, `W_O` `[heads, d_head, d_model]`, `b_O` `[d_model]`, `W_in`
        `[d_model, d_mlp]`, `b_in`, `W_out` `[d_mlp, d_model]`, `b_out`: those the model's modules expose
        (the same ones as its per-head and neuron hook points); a bias the model lacks is None. `lm=True`: the
        language model of a multimodal model. A layer out of range raises `InvalidRequest`."""
        layers = self._sites.lm.layers if lm and self._sites.lm is not None else self._sites.layers
        if not 0 <= layer < len(layers):
            raise InvalidRequest(f"{self.name} has blocks 0..{len(layers) - 1}; got layer {layer}.")
        return block_weights(layers[layer].parts)

    @property
    def W_E(self) -> torch.Tensor | None:  # noqa: N802 (TransformerLens name)
        """The patch embedding `[in_channels * patch pixels, d_model]` (a view of the patch convolution's
        weight, flattened channel-major as the convolution reads a patch); None where patches are embedded by
        something other than one convolution (the toy models' convolutional stems)."""
        conv = self._sites.patch_embed
        return None if conv is None else conv.weight.flatten(1).T

    @property
    def W_pos(self) -> torch.Tensor | None:  # noqa: N802 (TransformerLens name)
        """The learned position embeddings `[positions, d_model]` (a view); None where there are none."""
        return None if self._sites.pos_embed is None else self._sites.pos_embed()


def per_token(value: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """One vector per token, `[batch, tokens, width]`: a per-head activation `[batch, tokens, heads, d]` with its
    heads flattened into the width (head-major: column `h * d + i`), or only head `head`; other activations as
    they are."""
    if value.dim() != 4:
        return value
    return value.flatten(2) if head is None else value[:, :, head]


def _stack_inner(stack: LanguageSites | ModelSites) -> tuple[list[dict[str, InnerSite]], InnerSite | None]:
    """Per layer, the inner sites its parts reach; and `ln_final.hook_scale` where the final module is a norm."""
    scale = norm_scale(stack.final)
    final = None if scale is None else ModuleTap(stack.final, "pre", scale)
    return [inner_sites(layer.parts) for layer in stack.layers], final


def _listed(stack: LanguageSites | ModelSites, inner: tuple) -> tuple[bool, set[str], bool]:
    """`(with_pattern, inner sites, final_scale)` of a stack: what every one of its layers has."""
    per_layer, final = inner
    with_pattern = all(layer.pattern is not None for layer in stack.layers)
    common = set.intersection(*(set(sites) for sites in per_layer)) if per_layer else set()
    return with_pattern, common, final is not None


def _is_inner(point: HookPoint) -> bool:
    return point.site in INNER_SITES or point.site in ("attn.hook_pattern", FINAL_SCALE)


def _chain(slots: list[Slot]) -> Slot:
    """Run `slots` in order, each on the value the previous ones left; the final value, or None if unchanged."""

    def run(raw: torch.Tensor) -> torch.Tensor | None:
        value = raw
        for slot in slots:
            new = slot(value)
            if new is not None:
                value = new
        return None if value is raw else value

    return run


def _pre_hook(run: Slot) -> Callable:
    """A forward pre-hook (with kwargs) that applies `run` to the module's first input (or `hidden_states`)."""

    def pre_hook(_module, args, kwargs):
        new = run(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return pre_hook


def _post_hook(run: Slot) -> Callable:
    """A forward hook that applies `run` to the module's output (or its first element)."""

    def post_hook(_module, _args, output):
        new = run(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return post_hook


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
