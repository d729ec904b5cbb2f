"""The toy-model recipe: schedule, training step, weight files, registry entries."""

import numpy as np
import pytest
import torch

from prisma_ray.data import synthetic
from prisma_ray.data.synthetic import render_shapes
from prisma_ray.models import get_entry, load_model, toy, toy_training
from prisma_ray.models.spec import TokenLayout


@pytest.fixture
def tiny_image_spec():
    return toy.SPECS["toy-vit-shapes"].model_copy(update={"depth": 1, "width": 32, "heads": 2})


def n_patches(spec: toy.ToySpec) -> int:
    return (spec.dataset.image_size // spec.patch_size) ** 2


def image_input(spec: toy.ToySpec, n: int) -> torch.Tensor:
    return torch.randn(n, 3, spec.dataset.image_size, spec.dataset.image_size)


@pytest.fixture
def dense_spec(tiny_image_spec):
    data = tiny_image_spec.dataset
    return tiny_image_spec.model_copy(update={"patch_heads": toy.image_patch_heads(data, 0.9, 0.95), "patch_layer": 0})


def test_lr_warms_up_then_decays_to_zero():
    t = toy.ToyTraining(steps=100, warmup_steps=10, n_train=1)
    factors = [toy_training.lr_factor(s, t) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert toy_training.lr_factor(100, t) == pytest.approx(0.0, abs=1e-12)


def test_held_out_split_is_a_different_seed_of_the_same_distribution():
    spec = toy.SPECS["toy-video-moving-shapes"]
    held = spec.held_out(7)
    assert held.seed != spec.dataset.seed and held.n_clips == 7
    assert held.model_dump(exclude={"seed", "n_clips"}) == spec.dataset.model_dump(exclude={"seed", "n_clips"})


def test_render_split_targets_are_the_label_and_each_heads_factors():
    spec = toy.SPECS["toy-vit-shapes"]
    x, t = toy_training.render_targets(spec.dataset, 40, spec.aux_heads)
    assert x.shape == (40, 32, 32, 3) and x.dtype.name == "uint8"
    assert set(t) == {"label", "shapes", "colours", "count"}
    for i in range(40):
        _, _, objects, _ = render_shapes(spec.dataset, i)
        largest = max(objects, key=lambda o: o["radius"])
        assert t["label"][i] == spec.dataset.shapes.index(largest["shape"])
        assert [s for s, on in zip(spec.dataset.shapes, t["shapes"][i]) if on] == sorted(
            {o["shape"] for o in objects}, key=spec.dataset.shapes.index
        )
        assert {c for c, on in zip(spec.dataset.colours, t["colours"][i]) if on} == {o["colour"] for o in objects}
        assert spec.aux_heads[2].values[t["count"][i]] == str(len(objects))
    assert len(set(t["count"].tolist())) == 3  # 1 to 3 objects: the largest is not always the first
    assert any(
        t["label"][i] != spec.dataset.shapes.index(render_shapes(spec.dataset, i)[2][0]["shape"]) for i in range(40)
    )
    clips, directions = toy_training.render_split(toy.SPECS["toy-video-moving-shapes"].dataset, 3)
    assert clips.shape == (3, 8, 32, 32, 3) and set(directions.tolist()) <= set(range(8))


def test_aux_heads_are_trained_but_not_the_models_output(dense_spec):
    spec = dense_spec
    model = toy_training.build_network(spec).eval()
    x = image_input(spec, 3)
    primary, aux, dense = toy_training.outputs(model, x, spec.patch_layer)
    assert torch.allclose(primary, toy_training.logits(model, x), atol=1e-5)
    assert dense.shape == (3, n_patches(spec), spec.patch_outputs) == (3, n_patches(spec), 7 + 7)
    assert aux.shape == (3, spec.aux_outputs) == (3, 6 + 6 + 3)
    assert {k: tuple(v.shape) for k, v in toy_training.split_aux(spec, aux).items()} == {
        "shapes": (3, 6),
        "colours": (3, 6),
        "count": (3, 3),
    }


def test_dense_heads_read_the_patch_tokens_of_their_block_and_are_not_the_models_output(dense_spec):
    spec = dense_spec.model_copy(update={"depth": 3, "patch_layer": 1})
    model = toy_training.build_network(spec).eval()
    x = image_input(spec, 2)
    seen = {}
    model.blocks[1].register_forward_hook(lambda _m, _i, out: seen.setdefault("tokens", out))
    _, _, dense = toy_training.outputs(model, x, spec.patch_layer)
    assert torch.allclose(dense, model.patch_head(seen["tokens"][:, model.num_prefix_tokens :]))
    before = toy_training.logits(model, x)  # the network's forward never reads `patch_head`
    with torch.no_grad():
        model.patch_head.weight.add_(1.0)
    assert torch.equal(toy_training.logits(model, x), before)


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("prisma-toy-vit-shapes", ["shape", "colour"]),
        ("prisma-toy-video-moving-shapes", ["shape", "colour", "direction"]),
    ],
)
def test_shipped_models_read_their_dense_heads_on_the_quickstarts_hook_with_one_label_cell_per_token(name, heads):
    from prisma_ray.quickstart import toy_runs

    spec = toy.SPECS[get_entry(name).architecture]
    hook = next(m.hook for m in toy_runs() if m.name == name)
    assert [h.name for h in spec.patch_heads] == heads and hook == f"blocks.{spec.patch_layer}.hook_resid_post"
    grid = spec.dataset.image_size // spec.patch_size
    assert spec.dataset.patch_grid == (grid, grid)  # the dataset's ground-truth cells are the model's patches


