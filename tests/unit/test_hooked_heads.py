"""Per-head, neuron and layer-norm hook points and the weight views, exact against the block-level points.

One image model per adapter (timm, OpenCLIP, Hugging Face, the toy ViT), two video models (Hugging Face
VideoMAE, the toy video transformer) and two with layer scale (OpenCLIP CLIPA, DINOv2): the heads' results sum
to `hook_attn_out`, the pattern is `softmax(q k^T / sqrt(d_head))`, the neurons times `W_out` give
`hook_mlp_out`, zero-ablating one head's z removes exactly its term, replacing q/k/v/z/neurons equals editing
the weights that produce them (through the weight views), and reading every point leaves the output as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.models import HookedVisionModel, InterventionNotSupported, get_entry, load_model
from prisma_ray.models.hook_points import INNER_SITES, UnknownHookPoint
from tests import lmm_tiny
from tests.tiny_models import HF, OPEN_CLIP, TIMM, batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HF_BY_ARCH = {entry.architecture: entry for entry in HF}
ENTRIES = {
    "timm-vit": TIMM["vit"],
    "open_clip-native": OPEN_CLIP["native"],
    "open_clip-clipa": OPEN_CLIP["clipa"],
    "hf-ViTModel": HF_BY_ARCH["ViTModel"],
    "hf-Dinov2Model": HF_BY_ARCH["Dinov2Model"],
    "hf-VideoMAEModel": HF_BY_ARCH["VideoMAEModel"],
    "toy-vit": get_entry("prisma-toy-vit-shapes"),
    "toy-video": get_entry("prisma-toy-video-moving-shapes"),
}
# The layer-scale factor of block `l`'s attention and MLP branches, where the model has one.
LAYER_SCALE: dict[str, Callable[[HookedVisionModel, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "open_clip-clipa": lambda m, l: (
        m.model.transformer.resblocks[l].ls_1.gamma,
        m.model.transformer.resblocks[l].ls_2.gamma,
    ),
    "hf-Dinov2Model": lambda m, l: (
        m.model.encoder.layer[l].layer_scale1.lambda1,
        m.model.encoder.layer[l].layer_scale2.lambda1,
    ),
}
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def built() -> dict[str, HookedVisionModel]:
    return {}


@pytest.fixture(params=list(ENTRIES))
def case(request, built) -> tuple[str, HookedVisionModel]:
    key = request.param
    if key not in built:
        built[key] = load_model(ENTRIES[key], pretrained=False, seed=0)
    return key, built[key]


def scales(key: str, model: HookedVisionModel, layer: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    return LAYER_SCALE[key](model, layer) if key in LAYER_SCALE else (1.0, 1.0)


def names(layer: int, *sites: str) -> list[str]:
    return [f"blocks.{layer}.{site}" for site in sites]


def test_every_model_lists_every_inner_point_with_its_shape(case):
    _, model = case
    for layer in range(model.n_layers):
        for name in names(layer, *INNER_SITES):
            assert name in model.hook_names, name
    d_head = model.d_model // model.n_heads
    assert model.hook_shape("blocks.0.attn.hook_q") == ("batch", model.token_layout.n_tokens, model.n_heads, d_head)
    assert model.hook_shape("blocks.0.attn.hook_result")[2:] == (model.n_heads, model.d_model)
    assert model.hook_shape("blocks.0.ln1.hook_scale")[2:] == (1,)
    with pytest.raises(UnknownHookPoint, match="hook_zz"):
        model.hook_shape("blocks.0.attn.hook_zz")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch(model, 1))
    assert "blocks.0.attn.hook_z" in cache and "blocks.0.attn.hook_result" not in cache, "results on request only"


@torch.no_grad()
def test_head_results_sum_to_the_attention_output_and_the_pattern_is_softmax_qk(case):
    key, model = case
    x = batch(model)
    for layer in (0, model.n_layers - 1):
        sites = ("attn.hook_q", "attn.hook_k", "attn.hook_result", "attn.hook_pattern", "hook_attn_out")
        _, cache = model.run_with_cache(x, names(layer, *sites))
        q, k, result, pattern, attn_out = (cache[n] for n in names(layer, *sites))
        gamma, _ = scales(key, model, layer)
        heads = (result.sum(2) + model.weights(layer)["b_O"]) * gamma
        torch.testing.assert_close(heads, attn_out, **TOL)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        torch.testing.assert_close(scores.softmax(-1), pattern, **TOL)


@torch.no_grad()
def test_neurons_times_w_out_give_the_mlp_output_and_ln_points_normalise(case):
    key, model = case
    x = batch(model)
    layer = model.n_layers - 1
    sites = ("mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized")
    _, cache = model.run_with_cache(x, names(layer, *sites))
    pre, post, mlp_out, mid, scale, normalized = (cache[n] for n in names(layer, *sites))
    w = model.weights(layer)
    _, gamma = scales(key, model, layer)
    torch.testing.assert_close((post @ w["W_out"] + w["b_out"]) * gamma, mlp_out, **TOL)
    assert pre.shape == post.shape == (*mid.shape[:2], w["W_in"].shape[1])
    ln2 = model._sites.layers[layer].parts.ln2
    centred = mid - mid.mean(-1, keepdim=True)
    torch.testing.assert_close(centred / scale * ln2.weight + ln2.bias, normalized, **TOL)


@torch.no_grad()
def test_zero_ablating_one_heads_z_removes_exactly_its_term(case):
    key, model = case
    x = batch(model, 1)
    head, layer = 1, 0
    z, result, attn_out = names(layer, "attn.hook_z", "attn.hook_result", "hook_attn_out")
    _, clean = model.run_with_cache(x, [result, attn_out])

    def ablate(t, hook):
        t = t.clone()
        t[:, :, head] = 0
        return t

    with model.hooks([(z, ablate)]):
        out, ablated = model.run_with_cache(x, [result, attn_out])
    gamma, _ = scales(key, model, layer)
    torch.testing.assert_close(ablated[attn_out], clean[attn_out] - clean[result][:, :, head] * gamma, **TOL)
    assert torch.count_nonzero(ablated[result][:, :, head]) == 0, "hook_result sees the replaced z"
    assert not torch.allclose(out, model(x))


@torch.no_grad()
def test_reading_every_point_leaves_the_output_as_it_is(case):
    """Bit for bit where `read_is_exact` (module hooks only); by float rounding where the attention takes its
    explicit path (OpenCLIP's `nn.MultiheadAttention`)."""
    _, model = case
    x = batch(model)
    reference = model(x)
    inner = [n for n in model.hook_names if model.hook_point(n).site in INNER_SITES or n.startswith("ln_final")]
    output, cache = model.run_with_cache(x, inner)
    assert set(cache) == set(inner)
    if all(model.read_is_exact(n) for n in inner):
        assert torch.equal(output, reference)
    else:
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1.3e-6)
    assert torch.equal(model(x), reference), "hooks and paths are undone"


