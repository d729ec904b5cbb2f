"""Spliced-in evaluation at per-head and neuron hook points, without Ray: an attention-output SAE on the
flattened heads of `attn.hook_z` (Kissane et al. 2024), one head's `hook_z`, and the neurons of
`mlp.hook_post`, from extraction through training, evaluation and interpretation on a tiny ViT."""

import json

import numpy as np
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import EvalConfig, Evaluator
from prisma_ray.evaluate.heldout import read_held_out
from prisma_ray.evaluate.splice import put_at_positions, splice_hooks, take
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.steer import SteerSpec, steered, steering_hooks
from prisma_ray.models import ModelEntry, load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, Trainer
from tests.tiny_models import HF, OPEN_CLIP, batch, tiny
from tests.unit.test_evaluate_checkpoint import TINY_VIT, extract_in_process, identity, save, shapes_config

Z, POST = "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"  # [B, 17, 2 heads, 16] and [B, 17, 128 neurons]
WIDTHS = {Z: 32, POST: 128}
MODEL = TINY_VIT["name"]
HF_BY_ARCH = {entry.architecture: entry for entry in HF}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """`all`: stores of `hook_z` (heads flattened) and `mlp.hook_post`; `head1`: a store of `hook_z`'s head 1."""
    root = tmp_path_factory.mktemp("heads")
    extract_in_process(shapes_config(root / "all", hooks=[Z, POST]))
    extract_in_process(shapes_config(root / "head1", hooks=[Z], head=1))
    return root


def evaluator(root) -> Evaluator:
    return Evaluator(EvalConfig(stores=str(root / "acts"), split="test", splice_samples=12, splice_batch_size=6))


def site(hook: str, width: int | None = None) -> Site:
    return Site(name=hook, width=width or WIDTHS[hook], model=MODEL)


@pytest.mark.parametrize("hook", [Z, POST])
def test_a_perfect_reconstruction_at_heads_or_neurons_recovers_the_clean_loss(roots, tmp_path, hook):
    sae = Sites(inputs=(site(hook),))
    ev = evaluator(roots / "all")
    perfect = ev.evaluate(save(identity(sae), tmp_path / "perfect"))
    zero = ev.evaluate(save(identity(sae, perfect=False), tmp_path / "zero"))
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6) and perfect["kl"] < 1e-8
    assert perfect["loss_spliced"] == pytest.approx(perfect["loss_clean"], abs=1e-6)
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and perfect["top1_delta"] == 0
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6) and zero["kl"] > 1e-6
    assert zero["kl_with_error"] < 1e-8 and zero["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-4)


def test_one_head_store_splices_that_heads_slice_only(roots, tmp_path):
    ev = evaluator(roots / "head1")
    sae = Sites(inputs=(site(Z, 16),))
    perfect = ev.evaluate(save(identity(sae), tmp_path / "perfect"))
    assert perfect["eval_tokens"] == 12 * 17 and perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["kl"] < 1e-8

    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=32, seed=3), sae)
    row = ev.evaluate(save(d, tmp_path / "random"))
    model, batch = ev._models[MODEL], ev._splice[MODEL].batches[0]
    positions = torch.arange(17)
    with torch.inference_mode():
        for mode, expected in manual_head1(model, d, batch.x).items():
            with model.hooks(splice_hooks(d, positions, mode, batch.clean, {Z: 1})):
                torch.testing.assert_close(model(batch.x), expected, msg=mode)
        with pytest.raises(InvalidRequest, match="every head flattened.*dictionary reads 16"):
            splice_hooks(d, positions, "sae", batch.clean)  # as if the store held every head
    assert np.isfinite(row["loss_recovered"]) and row["loss_zero"] > row["loss_clean"]


