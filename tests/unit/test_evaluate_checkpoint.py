"""Evaluating checkpoints without Ray: spliced-in evaluation on a tiny ViT (perfect and zero
reconstructions, transcoders, crosscoders, zero-shot heads), ground truth, caching, errors."""

import json

import numpy as np
import pytest
import torch

from prisma_ray.cli import main
from prisma_ray.data.shards import decode_shard
from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import EvalConfig, Evaluator
from prisma_ray.evaluate.splice import splice_hooks
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.pipeline import finalize_stores
from prisma_ray.extract.plan import plan_extract
from prisma_ray.extract.worker import ExtractionWorker
from prisma_ray.models import ModelEntry, load_model
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from prisma_ray.storage import MissingInputError
from tests.lmm_tiny import TEXT, tiny_entry
from tests.tiny_models import tiny_vit

TINY_VIT = tiny_vit(num_classes=6)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def extract_in_process(cfg: ExtractConfig) -> dict[str, str]:
    """Write the stores of `cfg` in this process (the extraction worker without Ray); `{hook: store URI}`."""
    plan = plan_extract(cfg)
    worker = ExtractionWorker(plan.job())
    for shard in sorted(plan.pending):
        worker.process(shard, decode_shard(plan.shards[shard], plan.spec, plan.fmt), plan.pending[shard])
    assert finalize_stores(plan)
    return {hook: w.uri for hook, w in plan.writers.items()}


def shapes_config(root, model=TINY_VIT, hooks=HOOKS, n=12, dataset=None, split="test", **extra) -> ExtractConfig:
    """Extraction into `<root>/acts` (`split`) of `n` shapes images (or `dataset`)."""
    shapes = dict(type="synthetic", uri=str(root / "shapes"), generator=dict(name="shapes", n_images=n, image_size=32))
    dataset = dataset or shapes
    return ExtractConfig(
        model=model,
        hooks=hooks,
        dataset=dataset,
        output=str(root / "acts"),
        split=split,
        shard_size=8,
        batch_size=8,
        dtype="float32",
        progress=False,
        **extra,
    )


def identity(sites: Sites, perfect: bool = True, **cfg) -> Dictionary:
    """A ReLU dictionary with latents ±e_i: x = relu(x) − relu(−x) reconstructs exactly (or zero, `perfect=False`)."""
    d_in, d_out = sites.d_in, sites.d_out
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=2 * d_in, **cfg), sites)
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.b_enc.zero_()
        d.b_dec.zero_()
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0)[:, :d_out] if perfect else torch.zeros(2 * d_in, d_out))
    return d


def save(d: Dictionary, uri) -> str:
    write_files(export_files(d), str(uri))
    return str(uri)


def site(hook: str, model: str = "test-vit-tiny") -> Site:
    return Site(name=hook, width=32, model=model)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return root, extract_in_process(shapes_config(root))


def eval_config(root, **extra) -> EvalConfig:
    return EvalConfig(
        **{"stores": str(root / "acts"), "split": "test", "splice_samples": 12, "splice_batch_size": 6, **extra}
    )


def test_perfect_reconstruction_recovers_all_and_zero_none(stores, tmp_path):
    root, _ = stores
    sae = Sites(inputs=(site(HOOKS[0]),))
    evaluator = Evaluator(eval_config(root))
    perfect = evaluator.evaluate(save(identity(sae), tmp_path / "perfect"))
    zero = evaluator.evaluate(save(identity(sae, perfect=False), tmp_path / "zero"))

    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6) and perfect["mse"] < 1e-10
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and perfect["kl"] < 1e-8
    assert perfect["top1_delta"] == 0 and perfect["label_source"] == "dataset" and perfect["splice_samples"] == 12
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["loss_spliced"] == pytest.approx(zero["loss_zero"]) and zero["kl"] > 1e-4
    assert zero["explained_variance"] < 0 and zero["l0"] == perfect["l0"] == pytest.approx(32, abs=1)
    # the clean error term added back restores the clean run exactly
    assert zero["kl_with_error"] < 1e-8 and zero["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-4)
    assert zero["eval_tokens"] == 12 * 17 and perfect["dead_fraction"] == 0
    assert perfect["model"] == "test-vit-tiny" and perfect["hook"] == HOOKS[0] and perfect["kind"] == "sae"
    assert evaluator.loads == {"test-vit-tiny": 1}, "one model load serves every checkpoint"


def test_retain_keeps_the_group_models_and_drops_the_others(stores, tmp_path):
    root, _ = stores
    evaluator = Evaluator(eval_config(root))
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "c")
    first = evaluator.evaluate(ckpt)
    evaluator.retain({"test-vit-tiny"})
    assert evaluator._held and evaluator._splice and evaluator._zero
    assert evaluator.evaluate(ckpt)["loss_recovered"] == first["loss_recovered"]
    assert evaluator.loads == {"test-vit-tiny": 1}
    evaluator.retain({"another-model"})
    assert not (evaluator._held or evaluator._splice or evaluator._zero or evaluator._models or evaluator._truth)
    evaluator.evaluate(ckpt)
    assert evaluator.loads == {"test-vit-tiny": 2}


