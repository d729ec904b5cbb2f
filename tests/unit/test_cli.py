"""The `prisma-ray` command."""

import json

from prisma_ray.cli import main


def test_models_list_and_show(capsys):
    assert main(["models", "list", "--source", "timm"]) == 0
    out = capsys.readouterr().out
    assert "timm-vit-base-patch16-clip-224-openai" in out
    assert main(["models", "show", "timm-vit-base-patch16-clip-224-openai"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"] == 12 and shown["source"] == "timm"


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["models", "show", "vit-base-clip"]) == 2
    assert "Closest names" in capsys.readouterr().err


def test_demo_runs_the_embedded_model_on_held_out_shapes(capsys):
    assert main(["demo", "--set", "batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "prisma-toy-vit-shapes" in out and "blocks.3.hook_resid_post" in out and "[32, 65, 64]" in out
    accuracy = float(out.rsplit("samples: ", 1)[1])
    assert accuracy >= 0.8


def test_demo_prints_hook_shapes_of_any_registry_model(capsys):
    args = ["demo", "--set", "model=timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k", "--set", "pretrained=false"]
    assert main([*args, "--set", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.11.hook_resid_post" in out and "[2, 197, 192]" in out and "accuracy" not in out


def test_bad_override_is_reported(capsys):
    assert main(["demo", "--set", "batch_size"]) == 2
    assert "key=value" in capsys.readouterr().err
