"""The `prisma-ray` command."""

import json
import logging
import re

import pytest

from prisma_ray.cli import main
from prisma_ray.config import ConfigError, load_config
from prisma_ray.demo import DemoConfig
from prisma_ray.errors import InvalidRequest


def test_models_list_and_show(capsys):
    assert main(["models", "list", "--source", "timm"]) == 0
    out = capsys.readouterr().out
    assert "timm-vit-base-patch16-clip-224-openai" in out
    assert main(["models", "show", "timm-vit-base-patch16-clip-224-openai"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"] == 12 and shown["source"] == "timm"


def test_models_show_hooks_lists_every_hook_point_with_its_shape(capsys):
    """A ViT-B/16 (12 blocks, 197 tokens, 12 heads of 64, 3072 neurons) described on the meta device."""
    assert main(["models", "show", "timm-vit-base-patch16-clip-224-openai", "--hooks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shapes = dict(line.split(None, 1) for line in lines[:-1])
    assert shapes["blocks.11.attn.hook_q"] == "[batch, 197, 12, 64]"
    assert shapes["blocks.0.attn.hook_result"] == "[batch, 197, 12, 768]"
    assert shapes["blocks.3.mlp.hook_post"] == "[batch, 197, 3072]"
    assert shapes["blocks.3.attn.hook_pattern"] == "[batch, 12, 197, 197]"
    assert shapes["ln_final.hook_scale"] == "[batch, 197, 1]" and shapes["hook_final"] == "[batch, 197, 768]"
    assert lines[-1] == f"{len(shapes)} hook points" and len(shapes) == 2 + 12 * 18 + 1


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["models", "show", "vit-base-clip"]) == 2
    assert "Closest names" in capsys.readouterr().err


def test_demo_runs_the_embedded_model_on_held_out_shapes(capsys):
    assert main(["demo", "--set", "batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "prisma-toy-vit-shapes" in out and "blocks.3.hook_resid_post" in out and "[32, 17, 64]" in out
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


def _job_commands():
    from prisma_ray.cli import COMMANDS

    return [c for c in COMMANDS if c.config and c.config_file]


@pytest.mark.parametrize("command", _job_commands(), ids=lambda c: c.name)
def test_job_help_lists_every_config_field_with_its_description(command, capsys):
    from prisma_ray.cli import _resolve

    with pytest.raises(SystemExit) as exit_:
        main([command.name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    if command.description:
        assert " ".join(command.description.split()) in flat
    cls = _resolve(command.config)
    for name, info in cls.model_fields.items():
        assert re.search(rf"^  {re.escape(name)} \(", out, re.MULTILINE), f"{command.name} --help misses {name}"
        assert " ".join((info.description or "").split()) in flat, f"{command.name} --help misses {name}'s description"


def test_extract_help_lists_nested_fields_with_type_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = capsys.readouterr().out
    assert '  tokens.mode (all|cls|patches|random|text|image, default "all")' in out
    assert "  batch_size (int, default 32)" in out


def test_campaign_help_lists_the_fields_of_an_entry(capsys):
    """`prisma-ray campaign --help` showed `entries (dict[str, Entry], default {})` and none of an entry's settings
    (model, data, root, explain, ...), which the README lists; a dict of models lists them under `<name>`."""
    with pytest.raises(SystemExit):
        main(["campaign", "--help"])
    out = capsys.readouterr().out
    assert "  entries.<name>.explain (bool, default false)" in out and "  entries.<name>.root (" in out
    assert "  model_weights.<name>.pretrained (bool, default false)" in out


def test_demo_config_refuses_a_typo(capsys):
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(DemoConfig, overrides=["batch_sise=4"])
    assert main(["demo", "--set", "batch_sise=4"]) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_a_config_error_blames_the_override_that_wrote_the_value_not_the_file(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"^Invalid --set batch_size=-1 for DemoConfig: batch_size"):
        load_config(DemoConfig, config, ["batch_size=-1"])
    config.write_text("batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^Invalid config '{config}' for DemoConfig: batch_size"):
        load_config(DemoConfig, config, ["seed=1"])


@pytest.mark.parametrize("error", [KeyError("k"), AttributeError("a"), ValueError("v")], ids=lambda e: type(e).__name__)
def test_a_bug_inside_a_job_propagates_with_its_traceback(error, monkeypatch):
    def broken(cfg):
        raise error

    monkeypatch.setattr("prisma_ray.demo.run_demo", broken)
    with pytest.raises(type(error)) as raised:
        main(["demo"])
    assert raised.value is error and raised.traceback[-1].name == "broken"


def test_an_invalid_request_inside_a_job_is_one_error_line(monkeypatch, capsys):
    def refuse(cfg):
        raise InvalidRequest("dataset 'x' holds videos; the model takes images")

    monkeypatch.setattr("prisma_ray.demo.run_demo", refuse)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err == "error: dataset 'x' holds videos; the model takes images\n"


def test_a_config_error_is_one_error_line_and_verbose_logs_its_traceback(capsys, caplog):
    assert main(["demo", "--set", "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid --set batch_size=0 for DemoConfig") and err.count("error:") == 1
    assert err.count("\n") == 1 and "batch_size: Input should be greater than or equal to 1 (got 0)" in err
    assert "Traceback" not in err
    caplog.set_level(logging.DEBUG, logger="prisma_ray.cli")
    assert main(["-v", "demo", "--set", "batch_size=0"]) == 2
    assert "error: Invalid --set batch_size=0" in capsys.readouterr().err
    (record,) = [r for r in caplog.records if r.name == "prisma_ray.cli"]
    assert record.levelno == logging.DEBUG and record.exc_info[0] is ConfigError


def test_a_mistyped_key_is_named_on_one_line_with_the_closest_keys(capsys):
    assert main(["extract", "--set", "resourcse.actors=1", "--set", "resources.actorz=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "resourcse: unknown key; did you mean resources?" in err
    assert "resources.actorz: unknown key; did you mean actors?" in err


def test_errors_inside_a_union_name_the_keys_the_user_wrote(capsys):
    """Inside a union whose members pydantic names by tag or class (`dataset`, an inline `model`) the errors
    carried those names (`dataset.images.urii: unknown key`, no suggestion, blamed on the config not the --set;
    `model.str: Input should be a valid string`, `model.ModelEntry.sourc`, `pretrained: The default factory uses
    validated data ...`)."""
    assert main(["extract", "--set", "dataset.type=images", "--set", "dataset.urii=/x"]) == 2
    err = capsys.readouterr().err
    assert "Invalid --set dataset.urii=/x for ExtractConfig: dataset.urii: unknown key; did you mean uri?" in err
    assert main(["extract", "--set", "model={name: x, sourc: timm}"]) == 2
    err = capsys.readouterr().err
    assert "model.sourc: unknown key; did you mean source?" in err and "model.source: Field required" in err
    assert "valid string" not in err and "default factory" not in err and "ModelEntry" not in err, err
    assert main(["extract", "--set", "hooks=5"]) == 2
    assert "hooks: Input should be a valid list (got 5)" in capsys.readouterr().err, "a type error alone stays"


def test_dotted_overrides_change_the_default_section_they_name():
    """`--set dataset.generator.n_images=8` changes the default dataset's generator (it used to replace the
    dataset with `{generator: {n_images: 8}}`, which no dataset type accepts); a section switched to another
    member of its union (`dataset.type=images`) is taken as given."""
    from prisma_ray.data.sources import ImageSource, SyntheticSource
    from prisma_ray.extract.config import ExtractConfig

    default = ExtractConfig().dataset
    cfg = load_config(ExtractConfig, overrides=["dataset.generator.n_images=8"])
    assert isinstance(cfg.dataset, SyntheticSource) and cfg.dataset.generator.n_images == 8
    assert cfg.dataset.uri == default.uri and cfg.dataset.generator.name == default.generator.name
    cfg = load_config(ExtractConfig, overrides=["dataset.type=images", "dataset.uri=/data/photos"])
    assert isinstance(cfg.dataset, ImageSource) and cfg.dataset.uri == "/data/photos"
    cfg = load_config(ExtractConfig, overrides=["dataset.generator.name=moving-shapes"])
    assert cfg.dataset.generator.name == "moving-shapes" and cfg.dataset.uri == default.uri


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--latent", "3"], "error: prisma-ray steer: --latent 3 says which latents to steer, not how; add --value V"),
        (["--scale", "2"], "error: prisma-ray steer: --scale says how to steer, not which latents; add --latent N"),
        ([], "error: prisma-ray steer needs --latent N and --value V (clamp) or --scale F (multiply)"),
    ],
)
def test_steer_without_what_or_how_names_the_flags(flags, expected, capsys):
    assert main(["steer", "/nowhere/ckpt", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_a_union_fields_error_names_the_key_not_pydantics_members(tmp_path):
    """A `steer:` section (one intervention, or a list of them) that lacks its rule: the message names `steer` and
    what is missing, not pydantic's member names, nor the list member's complaint that a mapping is not a list."""
    from prisma_ray.interpret.steer import SteerConfig

    config = tmp_path / "steer.yaml"
    config.write_text("checkpoint: c\nsteer: {latents: [3]}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(SteerConfig, config)
    message = str(raised.value)
    assert message.startswith(f"Invalid config '{config}' for SteerConfig: steer: set exactly one of `value`")
    assert "[" not in message.split("(got")[0] and "valid list" not in message
    with pytest.raises(ConfigError, match=r"^Invalid config for SteerConfig: steer.latents: Field required$"):
        load_config(SteerConfig, overrides=["checkpoint=c", "steer.value=2"])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_dashboard_latent_count_below_one_is_refused_naming_the_option(value, capsys):
    """`--max-latents -3` rendered every fired latent but the last 3, and `0` every one, without a word."""
    with pytest.raises(SystemExit) as exit_:
        main(["dashboard", "runs/sae/dictionaries/topk-k-16", "--max-latents", value])
    assert exit_.value.code == 2
    assert f"argument --max-latents: must be a whole number >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["interpret", "dashboard"])
def test_interpret_and_dashboard_refuse_an_output_holding_another_pass(command, monkeypatch, capsys):
    """The commands ask the pass not to replace another pass's results (the library's callers, the quickstart
    and the campaign, own their folders and replace them); the refusal is one error line."""
    from prisma_ray.interpret import pipeline

    def run_interpret(cfg, replace=True):
        assert replace is False
        raise InvalidRequest(f"{cfg.output} holds the results of another interpretation pass")

    monkeypatch.setattr(pipeline, "run_interpret", run_interpret)
    args = ["--set", "checkpoint=runs/a"] if command == "interpret" else ["runs/a"]
    assert main([command, *args, "--output", "/tmp/x"]) == 2
    assert "error: /tmp/x holds the results of another interpretation pass" in capsys.readouterr().err