def manual_head1(model, d: Dictionary, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's output with head 1 of `hook_z` replaced by `d`'s reconstruction of it, or by zeros; head 0 kept."""

    def put(fn):
        def hook(t, _hook):
            out = t.clone()
            out[:, :, 1] = fn(t[:, :, 1])
            return out

        return hook

    outputs = {}
    for mode, fn in (("sae", lambda h: d(h)), ("zero", torch.zeros_like)):
        with model.hooks([(Z, put(fn))]):
            outputs[mode] = model(x)
    return outputs


@pytest.mark.parametrize("hook", [Z, "blocks.1.attn.hook_q", "blocks.1.attn.hook_v", "blocks.0.attn.hook_result"])
def test_flattened_heads_are_replaced_in_head_major_order(hook):
    model = load_model(ModelEntry(**TINY_VIT), pretrained=False, seed=0)
    x = torch.randn(3, 3, 32, 32)
    width = model.hook_width(hook)  # 2 heads x 16, or x 32 for hook_result
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=64, seed=5), Sites(inputs=(site(hook, width),)))
    positions = torch.tensor([0, 3, 9])
    with torch.inference_mode():
        _, clean = model.run_with_cache(x, [hook])

        def manual(t, _hook):
            out = t.clone()
            out[:, positions] = d(t[:, positions].reshape(3, 3, width)).reshape(3, 3, 2, width // 2)
            return out

        with model.hooks([(hook, manual)]):
            expected = model(x)
        with model.hooks(splice_hooks(d, positions, "sae", clean)):
            torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(expected, model(x), atol=1e-4)
        with pytest.raises(InvalidRequest, match=f"head 0.*dictionary reads {width}"):
            splice_hooks(d, positions, "sae", clean, {hook: 0})


@pytest.mark.parametrize("hook", [Z, POST])
def test_trained_dictionaries_at_heads_and_neurons_evaluate_and_interpret(roots, tmp_path, hook):
    """Train a TopK SAE on the store's rows (the Trainer, without Ray), evaluate it spliced in, read its latents."""
    store_root = roots / "all"
    uri = str(store_root / "acts" / MODEL / hook / "test")
    rows = read_held_out([uri], [], 10_000).x.float()
    sites = Sites(inputs=(site(hook),))
    trainer = Trainer([DictionaryConfig(architecture="topk", d_sae=64, k=8, lr=3e-3)], sites, 60)
    trainer.initialize(rows[:64])
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        trainer.train_step(rows[torch.randint(len(rows), (64,), generator=gen)])
    ckpt = save(trainer.first, tmp_path / "sae")

    row = evaluator(store_root).evaluate(ckpt)
    assert row["hook"] == hook and 0 < row["explained_variance"] < 1 and np.isfinite(row["loss_recovered"])
    assert np.isfinite(row["kl"]) and row["kl_with_error"] < 1e-8

    dataset = dict(type="synthetic", uri=str(store_root / "shapes"), generator=dict(name="shapes", n_images=12))
    entry = ModelEntry(**TINY_VIT)
    plan = plan_interpret(
        InterpretConfig(checkpoint=ckpt, model=entry, pretrained=False, dataset=dataset, output=str(tmp_path / "i"))
    )
    pixels = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8)
    latents = LatentWorker(plan.job()).latents(pixels, np.array(["a", "b"]))
    model = load_model(entry, pretrained=False, seed=0)
    with torch.inference_mode():
        _, cache = model.run_with_cache(PixelInputs(model).pixels(pixels), [hook])
        expected = trainer.first.encode(cache[hook].flatten(2)).numpy()
    assert latents.shape == (2, 17, 64) and (latents > 0).sum(-1).max() <= 8
    np.testing.assert_allclose(latents, expected, atol=1e-5)


def test_the_raw_baseline_on_mlp_hook_post_is_the_neuron_basis(roots, tmp_path):
    """On a store of `mlp.hook_post` the `raw` ground-truth baseline scores each of the d_mlp neurons."""
    ckpt = save(identity(Sites(inputs=(site(POST),))), tmp_path / "c")
    row = Evaluator(EvalConfig(stores=str(roots / "all" / "acts"), split="test", splice_samples=0)).evaluate(ckpt)
    baselines = json.loads(row["gt_baselines"])
    model = load_model(ModelEntry(**TINY_VIT), pretrained=False, seed=0)
    assert baselines["raw"]["directions"] == model.hook_width(POST) == 128 != model.d_model
    detail = json.loads(row["gt_detail"])
    assert set(baselines["raw"]["best_auroc"]) == set(detail), "the neurons scored on the dictionary's tokens"


def test_a_one_head_dictionary_is_interpreted_on_that_head(roots, tmp_path):
    """Interpretation reads the head the dictionary was trained on (`head`, as extraction's); without it, refused."""
    ckpt = save(identity(Sites(inputs=(site(Z, 16),))), tmp_path / "sae")
    dataset = dict(type="synthetic", uri=str(roots / "head1" / "shapes"), generator=dict(name="shapes", n_images=12))
    entry = ModelEntry(**TINY_VIT)

    def config(**extra) -> InterpretConfig:
        return InterpretConfig(
            checkpoint=ckpt, model=entry, pretrained=False, dataset=dataset, output=str(tmp_path / "i"), **extra
        )

    with pytest.raises(InvalidRequest, match="16-wide .* is 32 wide"):
        plan_interpret(config())
    with pytest.raises(InvalidRequest, match="head=2 does not exist"):
        plan_interpret(config(head=2))
    plan = plan_interpret(config(head=1))
    assert plan.description()["head"] == 1
    pixels = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8) * 7
    latents = LatentWorker(plan.job()).latents(pixels, np.array(["a", "b"]))
    model = load_model(entry, pretrained=False, seed=0)
    with torch.inference_mode():
        _, cache = model.run_with_cache(PixelInputs(model).pixels(pixels), [Z])
    z = cache[Z][:, :, 1].numpy()
    np.testing.assert_allclose(latents, np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], -1), atol=1e-5)


