"""Multimodal language models as hooked models: tiny random Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and LLaVA-NeXT."""

import numpy as np
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.models import TokenKind, UnknownHookPoint
from prisma_ray.models.hook_points import BLOCK_SITES
from prisma_ray.models.spec import ImageView
from tests.lmm_tiny import CONFIGS, IMAGE_ID, VIDEO_ID, inputs, prompt, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SITES = tuple(s for s in BLOCK_SITES if s != "attn.hook_pattern")  # the sites of one vector per token


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    return request.param, tiny(request.param)


def test_hook_names_cover_vision_tower_and_language_model(case):
    _, model = case
    assert "blocks.1.hook_resid_post" in model.hook_names
    for site in SITES:
        assert f"lm.blocks.1.{site}" in model.hook_names
    assert model.hook_point("lm.blocks.1.hook_resid_post").lm
    with pytest.raises(UnknownHookPoint, match="lm.blocks.1.hook_resid_post"):
        model.hook_point("lm.blocks.1.hook_resid_pst")


@torch.no_grad()
def test_cache_shapes_follow_the_sequence(case):
    """Language-model activations are `[1, seq, lm_d_model]`, its patterns `[1, heads, seq, seq]`; the vision
    tower's are `d_model` wide (the rest of the contract is in `test_hooked_contract.py`)."""
    family, model = case
    batch, _, _ = inputs(family)
    names = ["blocks.0.hook_resid_post", *(f"lm.blocks.{layer}.{site}" for layer in range(2) for site in SITES)]
    _, cache = model.run_with_cache(batch, names)
    seq = batch["input_ids"].shape[1]
    for name in names[1:]:
        assert cache[name].shape == (1, seq, model.lm_d_model), name
    assert cache["blocks.0.hook_resid_post"].shape[-1] == model.d_model
    _, patterns = model.run_with_cache(batch, ["lm.blocks.0.attn.hook_pattern"])
    assert patterns["lm.blocks.0.attn.hook_pattern"].shape == (1, 4, seq, seq)


def test_layout_marks_exactly_the_image_tokens(case):
    family, model = case
    batch, n_image, base = inputs(family)
    layout = model.multimodal_layout(batch)
    is_image = (batch["input_ids"] == IMAGE_ID).numpy()
    assert (layout.image_mask() == is_image).all()
    assert (layout.kind[~is_image] == TokenKind.TEXT).all()
    assert layout.views[0].view == 0 and layout.views[0].grid == base
    first = is_image[0].argmax()
    assert list(layout.row[0, first : first + 4]) == [0, 0, 1, 1]
    assert list(layout.col[0, first : first + 4]) == [0, 1, 0, 1]
    if not family.startswith("qwen"):
        crops = layout.views[1]
        assert (crops.view, crops.grid) == (1, (2, 4))
        assert (layout.kind == TokenKind.NEWLINE).sum() == 2


def test_layout_rejects_wrong_number_of_image_tokens(case):
    family, model = case
    batch, n_image, _ = inputs(family)
    batch["input_ids"] = prompt(n_image - 1)
    with pytest.raises(ValueError, match=f"hold {n_image - 1} placeholder tokens of id {IMAGE_ID}"):
        model.multimodal_layout(batch)


