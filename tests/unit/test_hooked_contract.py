"""The contract every hooked model keeps, whatever its adapter (timm, OpenCLIP, Hugging Face image and video,
multimodal language models, the embedded toy models): reading hook points changes nothing, caches follow
the token layout, the residual stream decomposes, identity interventions change nothing, ablations reach
the output and are undone, early stopping caches the same values, and `.to()` moves and casts the model.

Each check runs over small random-weight models of every adapter (`tests.tiny_models`, `tests.lmm_tiny`);
the source-specific tests stay in the per-source files.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import sys
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import prisma_ray
from prisma_ray.models import (
    HookedVisionModel,
    InterventionNotSupported,
    ModelEntry,
    describe_model,
    get_entry,
    load_model,
)
from prisma_ray.models.adapters.open_clip_adapter import AttentionPatternSite
from prisma_ray.models.hook_points import BLOCK_SITES, FORWARD_ORDER, HookPoint
from prisma_ray.models.sites import LayerSites
from tests import lmm_tiny
from tests.tiny_models import HF, OPEN_CLIP, TIMM, WITHOUT_PATTERN, batch, read_only_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SITES = tuple(s for s in BLOCK_SITES if s != "attn.hook_pattern")  # the sites of one vector per token
PATTERN_RTOL, PATTERN_ATOL = 1.3e-6, 1e-5  # how far reading attention patterns may move a float32 output (README)


@dataclass(frozen=True)
class Case:
    """One model under contract: its entry, and for a multimodal model the name of its tiny configuration."""

    entry: ModelEntry
    lmm: str | None = None

    @property
    def prefix(self) -> str:
        """The hook-name prefix of the stack whose residual stream is checked (the language model's for an LMM)."""
        return "lm." if self.lmm else ""

    @property
    def exact(self) -> bool:
        """Whether `resid_pre + attn_out == resid_mid` holds bit for bit (timm and OpenCLIP blocks; a Hugging
        Face block adds its branches inside the module, checked within 1e-5)."""
        return self.entry.source in ("timm", "open_clip") or self.entry.architecture == "toy-vit-shapes"

    def inputs(self, model: HookedVisionModel, n: int = 2):
        return lmm_tiny.inputs(self.lmm)[0] if self.lmm else batch(model, n)


CASES = {
    **{f"timm-{kind}": Case(entry) for kind, entry in TIMM.items()},
    **{f"open_clip-{kind}": Case(entry) for kind, entry in OPEN_CLIP.items() if kind != "eva02-timm"},
    **{f"hf-{entry.architecture}": Case(entry) for entry in HF},
    **{name: Case(get_entry(name)) for name in ("prisma-toy-vit-shapes", "prisma-toy-video-moving-shapes")},
    **{f"lmm-{name}": Case(lmm_tiny.tiny_entry(name), lmm=name) for name in sorted(lmm_tiny.CONFIGS)},
}
VISION = [key for key, case in CASES.items() if not case.lmm]
# one model per adapter, for the checks that rebuild their model
PER_ADAPTER = [
    "timm-vit",
    "open_clip-native",
    "hf-ViTModel",
    "hf-VideoMAEModel",
    "prisma-toy-vit-shapes",
    "prisma-toy-video-moving-shapes",
    "lmm-llava-next",
    "lmm-qwen2-vl",
]


@pytest.fixture(scope="module")
def built() -> dict[str, HookedVisionModel]:
    """The models built so far in this module, by case (each built once, with random weights from seed 0)."""
    return {}


def _case(key: str, built: dict[str, HookedVisionModel]) -> tuple[Case, HookedVisionModel]:
    case = CASES[key]
    if key not in built:
        built[key] = load_model(case.entry, pretrained=False, seed=0)
    return case, built[key]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, built) -> tuple[Case, HookedVisionModel]:
    return _case(request.param, built)