@pytest.mark.parametrize("hook", [Z, POST])
def test_steering_at_flattened_heads_and_neurons(hook):
    """Steering an SAE on `hook_z` (heads flattened) or on the neurons: the error term kept, scale 1 is the identity;
    a clamped latent replaces the activation by the steered reconstruction, heads reshaped back head-major."""
    model = load_model(ModelEntry(**TINY_VIT), pretrained=False, seed=0)
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=64, seed=2), Sites(inputs=(site(hook),)))
    x = torch.randn(2, 3, 32, 32)
    clamp = SteerSpec(latents=[1, 5], value=3.0)
    with torch.inference_mode():
        clean = model(x)
        with model.hooks(steering_hooks(model, d, SteerSpec(latents=[0, 1], scale=1.0))):
            torch.testing.assert_close(model(x), clean, atol=1e-5, rtol=1e-5)

        def manual(t, _hook):
            return steered(d, t.flatten(2), clamp).reshape(t.shape)

        with model.hooks([(hook, manual)]):
            expected = model(x)
        with model.hooks(steering_hooks(model, d, clamp)):
            torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(expected, clean, atol=1e-4)


def test_a_dictionary_evaluated_against_a_store_of_another_width_is_refused(roots, tmp_path):
    one_head = save(identity(Sites(inputs=(site(Z, 16),))), tmp_path / "one")
    with pytest.raises(InvalidRequest, match=r"reads 16 values per token but the store .* holds 32 \(every head"):
        evaluator(roots / "all").evaluate(one_head)
    flattened = save(identity(Sites(inputs=(site(Z),))), tmp_path / "all")
    with pytest.raises(InvalidRequest, match=r"reads 32 values per token but the store .* holds 16 \(head 1\)"):
        evaluator(roots / "head1").evaluate(flattened)


@pytest.mark.parametrize(
    "entry",
    [OPEN_CLIP["native"], HF_BY_ARCH["VideoMAEForVideoClassification"]],
    ids=["open_clip-native", "hf-VideoMAE"],
)
def test_splicing_one_head_writes_that_head_alone_on_other_adapters(entry):
    """OpenCLIP (its explicit attention path, sequence-first where the tower is) and a video model: the splice of
    one head's z equals replacing that head's slice by hand, and the other heads' z is left as it was."""
    model = tiny(entry)
    x = batch(model)
    d_head = model.hook_shape(Z)[3]
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=32, seed=1), Sites(inputs=(site(Z, d_head),)))
    positions = torch.arange(model.token_layout.n_tokens)[1::2]
    with torch.inference_mode():
        _, clean = model.run_with_cache(x, [Z])

        def manual(t, _hook):
            out = t.clone()
            out[:, positions, 1] = d(t[:, positions, 1])
            return out

        with model.hooks([(Z, manual)]):
            expected = model(x)
        seen = {}
        with model.hooks([*splice_hooks(d, positions, "sae", clean, {Z: 1}), (Z, lambda t, _h: seen.update(z=t))]):
            torch.testing.assert_close(model(x), expected)
    others = torch.ones(seen["z"].shape[1], dtype=torch.bool)
    others[positions] = False
    torch.testing.assert_close(seen["z"][:, :, 0], clean[Z][:, :, 0])
    torch.testing.assert_close(seen["z"][:, others], clean[Z][:, others])


def test_a_token_mask_at_a_per_head_point_takes_and_puts_the_heads_of_those_tokens():
    """Multimodal sequences splice at a `bool[B, T]` mask: per-head rows are taken and written through the same
    view, flattened or one head, on a sequence-first (non-contiguous) batch-first view as well."""
    cur = torch.randn(5, 2, 3, 4).transpose(0, 1)  # [B=2, T=5, heads=3, d_head=4], not contiguous
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    flat = take(cur, mask)
    assert flat.shape == (1, 4, 12)
    torch.testing.assert_close(flat[0, 2], cur[1, 3].flatten())
    out = put_at_positions(mask, lambda acts: -take(acts, mask))(cur, None)
    torch.testing.assert_close(out[mask], -cur[mask])
    torch.testing.assert_close(out[~mask], cur[~mask])
    one = put_at_positions(mask, lambda acts: torch.zeros_like(take(acts, mask, 2)), 2)(cur, None)
    expected = cur.clone()
    expected[:, :, 2][mask] = 0
    torch.testing.assert_close(one, expected)