def test_plain_tensor_input_is_refused_with_what_to_pass(case):
    _, model = case
    with pytest.raises(ValueError, match="processor's output"):
        model(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_video_tokens_carry_their_frames(name):
    model = tiny(name)
    video = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    batch = model.encode([video], ["What happens?"])
    layout = model.multimodal_layout(batch)
    is_video = (batch["input_ids"] == VIDEO_ID).numpy()
    assert is_video.sum() == 8, "4 frames in temporal patches of 2, each 4x4 patches merged 2x2"
    assert (layout.kind[is_video] == TokenKind.PATCH).all() and (layout.kind[~is_video] == TokenKind.TEXT).all()
    assert layout.frame[is_video].tolist() == [0] * 4 + [2] * 4 and (layout.frame[~is_video] == -1).all()
    assert layout.row[is_video].tolist() == [0, 0, 1, 1] * 2 and layout.col[is_video].tolist() == [0, 1] * 4
    assert layout.views == (ImageView(sample=0, image=0, view=0, grid=(2, 2), frames=2),)
    with torch.no_grad():
        plain = model(batch)
        reversed_video = model(model.encode([video[::-1].copy()], ["What happens?"]))
        _, cache = model.run_with_cache(batch, ["lm.blocks.1.hook_resid_post"])
    assert cache["lm.blocks.1.hook_resid_post"].shape == (1, batch["input_ids"].shape[1], model.lm_d_model)
    assert not torch.allclose(plain, reversed_video), "the frames' order reaches the language model"


def test_llava_takes_images_only():
    model = tiny("llava-next")
    with pytest.raises(ValueError, match="video inputs are supported for Qwen2-VL and Qwen2.5-VL"):
        model.encode([np.zeros((4, 28, 28, 3), np.uint8)], ["What happens?"])


@torch.no_grad()
def test_a_replaced_vision_block_output_reaches_the_language_model_through_the_recorded_hidden_states():
    """LLaVA reads its image features from the vision tower's `hidden_states`, which transformers records with
    its own forward hooks: a replacement at `blocks.0.hook_resid_post` (the feature layer, -2) must be what is
    recorded, as when the block itself returned the replaced value (a plain hook run before transformers' own)."""
    model = tiny("llava-next")
    batch, _, _ = inputs("llava-next")
    block = model._sites.layers[0].block

    def double(t: torch.Tensor, _hook) -> torch.Tensor:
        return 2 * t

    _, clean = model.run_with_cache(batch, ["lm.hook_embed"])
    with model.hooks([("blocks.0.hook_resid_post", double)]):
        _, hooked = model.run_with_cache(batch, ["lm.hook_embed"])
    handle = block.register_forward_hook(lambda _m, _a, out: 2 * out, prepend=True)
    try:
        _, reference = model.run_with_cache(batch, ["lm.hook_embed"])
    finally:
        handle.remove()
    image = batch["input_ids"] == IMAGE_ID
    assert not torch.allclose(reference["lm.hook_embed"][image], clean["lm.hook_embed"][image])
    torch.testing.assert_close(hooked["lm.hook_embed"], reference["lm.hook_embed"])


def tower(model) -> torch.nn.Module:
    inner = model.model.model
    return inner.visual if hasattr(inner, "visual") else inner.vision_tower


@torch.inference_mode()
def test_logits_at_and_lm_input_give_the_full_runs_values_for_less_work(case):
    """`logits_at` projects only its positions onto the vocabulary (`[N, vocab]`, as `output[logits_at]`);
    `lm_input` runs the vision tower once, and the model on it gives the same logits without the tower; a tower
    hook attached to such a run is refused, as is a mask not shaped as `input_ids`."""
    family, model = case
    batch, _, _ = inputs(family)
    full = model(batch)
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    mask[:, -3:] = True
    rows, towers = [], []
    handles = [
        model.model.lm_head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[:-1].numel())),
        tower(model).register_forward_pre_hook(lambda *_: towers.append(1)),
    ]
    try:
        masked = model(batch, logits_at=mask)
        assert rows == [3] and len(towers) == 1, "the vocabulary projection at the 3 masked positions only"
        lm = model.lm_input(batch)
        assert len(towers) == 2 and "pixel_values" not in lm
        output, cache = model.run_with_cache(lm, ["lm.blocks.1.hook_resid_post"], logits_at=mask)
        assert len(towers) == 2, "no tower run on the encoded input"
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(masked, full[mask])
    torch.testing.assert_close(model(lm), full)
    torch.testing.assert_close(output, full[mask])
    assert cache["lm.blocks.1.hook_resid_post"].shape == (*batch["input_ids"].shape, model.lm_d_model)
    with model.hooks([("blocks.0.hook_resid_post", lambda t, _hook: None)]):
        with pytest.raises(InvalidRequest, match="already encoded"):
            model(lm)
    model(lm)  # the tower hook is gone again
    with pytest.raises(InvalidRequest, match="bool mask shaped as input_ids"):
        model(batch, logits_at=mask[:, 1:])


@torch.inference_mode()
def test_resume_skips_the_language_model_layers_before_the_hooked_one_and_gives_the_full_runs_output(case):
    family, model = case
    batch, _, _ = inputs(family)
    double = ("lm.blocks.1.hook_resid_post", lambda t, _hook: 2 * t)
    lm = model.lm_input(batch)
    _, clean = model.run_with_cache(lm, ["lm.blocks.1.hook_resid_pre"])
    with model.hooks([double]):
        full = model(batch)
    calls = []
    handle = model.model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with model.resume(1, clean["lm.blocks.1.hook_resid_pre"]), model.hooks([double]):
            resumed = model(lm)
        assert calls == [], "layer 0 does not run"
        torch.testing.assert_close(resumed, full)
        with model.resume(1, clean["lm.blocks.1.hook_resid_pre"]):
            with model.hooks([("lm.blocks.0.hook_mlp_out", lambda t, _hook: None)]):
                with pytest.raises(InvalidRequest, match=r"\['lm.blocks.0.hook_mlp_out'\] come before it"):
                    model(lm)
        model(lm)
        assert len(calls) == 1, "layer 0 runs again after the block"
    finally:
        handle.remove()
    with pytest.raises(InvalidRequest, match="not one of the language model's 0..1"):
        with model.resume(2, clean["lm.blocks.1.hook_resid_pre"]):
            pass