@pytest.fixture(scope="module", params=VISION)
def vision(request, built) -> tuple[Case, HookedVisionModel]:
    return _case(request.param, built)


def source_outputs(case: Case, model: HookedVisionModel, x) -> list[torch.Tensor]:
    """Every tensor the unhooked source model returns for `x`."""
    if case.lmm:
        extra = dict(mm_token_type_ids=(x["input_ids"] == lmm_tiny.IMAGE_ID).int()) if "qwen" in case.lmm else {}
        return [model.model(**x, **extra, use_cache=False).logits]
    if hasattr(model.model, "main_input_name"):  # a transformers model: returns a ModelOutput
        out = model.model(**{model.model.main_input_name: x})
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    out = model.model(x)
    return list(out) if isinstance(out, tuple) else [out]


def test_shape_matches_the_entry(case):
    case, model = case
    entry = case.entry
    assert (model.n_layers, model.d_model, model.n_heads) == (entry.layers, entry.width, entry.heads)
    assert not model.training


@torch.no_grad()
def test_read_hooks_leave_the_output_bit_identical(case):
    case, model = case
    x = case.inputs(model)
    reference = model(x)
    assert any(torch.equal(reference, raw) for raw in source_outputs(case, model, x)), "forward is the source's"
    names = read_only_names(model)
    output, cache = model.run_with_cache(x, names)
    assert torch.equal(output, reference)
    assert set(cache) == set(names)
    with model.hooks([(n, lambda t, hook: None) for n in names]):
        assert torch.equal(model(x), reference)
    assert torch.equal(model(x), reference)


@torch.no_grad()
def test_reading_attention_patterns_moves_the_output_by_float_rounding_at_most(case):
    """What the README states: reading `attn.hook_pattern` leaves the output bit-identical where the pattern is
    recomputed from the attention's input (OpenCLIP's own `Attention`); elsewhere the attention takes the path
    that materialises its probabilities while the hook is attached, and the output moves by float rounding
    only, within `PATTERN_RTOL * |output| + PATTERN_ATOL`."""
    case, model = case
    x = case.inputs(model)
    reference = model(x)
    names = [n for n in model.hook_names if n.endswith("attn.hook_pattern")]
    output, _ = model.run_with_cache(x, names)
    stacks = [model._sites, *([model._sites.lm] if case.lmm else [])]
    patterns = [layer.pattern for stack in stacks for layer in stack.layers if layer.pattern is not None]
    if all(isinstance(site, AttentionPatternSite) for site in patterns):
        assert torch.equal(output, reference)
    else:
        torch.testing.assert_close(output, reference, rtol=PATTERN_RTOL, atol=PATTERN_ATOL)
    assert torch.equal(model(x), reference), "the fused path is back once the hook is removed"


@torch.no_grad()
def test_cache_shapes_follow_the_token_layout(vision):
    """Activations are `[n, tokens, d_model]` (per-head and neuron points: the shape `hook_shape` gives), patterns
    `[n, heads, tokens, tokens]` rows summing to 1."""
    case, model = vision
    n, n_tokens = 3, model.token_layout.n_tokens
    _, cache = model.run_with_cache(case.inputs(model, n))
    for name, value in cache.items():
        assert value.shape == (n, *model.hook_shape(name)[1:]), name
        if name.endswith("hook_pattern"):
            assert value.shape == (n, model.n_heads, n_tokens, n_tokens)
            assert torch.allclose(value.sum(-1), torch.ones(()), atol=1e-5)
        elif model.hook_point(name).site in (*SITES, "hook_embed", "hook_final"):
            assert value.shape == (n, n_tokens, model.d_model), name
    has_pattern = case.entry.architecture not in WITHOUT_PATTERN
    assert (f"blocks.{model.n_layers - 1}.attn.hook_pattern" in cache) == has_pattern


@torch.no_grad()
def test_rows_of_a_batch_are_independent(vision):
    case, model = vision
    x = case.inputs(model, 3)
    together = model(x)
    for i in range(len(x)):
        torch.testing.assert_close(model(x[i : i + 1]), together[i : i + 1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "with-patterns"])