def test_crosscoder_over_layers_per_site_metrics_and_decoder_shares(stores, tmp_path):
    root, _ = stores
    sites = Sites(inputs=(site(HOOKS[0]), site(HOOKS[1])))
    d = identity(sites)
    row = Evaluator(eval_config(root)).evaluate(save(d, tmp_path / "cross"))
    assert row["kind"] == "crosscoder" and row["hook"] == "+".join(HOOKS[:2])
    assert row["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    per_site = json.loads(row["per_site"])
    assert set(per_site) == set(HOOKS[:2])
    for metrics in per_site.values():
        assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["specific_fraction"] == pytest.approx(0.5) and metrics["mean_share"] == pytest.approx(0.5)
    assert row["shared_fraction"] == 0.0, "every ±e_i latent writes to one layer only"


def test_transcoder_is_spliced_as_mlp_replacement(stores, tmp_path):
    root, _ = stores
    sites = Sites(inputs=(site(HOOKS[2]),), outputs=(site(HOOKS[3]),))
    evaluator = Evaluator(eval_config(root))
    zero = evaluator.evaluate(save(identity(sites, perfect=False), tmp_path / "zero-transcoder"))
    assert zero["kind"] == "transcoder" and zero["hook_out"] == HOOKS[3]
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6) and zero["kl_with_error"] < 1e-8

    # the spliced run puts T(mlp_in of that very run) in place of mlp_out at the stored token positions
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=64, seed=3), sites)
    row = evaluator.evaluate(save(d, tmp_path / "random-transcoder"))
    model = evaluator._models["test-vit-tiny"]
    batch = evaluator._splice["test-vit-tiny"].batches[0]
    positions = torch.arange(17)
    with torch.inference_mode():
        with model.hooks(splice_hooks(d, positions, "sae", batch.clean)):
            spliced = model(batch.x)
        manual = {}

        def replace(t, hook):
            return d(manual["x"].reshape(-1, 32)).reshape(t.shape)

        with model.hooks([(HOOKS[2], lambda t, hook: manual.update(x=t) or None), (HOOKS[3], replace)]):
            expected = model(batch.x)
    torch.testing.assert_close(spliced, expected)
    assert np.isfinite(row["loss_recovered"]) and row["explained_variance"] < 1


@pytest.fixture(scope="module")
def tiny_model():
    """`TINY_VIT` with random weights, and two inputs."""
    model = load_model(ModelEntry(**TINY_VIT), pretrained=False, seed=0)
    return model, torch.randn(2, *model.preprocess.input_shape(), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_crosscoder_listing_resid_mid_before_resid_pre_puts_each_reconstruction_where_the_forward_carries_it(
    tiny_model,
):
    """A crosscoder over `[resid_mid, resid_pre]` of one block: in the spliced run the block's input is the
    resid_pre reconstruction and its residual stream after attention the resid_mid one (`resid_mid` was rebuilt
    from the block's input before the splice replaced it, so it carried `recon_mid + recon_pre - clean_pre`)."""
    model, x = tiny_model
    hooks = ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_pre"]
    _, clean = model.run_with_cache(x, hooks)
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=64, seed=3), Sites(inputs=tuple(map(site, hooks))))
    recon = d(torch.cat([clean[h] for h in hooks], dim=-1).reshape(-1, 64)).reshape(2, 17, 64)
    with model.hooks(splice_hooks(d, torch.arange(17), "sae", clean)):
        _, carried = model.run_with_cache(
            x, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
        )
    torch.testing.assert_close(carried["blocks.0.hook_resid_pre"], recon[..., 32:])
    mid = carried["blocks.0.hook_resid_post"] - carried["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(mid, recon[..., :32], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_transcoder_whose_input_comes_after_its_output_in_the_forward_pass_is_refused(tiny_model):
    """resid_mid -> attn_out of one block: both were hooks on the attention branch's module, run in registration
    order, so the input was read before the output it depends on was replaced."""
    model, x = tiny_model
    sites = Sites(inputs=(site("blocks.0.hook_resid_mid"),), outputs=(site("blocks.0.hook_attn_out"),))
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=64, seed=3), sites)
    _, clean = model.run_with_cache(x, ["blocks.0.hook_resid_mid", "blocks.0.hook_attn_out"])
    with model.hooks(splice_hooks(d, torch.arange(17), "sae", clean)):
        with pytest.raises(InvalidRequest, match="runs after its output"):
            model(x)