@pytest.fixture
def tiny_video_spec():
    return toy.SPECS["toy-video-moving-shapes"].model_copy(update={"depth": 2, "width": 32, "heads": 2})


def test_video_dense_heads_read_the_tokens_of_their_block_and_are_not_the_models_output(tiny_video_spec):
    spec = tiny_video_spec
    model = toy_training.build_network(spec).eval()
    x = torch.randn(2, spec.frames, 3, spec.dataset.image_size, spec.dataset.image_size)
    seen = {}
    model.videomae.encoder.layer[1].register_forward_hook(lambda _m, _i, out: seen.setdefault("tokens", out))
    _, _, dense = toy_training.outputs(model, x, spec.patch_layer)
    tokens = seen["tokens"][0] if isinstance(seen["tokens"], tuple) else seen["tokens"]
    assert dense.shape == (2, 4 * 16, spec.patch_outputs) == (2, 64, 7 + 7 + 9)
    assert torch.allclose(dense, model.patch_head(tokens), atol=1e-6)
    before = toy_training.logits(model, x)
    with torch.no_grad():
        model.patch_head.weight.add_(1.0)
    assert torch.equal(toy_training.logits(model, x), before)


def test_video_dense_targets_are_the_ground_truth_labels_the_recovery_check_scores(tiny_video_spec):
    from prisma_ray.models.toy_recovery import patch_labels, render

    spec = tiny_video_spec
    _, t = toy_training.render_targets(spec.dataset, 6, (), spec)
    _, masks, objects = render(spec, 6, held_out=False)
    grid, time = spec.dataset.image_size // spec.patch_size, spec.frames // spec.tubelet
    layout = TokenLayout(prefix=(), grid=(grid, grid), time=time, tubelet=spec.tubelet)  # the hooked model's
    kept, values = patch_labels(masks, objects, layout, ["shape", "colour", "direction"])
    for head in spec.patch_heads:
        got = t[f"patch_{head.name}"].reshape(-1)
        assert ((got == toy_training.IGNORE) == ~kept).all()
        want = [head.values.index(v) if v is not None else len(head.values) - 1 for v in values[head.name][kept]]
        assert got[kept].tolist() == want
    colours = {v for v in values["colour"][kept] if v is not None}
    assert len(colours) > 1 and len(set(values["direction"][kept])) > 2  # several objects, several directions


def test_a_dense_heads_weight_scales_its_cross_entropy_in_the_loss(dense_spec):
    heavy = dense_spec.model_copy(update={"patch_heads": toy.image_patch_heads(dense_spec.dataset, 0.9, 0.95, 3.0)})
    assert [h.weight for h in heavy.patch_heads] == [3.0, 1.0]
    pixels, targets = toy_training.render_targets(heavy.dataset, 4, heavy.aux_heads, heavy)
    x, y = toy_training.to_input(pixels, heavy.preprocess), {k: torch.from_numpy(v) for k, v in targets.items()}
    model = toy_training.build_network(heavy).eval()
    with torch.no_grad():
        shape = toy_training.split_dense(heavy, toy_training.outputs(model, x, heavy.patch_layer)[2])[0]
        ce = torch.nn.functional.cross_entropy(shape.flatten(0, 1), y["patch_shape"].flatten(), ignore_index=-100)
        difference = toy_training.multitask_loss(heavy, model, x, y) - toy_training.multitask_loss(
            dense_spec, model, x, y
        )
    assert difference == pytest.approx(2 * float(ce), rel=1e-4)


