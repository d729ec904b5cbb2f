"""The top-activations pass on one local Ray: exact agreement with one in-process pass, the results layout,
the dashboard and offline explanations from the CLI, and clear errors for bad input."""

import json

import numpy as np
import pytest

from prisma_ray.cli import main
from prisma_ray.data.shards import decode_shard
from prisma_ray.data.sources import list_refs
from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.glue import latent_evidence
from prisma_ray.interpret.pipeline import run_interpret
from prisma_ray.interpret.results import read_results
from prisma_ray.storage import MissingInputError

pytestmark = pytest.mark.slow


def config(toy_sae, tmp_path, **extra) -> InterpretConfig:
    dataset = dict(
        type="synthetic",
        uri=str(tmp_path / "shapes"),
        generator=dict(name="shapes", n_images=40, image_size=32, n_objects=[1, 1], size_range=[0.25, 0.4]),
    )
    return InterpretConfig(
        checkpoint=toy_sae.checkpoint,
        dataset=dataset,
        output=str(tmp_path / "out"),
        k=5,
        reservoir=16,
        shard_size=8,
        resources=dict(actors=2, torch_threads=1),
        progress=False,
        **extra,
    )


def test_pass_on_ray_equals_one_in_process_pass_and_writes_results(ray_local, toy_sae, tmp_path):
    cfg = config(toy_sae, tmp_path)
    summary = run_interpret(cfg)
    assert summary.samples == 40 and summary.latents == 128
    plan = plan_interpret(cfg)
    worker = LatentWorker(plan.job(torch_threads=1))
    one, _ = worker.process(decode_shard(list_refs(plan.spec), plan.spec, plan.fmt))
    results = read_results(cfg.output)
    for ranking in ("max", "mean"):
        top = one.top[ranking]
        for latent in range(128):
            rows = results.top_rows(latent, ranking)
            filled = np.isfinite(top.scores[latent])
            assert [r["sample_id"] for r in rows] == top.ids[latent][filled].tolist()
            np.testing.assert_allclose([r["score"] for r in rows], top.scores[latent][filled], rtol=1e-5)
    latents = results.latents.to_pandas()
    np.testing.assert_allclose(latents["frequency"], one.fire_tokens / one.n_tokens, rtol=1e-9)
    assert ((latents["top_cls"] + latents["top_patch"]).round(6) <= 1).all()
    best = results.top_rows(int(latents["max_activation"].idxmax()))[0]
    assert results.image(best["sample_id"]).shape == (32, 32, 3) and best["map"].shape == (17,)
    evidence = latent_evidence(results, int(latents["max_activation"].idxmax()), n=3)
    assert evidence.images.shape[1:] == (32, 32, 3) and evidence.maps.shape[1:] == (4, 4)
    assert run_interpret(cfg).seconds == 0.0, "the same pass again reuses the results"
    # `prisma-ray dashboard OTHER --output SAME` replaced the results of another checkpoint without a word.
    with pytest.raises(InvalidRequest, match=r"holds the results of another interpretation pass \(changed: k; there"):
        run_interpret(cfg.model_copy(update={"k": 6}), replace=False)
    assert read_results(cfg.output).summary["k"] == 5, "the results already written are kept"


def test_a_folder_holding_another_dashboard_is_refused_before_any_work(toy_sae, tmp_path):
    """`prisma-ray dashboard CK --output <campaign>/dashboard/<model>` (a site whose results are elsewhere) rewrote
    its index.html and two latent pages, leaving the other pages of the old dictionary beside them."""
    cfg = config(toy_sae, tmp_path)
    (tmp_path / "out" / "latents").mkdir(parents=True)
    (tmp_path / "out" / "index.html").write_text("another run's site")
    with pytest.raises(InvalidRequest, match=r"out holds a dashboard .*no results of its own.* new output"):
        run_interpret(cfg, replace=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.html", "latents"]


def test_dashboard_cli_renders_pages_and_offline_explanations(ray_local, toy_sae, tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text(json.dumps(config(toy_sae, tmp_path).dataset.model_dump(mode="json", exclude={"storage"})))
    out = tmp_path / "dash"
    args = [
        "dashboard",
        toy_sae.checkpoint,
        "--data",
        str(data),
        "--output",
        str(out),
        "--per-latent",
        "3",
        "--max-latents",
        "5",
        "--explain",
        "vocabulary",
        "--set",
        "k=4",
        "--set",
        "resources.actors=1",
        "--set",
        "progress=false",
    ]
    assert main(args) == 0
    index = (out / "index.html").read_text()
    pages = sorted((out / "latents").glob("*.html"))
    assert len(pages) == 5 and "sortBy" in index and "filterRows" in index
    explanations = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert explanations and all(e["explainer"] == "vocabulary" for e in explanations)
    page = pages[0].read_text()
    assert "Activation histogram" in page and "<svg" in page and "-heatmap.png" in page
    shown = [e["explanation"] for e in explanations if f"latents/{e['latent']}.html" in index]
    assert shown and all(s in index for s in shown)
    for img in page.split("src='../")[1:]:
        assert (out / img.split("'")[0]).is_file()


def test_bad_inputs_are_named(toy_sae, tmp_path):
    with pytest.raises(MissingInputError, match="missing-checkpoint"):
        plan_interpret(
            config(toy_sae, tmp_path).model_copy(update={"checkpoint": str(tmp_path / "missing-checkpoint")})
        )
    with pytest.raises(ValueError, match="reads 64-wide activations but .* is 192 wide"):
        plan_interpret(config(toy_sae, tmp_path, model="timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"))
    video = config(toy_sae, tmp_path).model_copy(update={"model": "prisma-toy-video-moving-shapes"})
    with pytest.raises(ValueError, match="cannot take the synthetic dataset: the model expects video input"):
        plan_interpret(video)