def test_zero_shot_head_and_models_without_logits(tmp_path):
    headless = {**TINY_VIT, "name": "test-vit-headless", "config": {**TINY_VIT["config"], "num_classes": 0}}
    extract_in_process(shapes_config(tmp_path, model=headless, hooks=HOOKS[:1], n=6))
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0], "test-vit-headless"),)), perfect=False), tmp_path / "ckpt")
    row = Evaluator(eval_config(tmp_path)).evaluate(ckpt)
    assert "loss_recovered" not in row and "heads.test-vit-headless.text_embeddings" in row["splice_note"]
    assert row["explained_variance"] < 0, "store metrics do not need a head"

    np.save(tmp_path / "text.npy", np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32))
    heads = {"test-vit-headless": {"text_embeddings": str(tmp_path / "text.npy"), "logit_scale": 50}}
    row = Evaluator(eval_config(tmp_path, heads=heads)).evaluate(ckpt)
    assert row["label_source"] == "dataset" and row["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert row["loss_zero"] != pytest.approx(row["loss_clean"])


def test_ground_truth_recovery_is_reported_on_synthetic_stores(stores, tmp_path):
    root, _ = stores
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "c")
    row = Evaluator(eval_config(root, splice_samples=0)).evaluate(ckpt)
    detail = json.loads(row["gt_detail"])
    assert row["gt_values"] == len(detail) > 3 and all(k.split("=")[0] in ("shape", "colour") for k in detail)
    assert 0 <= row["gt_fraction_detected"] <= 1 and 0.5 <= row["gt_mean_best_auroc"] <= 1
    assert all(set(v) == {"latent", "auroc", "ap", "purity", "coverage"} for v in detail.values())
    assert all(0 <= row[f"gt_mean_{m}"] <= 1 for m in ("ap", "purity", "coverage"))
    assert "loss_recovered" not in row, "splice_samples=0 skips the spliced-in evaluation"
    detectors = json.loads(row["gt_detectors"])  # each detector latent once, with its own best value
    assert len({d["latent"] for d in detectors}) == len(detectors)
    assert {d["latent"] for d in detectors} >= {v["latent"] for v in detail.values() if v["auroc"] >= 0.95}
    best = {k.split("=", 1)[1]: v["auroc"] for k, v in detail.items()}
    assert all(0.95 <= d["auroc"] <= best[d["value"]] + 1e-4 and d["detected"][0] == d["value"] for d in detectors)

    baselines = json.loads(row["gt_baselines"])
    assert list(baselines) == ["raw", "pca", "kmeans", "random"] and baselines["raw"]["directions"] == 32
    assert baselines["random"]["directions"] == baselines["pca"]["directions"] == 32
    assert all(set(b["best_auroc"]) == set(detail) for b in baselines.values()), "the same values, the same tokens"
    best = max(baselines, key=lambda b: baselines[b]["mean_best_auroc"])
    assert row["gt_best_baseline"] == best
    assert row["gt_baseline_mean_best_auroc"] == baselines[best]["mean_best_auroc"]
    assert row["gt_margin_auroc"] == pytest.approx(row["gt_mean_best_auroc"] - row["gt_baseline_mean_best_auroc"])
    top = max(b["fraction_detected"] for b in baselines.values())
    assert row["gt_margin_detected"] == pytest.approx(row["gt_fraction_detected"] - top)
    assert row["gt_baseline_fit"].startswith("scored rows: 0 held-out patch tokens after the"), "all rows scored"

    fewer = Evaluator(eval_config(root, splice_samples=0, ground_truth_tokens=100, baselines=["pca"])).evaluate(ckpt)
    assert fewer["gt_baseline_fit"].startswith("held-out: ") and list(json.loads(fewer["gt_baselines"])) == ["pca"]
    none = Evaluator(eval_config(root, splice_samples=0, baselines=[])).evaluate(ckpt)
    assert "gt_margin_auroc" not in none and none["gt_mean_best_auroc"] == row["gt_mean_best_auroc"]