def test_residual_stream_decomposes(case, patterns):
    """pre + attn_out == mid, mid + mlp_out == post, post of one block is pre of the next, the embedding is
    block 0's input; also while attention patterns are read (some attention modules then take another path)."""
    case, model = case
    p = case.prefix
    names = [n for n in (model.hook_names if patterns else read_only_names(model)) if n.startswith(p)]
    _, cache = model.run_with_cache(case.inputs(model), names)
    n_layers = model.lm_n_layers if case.lmm else model.n_layers
    for layer in range(n_layers):
        pre, mid, post, attn, mlp = (
            cache[f"{p}blocks.{layer}.hook_{s}"]
            for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
        )
        if case.exact:
            assert torch.equal(pre + attn, mid)
            assert torch.allclose(mid + mlp, post, atol=1e-6)
        else:
            torch.testing.assert_close(pre + attn, mid, atol=1e-5, rtol=1.3e-6)
            torch.testing.assert_close(mid + mlp, post, atol=1e-5, rtol=1.3e-6)
        if layer:
            assert torch.equal(cache[f"{p}blocks.{layer - 1}.hook_resid_post"], pre)
    assert torch.equal(cache[f"{p}hook_embed"], cache[f"{p}blocks.0.hook_resid_pre"])


@torch.no_grad()
def test_identity_interventions_change_nothing(case):
    """Replacing a hook point of block 1 by a copy of itself leaves the output as it is: bit for bit where the
    replacement is passed on as it is, within 1e-6 where it is divided by a layer scale or is derived from
    another site (`resid_mid`, a derived `attn_out`), which some implementations can only read."""
    case, model = case
    x = case.inputs(model)
    reference = model(x)
    stack = model._sites.lm if case.lmm else model._sites
    layer = stack.layers[1]
    derived = layer.attn_out is None
    for site in SITES:
        name = f"{case.prefix}blocks.1.{site}"
        with model.hooks([(name, lambda t, hook: t.clone())]):
            if derived and site in ("hook_resid_mid", "hook_attn_out"):
                with pytest.raises(InterventionNotSupported):
                    model(x)
                continue
            out = model(x)
        scaled = (site == "hook_mlp_out" and layer.mlp_scale is not None) or (
            site == "hook_attn_out" and layer.attn_scale is not None
        )
        if site in ("hook_resid_pre", "hook_resid_post", "hook_mlp_in") or (site == "hook_mlp_out" and not scaled):
            assert torch.equal(out, reference), name
        else:
            assert torch.allclose(out, reference, atol=1e-6), name


@torch.no_grad()
def test_zero_ablation_changes_the_output_until_the_block_ends(case):
    case, model = case
    x = case.inputs(model)
    reference = model(x)
    names = ["lm.blocks.0.hook_mlp_out", "blocks.0.hook_mlp_out"] if case.lmm else ["blocks.0.hook_resid_post"]
    for name in names:
        with model.hooks([(name, lambda t, hook: torch.zeros_like(t))]):
            ablated = model(x)
        assert not torch.allclose(ablated, reference), name
        assert torch.equal(model(x), reference), "hooks must be removed when the block ends"


@torch.no_grad()
def test_early_stop_runs_no_later_block_and_caches_the_same_values(case):
    case, model = case
    x = case.inputs(model)
    p = case.prefix
    names = [f"{p}hook_embed", *(n for n in model.hook_names if n.startswith(f"{p}blocks.0."))]
    _, full = model.run_with_cache(x, names)
    calls = []
    stack = model._sites.lm if case.lmm else model._sites
    handle = stack.layers[-1].block.register_forward_hook(lambda *a: calls.append(1))
    output, early = model.run_with_cache(x, names, stop_early=True)
    handle.remove()
    assert output is None and not calls, "later blocks must not run"
    for name in names:
        assert torch.equal(full[name], early[name]), name