def test_dense_targets_are_the_dominant_objects_factors_with_edge_cells_ignored(dense_spec):
    spec = dense_spec
    _, t = toy_training.render_targets(spec.dataset, 20, spec.aux_heads, spec)
    assert t["patch_shape"].shape == t["patch_colour"].shape == (20, n_patches(spec))
    for i in range(20):
        _, mask, objects, _ = render_shapes(spec.dataset, i)
        obj, cover = synthetic.patch_factors(mask, spec.dataset.patch_grid)
        obj, cover = obj.reshape(-1), cover.reshape(-1)
        by_id = {o["object"]: o for o in objects}
        for head in spec.patch_heads:
            got = t[f"patch_{head.name}"][i]
            assert (got[obj == 0] == head.values.index("background")).all()
            assert (got[(obj > 0) & (cover < 0.5)] == toy_training.IGNORE).all()
            for j in np.flatnonzero((obj > 0) & (cover >= 0.5)):
                assert head.values[got[j]] == by_id[int(obj[j])][head.name]
    assert (t["patch_shape"] == toy_training.IGNORE).any() and (t["patch_shape"] < 6).any()


def test_head_accuracy_counts_a_set_only_when_every_value_is_right(dense_spec):
    spec = dense_spec
    model = toy_training.build_network(spec)
    x = image_input(spec, 4)
    predicted = toy_training.predictions(spec, model, x)
    targets = {"label": predicted["label"].numpy(), "count": predicted["count"].numpy()}
    for name in ("shapes", "colours"):
        t = predicted[name].numpy().astype(np.float32)
        t[0, 0] = 1 - t[0, 0]  # one wrong value in the first sample's set
        targets[name] = t
    dense = predicted["patch_shape"].numpy().copy()
    dense[0, :2] = toy_training.IGNORE  # left out
    dense[1, 0] = (dense[1, 0] + 1) % 7  # wrong
    targets["patch_shape"], targets["patch_colour"] = dense, predicted["patch_colour"].numpy()
    acc = toy_training.head_accuracies(spec, model, x, targets)
    assert acc == {
        "label": 1.0,
        "count": 1.0,
        "shapes": 0.75,
        "colours": 0.75,
        "patch_shape": pytest.approx(1 - 1 / (4 * n_patches(spec) - 2)),
        "patch_colour": 1.0,
    }


def test_training_fits_a_small_set(tiny_image_spec):
    training = toy.ToyTraining(steps=150, batch_size=16, lr=3e-3, warmup_steps=5, n_train=16, set_reduction="sum")
    _, run = toy_training.train_toy(tiny_image_spec, training)
    assert run.final_loss < 3.0  # from about 11: ln 6 + 12 ln 2 + ln 3
    acc = run.train_accuracy  # exact sets of 6 values: chance is far below 0.6
    assert acc["label"] >= 0.9 and acc["count"] >= 0.9 and min(acc["shapes"], acc["colours"]) >= 0.6, acc


def test_training_fits_the_dense_heads_of_a_small_set(dense_spec):
    training = toy.ToyTraining(steps=150, batch_size=16, lr=3e-3, warmup_steps=5, n_train=16, set_reduction="sum")
    _, run = toy_training.train_toy(dense_spec, training)
    acc = run.train_accuracy  # per token: background alone is about 0.8 of the kept tokens
    assert acc["patch_colour"] >= 0.95 and acc["patch_shape"] >= 0.9, acc


def test_weights_roundtrip_exactly_and_missing_file_is_named(tmp_path, tiny_image_spec):
    model = toy_training.build_network(tiny_image_spec)
    path = tmp_path / "w.safetensors"
    toy_training.save_weights(model, path)
    again = toy_training.load_weights(toy_training.build_network(tiny_image_spec), path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors.*train_toy_models"):
        toy_training.load_weights(model, tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("name", ["prisma-toy-vit-shapes", "prisma-toy-video-moving-shapes"])
def test_shipped_weights_load_offline_into_a_hooked_model(name):
    entry = get_entry(name)
    assert entry.source == "prisma" and toy.weights_path(entry.architecture).stat().st_size < 2_000_000
    model = load_model(name)
    spec = toy.SPECS[entry.architecture]
    assert model.preprocess == spec.preprocess
    x = torch.zeros(2, *spec.preprocess.input_shape())
    out, cache = model.run_with_cache(x, names=["blocks.0.hook_resid_post"])
    assert out.shape == (2, spec.num_classes)
    assert cache["blocks.0.hook_resid_post"].shape == (2, model.token_layout.n_tokens, spec.width)