def test_ground_truth_follows_each_dictionarys_token_kinds(stores, tmp_path):
    """Two checkpoints on one store, one trained on every token, one on patch tokens only: each is scored on the
    labels of its own held-out rows (the labels were once cached per store, misaligned for the second)."""
    root, _ = stores
    sites = Sites(inputs=(site(HOOKS[0]),))
    every = save(identity(sites), tmp_path / "every")
    patches = str(tmp_path / "patches")
    write_files(export_files(identity(sites), extra={"token_kinds": ["patch"]}), patches)
    evaluator = Evaluator(eval_config(root, splice_samples=0))
    first = evaluator.evaluate(every)
    shared = evaluator.evaluate(patches)
    alone = Evaluator(eval_config(root, splice_samples=0)).evaluate(patches)
    columns = sorted(k for k in alone if k.startswith("gt_"))
    assert [shared[k] for k in columns] == [alone[k] for k in columns]
    assert first["gt_mean_best_auroc"] == pytest.approx(alone["gt_mean_best_auroc"]), "the same patch tokens"


def test_image_level_ground_truth_scores_the_complete_images_among_the_scored_rows(stores, tmp_path):
    root, _ = stores
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "c")
    row = Evaluator(eval_config(root, splice_samples=0, ground_truth_tokens=5 * 17 + 8)).evaluate(ckpt)
    detail = json.loads(row["gt_image_detail"])
    assert row["gt_image_units"] == 5, "5 whole images of 17 tokens; the 6th is cut"
    assert row["gt_image_values"] == len(detail) > 0 and {k.split("=")[0] for k in detail} <= {
        "has_shape",
        "has_colour",
        "count",
    }
    assert 0 <= row["gt_image_fraction_detected"] <= 1 and 0 <= row["gt_image_mean_best_auroc"] <= 1
    assert "gt_track_units" not in row, "shapes have no motion"