def _cast(x, dtype: torch.dtype):
    """`x` (a tensor, or a processor's output) with its floating-point tensors cast to `dtype`."""
    if isinstance(x, Mapping):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    return x.to(dtype)


def _floating(model: nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    tensors = [*model.parameters(), *model.buffers()]
    return {(t.device, t.dtype) for t in tensors if t.is_floating_point()}


@torch.no_grad()
@pytest.mark.parametrize("key", PER_ADAPTER)
def test_to_moves_and_casts_the_model_and_back(key):
    """`.double()`, `.half()`, `.float()`, `.to(dtype)`, `.to(device)` return the model itself, moved and cast,
    with the same outputs once back in float32 on the CPU."""
    case = CASES[key]
    model = load_model(case.entry, pretrained=False, seed=0)
    x = case.inputs(model)
    reference = model(x)
    cpu = torch.device("cpu")

    assert model.to(device="cpu") is model and model.to("cpu") is model
    assert torch.equal(model(x), reference)
    assert model.double() is model and _floating(model) == {(cpu, torch.float64)}
    torch.testing.assert_close(model(_cast(x, torch.float64)).float(), reference, atol=1e-4, rtol=1e-4)
    assert model.float() is model and _floating(model) == {(cpu, torch.float32)}
    assert torch.equal(model(x), reference), "float32 -> float64 -> float32 is exact"
    assert model.to(torch.float16) is model and _floating(model) == {(cpu, torch.float16)}
    assert model.half() is model and model.to(dtype=torch.float32) is model
    assert _floating(model) == {(cpu, torch.float32)}
    torch.testing.assert_close(model(x), reference, atol=0.05, rtol=0.05)


def test_to_meta_keeps_the_hook_points():
    model = load_model("prisma-toy-vit-shapes", device="cpu")
    names = list(model.hook_names)
    assert model.to("meta") is model and _floating(model) == {(torch.device("meta"), torch.float32)}
    assert model.hook_names == names


def test_load_model_casts_and_describe_model_allocates_nothing():
    model = load_model("prisma-toy-vit-shapes", device="cpu", dtype=torch.float64)
    assert _floating(model) == {(torch.device("cpu"), torch.float64)} and not model.training
    described = describe_model("prisma-toy-vit-shapes")
    assert _floating(described) == {(torch.device("meta"), torch.float32)}
    assert described.hook_names == model.hook_names


def test_random_weights_depend_on_the_seed_only():
    entry = TIMM["vit"]
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a, b, c = (load_model(entry, pretrained=False, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state), "the global random state is left as it was"
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


# torch.nn.Module methods that a subclass is meant to override
OVERRIDES = {"forward", "extra_repr", "train", "reset_parameters"}


def test_no_module_class_shadows_a_torch_module_method():
    """A method of an `nn.Module` subclass named like an `nn.Module` attribute replaces it for every caller
    (`HookedVisionModel._apply` once broke `.to()`, `.float()` and `.cuda()`)."""
    for info in pkgutil.walk_packages(prisma_ray.__path__, "prisma_ray."):
        importlib.import_module(info.name)
    module_names = {n for n in dir(nn.Module) if not (n.startswith("__") and n.endswith("__"))}
    classes = [
        cls
        for name in sorted(m for m in sys.modules if m.startswith("prisma_ray"))
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == name
    ]
    assert any(cls is HookedVisionModel for cls in classes)
    shadowing = {cls.__qualname__: sorted((set(vars(cls)) & module_names) - OVERRIDES) for cls in classes}
    assert not {k: v for k, v in shadowing.items() if v}


# --- Hook composition: every hook point sees and writes what the forward pass carries, whatever the order -------

# one model per adapter, plus the layouts that derive a hook point from a saved value in another way (a branch
# scaled by a layer-scale parameter, TimeSformer's `resid_mid - resid_pre`, a final module that is the last block)
COMPOSITION = [
    "timm-vit",
    "timm-beit",
    "open_clip-native",
    "hf-ViTModel",
    "hf-CLIPVisionModelWithProjection",
    "hf-VideoMAEModel",
    "hf-TimesformerForVideoClassification",
    "prisma-toy-vit-shapes",
    "lmm-llava-next",
]


def edit(point: HookPoint, t: torch.Tensor) -> torch.Tensor:
    """A replacement that depends on the value it replaces and differs per site, so that no two edits commute."""
    k = FORWARD_ORDER.index(point.site)
    return t * (1 + 0.25 * k) + 0.5 * (k + 1)


def composed_points(model: HookedVisionModel, case: Case, layer: int) -> list[HookPoint]:
    """The block-level hook points of block `layer`, with `hook_embed` for block 0 and `hook_final` for the last
    block."""
    p = case.prefix
    names = [f"{p}blocks.{layer}.{site}" for site in BLOCK_SITES if f"{p}blocks.{layer}.{site}" in model.hook_names]
    n_layers = model.lm_n_layers if case.lmm else model.n_layers
    names += [f"{p}hook_embed"] if layer == 0 else [f"{p}hook_final"] if layer == n_layers - 1 else []
    return [model.hook_point(n) for n in names]


def replaceable(sites: LayerSites, point: HookPoint) -> bool:
    if point.site == "attn.hook_pattern":
        return sites.pattern.replaceable
    return sites.attn_out is not None or point.site not in ("hook_attn_out", "hook_resid_mid")


@contextmanager
def reference_hooks(model: HookedVisionModel, layer: int, points: list[HookPoint], edits: set[str], seen: dict):
    """Plain PyTorch hooks, one per module, that compute `points` (the sites of block `layer`, `hook_embed`,
    `hook_final`) in forward order by hand: `seen[name]` is the value the forward pass carries there, and the
    points named in `edits` are replaced by `edit(point, value)`. `hook_resid_mid` is the block's input as the
    earlier hooks left it plus the attention branch as its hook left it."""
    by_site = {p.site: p for p in points}
    stack = model._stack(points[0])
    sites = stack.layers[layer]
    state: dict[str, torch.Tensor] = {}

    def visit(site: str, value: torch.Tensor) -> torch.Tensor:
        point = by_site.get(site)
        if point is None:
            return value
        seen[point.name] = value.clone()
        return edit(point, value) if point.name in edits else value

    def pre_hook(order: tuple[str, ...], save: bool = False):
        def hook(_module, args, kwargs):
            raw = args[0] if args else kwargs["hidden_states"]
            value = model._to_btd(raw)
            for site in order:
                value = visit(site, value)
            if save:
                state["pre"] = value
            if order == ("hook_resid_mid",):  # TimeSformer: attn_out is resid_mid - resid_pre
                visit("hook_attn_out", value - state["pre"])
            new = model._from_btd(value, raw)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def post_hook(order: tuple[str, ...], scale=None):
        def hook(_module, _args, output):
            raw = output[0] if isinstance(output, tuple) else output
            gamma = 1 if scale is None else scale()
            value = model._to_btd(raw) * gamma
            for site in order:
                value = visit(site, value)
            if "hook_attn_out" in order:
                mid = state["pre"] + value
                new_mid = visit("hook_resid_mid", mid)
                value = value if new_mid is mid else new_mid - state["pre"]
            new = model._from_btd(value / gamma, raw)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def pattern(p: torch.Tensor) -> torch.Tensor | None:
        new = visit("attn.hook_pattern", p)
        return None if new is p else new

    block_out = ("hook_resid_post", "hook_final") if stack.final is sites.block else ("hook_resid_post",)
    with ExitStack() as stack_:
        pre = [(sites.block, ("hook_embed", "hook_resid_pre"), True), (sites.mlp_in, ("hook_mlp_in",), False)]
        post = [(sites.mlp_out, ("hook_mlp_out",), sites.mlp_scale), (sites.block, block_out, None)]
        if sites.attn_out is not None:
            post.append((sites.attn_out, ("hook_attn_out",), sites.attn_scale))
        else:
            pre.append((sites.resid_mid, ("hook_resid_mid",), False))
        if stack.final is not sites.block:
            post.append((stack.final, ("hook_final",), None))
        for module, order, save in pre:
            handle = module.register_forward_pre_hook(pre_hook(order, save), with_kwargs=True, prepend=True)
            stack_.callback(handle.remove)
        for module, order, scale in post:
            stack_.callback(module.register_forward_hook(post_hook(order, scale), prepend=True).remove)
        if "attn.hook_pattern" in by_site:
            stack_.enter_context(sites.pattern.attach(pattern))
        yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda message: f"{what}: {message}")


def hooked_run(model, x, first: HookPoint, second: HookPoint, edits: set[str], nested: bool):
    """The output and the value each of two hooks saw, `first` registered before `second` (in one `hooks(...)`
    call, or in an outer and an inner one)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(t: torch.Tensor, point: HookPoint) -> torch.Tensor | None:
        seen[point.name] = t.clone()
        return edit(point, t) if point.name in edits else None

    with ExitStack() as stack:
        if nested:
            stack.enter_context(model.hooks([(first.name, hook)]))
            stack.enter_context(model.hooks([(second.name, hook)]))
        else:
            stack.enter_context(model.hooks([(first.name, hook), (second.name, hook)]))
        return model(x), seen


@torch.no_grad()
@pytest.mark.parametrize("key", COMPOSITION)
def test_every_pair_of_hooks_sees_and_writes_what_the_forward_pass_carries(key, built):
    """For each pair of hook points of block 0 (with `hook_embed`), and `hook_final` with each hook point of the
    last block, both registration orders, in one `hooks(...)` or nested ones, each reading or replacing: what each
    hook sees and the output equal plain PyTorch hooks placed on the modules in forward order."""
    case, model = _case(key, built)
    x = case.inputs(model, 1)
    n_layers = model.lm_n_layers if case.lmm else model.n_layers
    for layer in (0, n_layers - 1):
        points = composed_points(model, case, layer)
        sites = model._stack(points[0]).layers[layer]
        pairs = itertools.combinations(points, 2)
        for a, b in pairs if layer == 0 else ((p, points[-1]) for p in points[:-1]):
            for edits in ({a.name, b.name}, {a.name}, {b.name}):
                if not all(replaceable(sites, p) for p in (a, b) if p.name in edits):
                    continue
                seen: dict[str, torch.Tensor] = {}
                with reference_hooks(model, layer, [a, b], edits, seen):
                    expected = model(x)
                for first, second in ((a, b), (b, a)):
                    for nested in (False, True):
                        out, got = hooked_run(model, x, first, second, edits, nested)
                        where = f"{first.name} then {second.name}, nested={nested}, replacing {sorted(edits)}"
                        for name in (a.name, b.name):
                            assert_close(got[name], seen[name], f"{name}: {where}")
                        assert_close(out, expected, f"output: {where}")


@torch.no_grad()
def test_a_reader_at_resid_mid_registered_before_an_edit_at_resid_pre_sees_the_edit(built):
    """The report: `hooks([(resid_mid, read), (resid_pre, add 3)])` read a value off by exactly 3."""
    _, model = _case("timm-vit", built)
    x = batch(model, 1)
    seen = {}
    with model.hooks(
        [
            ("blocks.0.hook_resid_mid", lambda t, hook: seen.update(mid=t.clone())),
            ("blocks.0.hook_resid_pre", lambda t, hook: t + 3),
        ]
    ):
        _, cache = model.run_with_cache(x, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
    carried = cache["blocks.0.hook_resid_post"] - cache["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(seen["mid"], carried)