def _scale_head(t: torch.Tensor, index: int, factor: float) -> torch.Tensor:
    t = t.clone()
    t[:, :, index] = t[:, :, index] * factor
    return t


@torch.no_grad()
@pytest.mark.parametrize(
    "site", ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_pre", "mlp.hook_post"]
)
def test_replacing_a_point_equals_editing_the_weights_that_make_it(case, site):
    """Scaling head 1 of q/k/v (neuron 3 of hook_pre) by 1.5 at the hook point gives the output of the model whose
    weight views for that head (neuron) are scaled by 1.5: `W_Q`/`b_Q`, ..., `W_O` for z, `W_in`/`b_in` for the
    pre-activation and the row of `W_out` for the post-activation. The weights are restored afterwards."""
    _, model = case
    x = batch(model, 1)
    index, factor, layer = (1, 1.5, 0) if site.startswith("attn") else (3, 1.5, 0)
    with model.hooks([(f"blocks.{layer}.{site}", lambda t, hook: _scale_head(t, index, factor))]):
        hooked = model(x)
    w = model.weights(layer)
    edited = {
        "attn.hook_q": ("W_Q", "b_Q"),
        "attn.hook_k": ("W_K", "b_K"),
        "attn.hook_v": ("W_V", "b_V"),
        "attn.hook_z": ("W_O",),
        "mlp.hook_pre": ("W_in", "b_in"),
        "mlp.hook_post": ("W_out",),
    }[site]
    views = [w[name] for name in edited if w[name] is not None]
    saved = [v.clone() for v in views]
    for view in views:
        if view.dim() == 1:  # b_in
            view[index] *= factor
        elif view.shape[0] == model.n_heads or site != "mlp.hook_pre":  # per head, or W_out's rows
            view[index] *= factor
        else:  # W_in [d_model, d_mlp]: a column
            view[:, index] *= factor
    edited_out = model(x)
    for view, old in zip(views, saved):
        view.copy_(old)
    torch.testing.assert_close(hooked, edited_out, **TOL)
    assert not torch.allclose(hooked, model(x))


