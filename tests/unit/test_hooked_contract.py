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
import pkgutil
import sys
from collections.abc import Mapping
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
from prisma_ray.models.hook_points import BLOCK_SITES
from tests import lmm_tiny
from tests.tiny_models import HF, OPEN_CLIP, TIMM, WITHOUT_PATTERN, batch, read_only_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SITES = tuple(s for s in BLOCK_SITES if s != "attn.hook_pattern")  # the sites of one vector per token


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
def test_cache_shapes_follow_the_token_layout(vision):
    """Activations are `[n, tokens, d_model]`, patterns `[n, heads, tokens, tokens]` rows summing to 1."""
    case, model = vision
    n, n_tokens = 3, model.token_layout.n_tokens
    _, cache = model.run_with_cache(case.inputs(model, n))
    for name, value in cache.items():
        if name.endswith("hook_pattern"):
            assert value.shape == (n, model.n_heads, n_tokens, n_tokens)
            assert torch.allclose(value.sum(-1), torch.ones(()), atol=1e-5)
        else:
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
