"""The toy-model recipe: schedule, training step, weight files, registry entries."""

import math

import pytest
import torch

from prisma_ray.models import get_entry, load_model, toy, toy_training


@pytest.fixture
def tiny_image_spec():
    return toy.SPECS["toy-vit-shapes"].model_copy(update={"depth": 1, "width": 32, "heads": 2})


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


def test_render_split_labels_are_first_object_factors():
    spec = toy.SPECS["toy-vit-shapes"]
    x, y = toy_training.render_split(spec.dataset, 5)
    assert x.shape == (5, 32, 32, 3) and x.dtype.name == "uint8"
    assert set(y.tolist()) <= set(range(spec.num_classes))
    clips, directions = toy_training.render_split(toy.SPECS["toy-video-moving-shapes"].dataset, 3)
    assert clips.shape == (3, 8, 32, 32, 3) and set(directions.tolist()) <= set(range(8))


def test_training_fits_a_small_set(tiny_image_spec):
    training = toy.ToyTraining(steps=150, batch_size=16, lr=3e-3, warmup_steps=5, n_train=16)
    _, run = toy_training.train_toy(tiny_image_spec, training)
    assert run.final_loss < math.log(tiny_image_spec.num_classes) / 2
    assert run.train_accuracy >= 0.9


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
    assert entry.source == "prisma" and toy.weights_path(entry.architecture).stat().st_size < 4_000_000
    model = load_model(name)
    spec = toy.SPECS[entry.architecture]
    assert model.preprocess == spec.preprocess
    x = torch.zeros(2, *spec.preprocess.input_shape())
    out, cache = model.run_with_cache(x, names=["blocks.0.hook_resid_post"])
    assert out.shape == (2, spec.num_classes)
    assert cache["blocks.0.hook_resid_post"].shape == (2, model.token_layout.n_tokens, spec.width)