@torch.no_grad()
def test_weights_are_views_and_editing_one_heads_w_o_changes_the_output(case):
    _, model = case
    x = batch(model, 1)
    reference = model(x)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    w = model.weights(0)
    for name, tensor in w.items():
        assert tensor is None or tensor.untyped_storage().data_ptr() in params, name
    d_head = model.d_model // model.n_heads
    assert w["W_Q"].shape == w["W_K"].shape == w["W_V"].shape == (model.n_heads, model.d_model, d_head)
    assert w["W_O"].shape == (model.n_heads, d_head, model.d_model)
    saved = w["W_O"][1].clone()
    w["W_O"][1] = 0
    edited = model(x)
    w["W_O"][1] = saved
    assert not torch.allclose(edited, reference)
    with model.hooks([("blocks.0.attn.hook_z", lambda t, hook: _scale_head(t, 1, 0.0))]):
        torch.testing.assert_close(model(x), edited, **TOL)
    assert torch.equal(model(x), reference)
    for embedding in (model.W_E, model.W_pos):
        assert embedding is None or embedding.untyped_storage().data_ptr() in params
    with pytest.raises(InvalidRequest, match="blocks 0"):
        model.weights(model.n_layers)


@torch.no_grad()
def test_replacing_a_heads_result_equals_ablating_its_z_and_scales_are_read_only(case):
    """A replaced `hook_result` is summed over heads into the output projection (plus `b_O`), so zeroing one
    head's result equals zeroing its z; two functions at one point run in registration order, each on what the
    previous one left. `ln*.hook_scale` can be read only."""
    _, model = case
    x = batch(model, 1)
    seen = []
    with model.hooks([("blocks.0.attn.hook_z", lambda t, hook: _scale_head(t, 1, 0.0))]):
        by_z = model(x)
    with model.hooks(
        [
            ("blocks.0.attn.hook_result", lambda t, hook: _scale_head(t, 1, 0.0)),
            ("blocks.0.attn.hook_result", lambda t, hook: seen.append(t[:, :, 1].abs().max())),
        ]
    ):
        by_result = model(x)
    torch.testing.assert_close(by_result, by_z, **TOL)
    assert seen == [0]
    with model.hooks([("blocks.0.ln1.hook_scale", lambda t, hook: t * 2)]):
        with pytest.raises(InterventionNotSupported, match="ln1.hook_scale"):
            model(x)


@torch.no_grad()
def test_language_model_heads_of_a_multimodal_model():
    """`lm.` points of a grouped-query language model (LLaVA-NeXT's Llama: 4 query heads, 2 key/value heads):
    k and v have the key/value heads, the heads' results sum to `hook_attn_out`, reading them changes nothing."""
    name = "llava-next"
    model = load_model(lmm_tiny.tiny_entry(name), pretrained=False, seed=0)
    x = lmm_tiny.inputs(name)[0]
    reference = model(x)
    points = [f"lm.blocks.1.{s}" for s in ("attn.hook_q", "attn.hook_k", "attn.hook_result", "hook_attn_out")]
    output, cache = model.run_with_cache(x, points)
    q, k, result, attn_out = (cache[p] for p in points)
    assert torch.equal(output, reference)
    assert (q.shape[2], k.shape[2]) == (4, 2) and model.hook_shape(points[1]) == ("batch", "seq", 2, 8)
    b_o = model.weights(1, lm=True)["b_O"]
    torch.testing.assert_close(result.sum(2) + (0 if b_o is None else b_o), attn_out, **TOL)
