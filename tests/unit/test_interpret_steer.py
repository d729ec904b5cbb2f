"""Steering: clamping a shape-detecting latent of an SAE on the toy ViT moves its prediction towards that shape."""

import pytest
import torch

from prisma_ray.interpret.steer import SteerSpec, steer, steered, steering_hooks
from prisma_ray.models.toy_training import to_input
from prisma_ray.sae import load_dictionary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shape_detector(toy_sae) -> tuple[int, int]:
    """`(class, latent)`: the latent whose mean patch activation best separates one shape from the others."""
    labels = torch.from_numpy(toy_sae.labels)
    score = toy_sae.latents[:, 1:].mean(1)
    best = (-1.0, 0, 0)
    for c in range(int(labels.max()) + 1):
        gap = (score[labels == c].mean(0) - score[labels != c].mean(0)) / (score.std(0) + 1e-6)
        latent = int(gap.argmax())
        best = max(best, (float(gap[latent]), c, latent))
    return best[1], best[2]


def test_clamping_a_shape_latent_moves_the_prediction_towards_that_shape(toy_sae):
    shape, latent = shape_detector(toy_sae)
    d = load_dictionary(toy_sae.checkpoint)  # through the checkpoint, as the CLI does
    others = toy_sae.labels != shape
    x = to_input(toy_sae.pixels[others][:48], toy_sae.model.preprocess)
    high = 4 * float(toy_sae.latents[..., latent].max())
    result = steer(toy_sae.model, d, x, SteerSpec(latents=[latent], value=high, tokens="patches"))
    before, after = result.clean_probs[:, shape].mean(), result.steered_probs[:, shape].mean()
    # multi-object scenes (the label: the largest object's shape): measured 0.023 -> 0.094
    assert after > 0.05 and after > 3 * before, (shape, latent, float(before), float(after))
    assert (result.steered.argmax(-1) == shape).float().mean() > 0.02
    summary = result.summary()
    assert summary["mean_prob_delta"][str(shape)] == pytest.approx(float(after - before), abs=1e-5)
    zero = steer(toy_sae.model, d, x, SteerSpec(latents=[latent], value=0.0))
    assert zero.steered_probs[:, shape].mean() <= before + 1e-3, "ablating the latent does not add the shape"


def test_no_change_with_the_error_term_is_the_identity(toy_sae):
    d = toy_sae.sae
    x = to_input(toy_sae.pixels[:8], toy_sae.model.preprocess)
    same = steer(toy_sae.model, d, x, SteerSpec(latents=[0, 1], scale=1.0))
    torch.testing.assert_close(same.steered, same.clean, atol=1e-4, rtol=1e-4)
    recon = steer(toy_sae.model, d, x, SteerSpec(latents=[0], scale=1.0, keep_error=False))
    assert not torch.allclose(recon.steered, recon.clean, atol=1e-4), "without the error term: the reconstruction"
    acts = torch.randn(4, 65, 64)
    torch.testing.assert_close(steered(d, acts, SteerSpec(latents=[3], scale=1.0)), acts, atol=1e-4, rtol=1e-4)


def test_bad_steering_requests_are_clear_errors(toy_sae):
    with pytest.raises(ValueError, match="exactly one of `value`"):
        SteerSpec(latents=[1], value=1.0, scale=2.0)
    with pytest.raises(ValueError, match=r"latents \[500\] do not exist: the dictionary has 128"):
        steering_hooks(toy_sae.model, toy_sae.sae, SteerSpec(latents=[500], value=1.0))


def test_steer_command_prints_the_change_as_json(toy_sae, tmp_path, capsys):
    import json

    from prisma_ray.cli import main

    shape, latent = shape_detector(toy_sae)
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps(
            dict(
                type="synthetic",
                uri=str(tmp_path / "shapes"),
                generator=dict(name="shapes", n_images=12, image_size=32, n_objects=[1, 1], size_range=[0.25, 0.4]),
            )
        )
    )
    value = 4 * float(toy_sae.latents[..., latent].max())
    args = [
        "steer",
        toy_sae.checkpoint,
        "--latent",
        str(latent),
        "--value",
        str(value),
        "--data",
        str(data),
        "--set",
        "samples=12",
        "--set",
        "steer.tokens=patches",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    name = ("circle", "square", "triangle", "star", "hexagon", "cross")[shape]
    assert report["inputs"] == 12 and report["latents"] == [latent] and report["keep_error"] is True
    assert report["mean_prob_delta"][name] > 0.05
    assert main(["steer", str(tmp_path / "nope"), "--latent", "1", "--value", "1", "--data", str(data)]) == 2
    several = ["steer", toy_sae.checkpoint, "--latent", "1", "--value", "1", "--value", "2", "--data", str(data)]
    assert main(several) == 2 and "is steered by one at a time" in capsys.readouterr().err
    generation = ["--prompt", "Why?", "--output", str(tmp_path / "out")]
    assert main([*args, *generation]) == 2
    assert "generation, output (--prompt, " in capsys.readouterr().err, "a vision model does not ignore --prompt"
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"not a png")
    assert main([*args[:6], "--data", str(images)]) == 2
    assert f"dataset: cannot read {images / '0.png'} (" in capsys.readouterr().err, "a corrupt image is not skipped"