def test_evaluate_command_prints_the_metrics_row(stores, tmp_path, capsys):
    root, _ = stores
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "c")
    overrides = ["--set", f"stores={root / 'acts'}", "--set", "split=test", "--set", "splice_samples=4"]
    assert main(["evaluate", ckpt, *overrides]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["checkpoint"] == ckpt and row["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert row["splice_samples"] == 4
    assert main(["evaluate", str(tmp_path / "absent"), *overrides]) == 2
    assert f"{tmp_path / 'absent'}/cfg.json: no such file" in capsys.readouterr().err


def test_missing_store_and_missing_model_name_are_clear(stores, tmp_path):
    root, _ = stores
    evaluator = Evaluator(eval_config(root))
    other_hook = save(identity(Sites(inputs=(site("blocks.0.hook_mlp_out"),))), tmp_path / "other")
    with pytest.raises(MissingInputError, match="blocks.0.hook_mlp_out/test/manifest.json"):
        evaluator.evaluate(other_hook)
    nameless = save(identity(Sites(inputs=(Site(name=HOOKS[0], width=32),))), tmp_path / "nameless")
    with pytest.raises(ValueError, match="names no model"):
        evaluator.evaluate(nameless)
    with pytest.raises(MissingInputError, match="nowhere"):
        evaluator.evaluate(str(tmp_path / "nowhere"))


def test_pca_and_kmeans_baselines_are_fitted_on_the_training_split_where_it_exists(tmp_path):
    """Fitted on the scored rows, k-means and PCA would be scored in sample while the dictionary is not: where the
    store has a train split beside the held-out one, the baselines are fitted there, as the dictionary was."""
    extract_in_process(shapes_config(tmp_path, hooks=HOOKS[:1], n=6))
    ckpt = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "c")
    in_sample = Evaluator(eval_config(tmp_path, splice_samples=0, baselines=["pca"])).evaluate(ckpt)
    assert in_sample["gt_baseline_fit"].startswith("scored rows: "), "no train split yet: the note says in sample"
    train = dict(
        type="synthetic", uri=str(tmp_path / "train-shapes"), generator=dict(name="shapes", n_images=6, seed=5)
    )
    train["generator"]["image_size"] = 32
    extract_in_process(shapes_config(tmp_path, hooks=HOOKS[:1], dataset=train, split="train"))
    row = Evaluator(eval_config(tmp_path, splice_samples=0, baselines=["pca"])).evaluate(ckpt)
    assert row["gt_baseline_fit"].startswith("train: ") and "/train" in row["gt_baseline_fit"]
    assert row["gt_baseline_mean_best_auroc"] != in_sample["gt_baseline_mean_best_auroc"]
    off = Evaluator(eval_config(tmp_path, splice_samples=0, baselines=["pca"], baseline_fit_split=None)).evaluate(ckpt)
    assert off["gt_baseline_fit"] == in_sample["gt_baseline_fit"]


class Calls:
    """Forward calls of modules whose class is named `name` (and with `out_features`, if given), counted through a
    global forward pre-hook (so runs stopped early count), with the rows (all dims but the last) of each input."""

    def __init__(self, name: str, out_features: int | None = None):
        self.name, self.out_features, self.rows = name, out_features, []

    def __enter__(self):
        def hook(module, args):
            if type(module).__name__ == self.name and getattr(module, "out_features", None) == self.out_features:
                self.rows.append(args[0].shape[:-1].numel() if args else 0)

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_the_first_checkpoint_of_a_model_costs_one_clean_forward_pass_per_batch(stores, tmp_path):
    """The clean run that gives the logits also caches the dictionary's activations: 2 batches -> 2 clean
    passes, then zero, spliced and error runs (4 passes per batch in all, not 5)."""
    root, _ = stores
    evaluator = Evaluator(eval_config(root))
    with Calls("VisionTransformer") as model:
        evaluator.evaluate(save(identity(Sites(inputs=(site(HOOKS[1]),))), tmp_path / "a"))
    assert len(model.rows) == 2 * 4
    with Calls("VisionTransformer") as model:
        evaluator.evaluate(save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "b"))
    assert len(model.rows) == 2 * 3 + 2, "spliced and error runs; the zero run per hook; a clean cache stopping early"


def test_an_lmm_dictionary_is_spliced_with_one_vision_tower_run_per_batch_and_logits_at_scored_positions(tmp_path):
    """Language-model hooks: the vision tower runs once per batch (`lm_input`), not once per clean, cache, zero,
    spliced and error run; the spliced runs start at the hooked layer (`resume`); only the positions scored
    (followed by a text token) are projected onto the vocabulary."""
    hook, name = "lm.blocks.1.hook_resid_post", "tiny-llava-onevision"
    prompts = ["Describe the image.", "Which shapes do you see?"]
    extract_in_process(
        shapes_config(tmp_path, tiny_entry("llava-onevision"), [hook], n=4, prompts=prompts, tokens={"mode": "all"})
    )
    ckpt = save(identity(Sites(inputs=(Site(name=hook, width=32, model=name),))), tmp_path / "ckpt")
    evaluator = Evaluator(eval_config(tmp_path, splice_samples=4, splice_batch_size=2))
    with Calls("SiglipVisionModel") as towers, Calls("Linear", TEXT["vocab_size"]) as head, Calls("Qwen2MLP") as mlps:
        row = evaluator.evaluate(ckpt)
    assert row["label_source"] == "next_token" and row["splice_samples"] == 4
    assert row["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and row["kl"] < 1e-8 and row["kl_zero"] > 1e-4
    assert len(towers.rows) == 2, "one tower run per batch of 2"
    assert len(mlps.rows) == 2 * (2 + 3), "per batch: the clean run's 2 layers, then layer 1 alone for the 3 others"
    scored = [int(b.readout.sum()) for b in evaluator._splice[name].batches]
    assert head.rows == scored * 4, "clean, zero, spliced and error runs: the scored positions only"
