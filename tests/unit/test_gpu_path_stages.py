"""The GPU path of extraction, evaluation, interpretation, steering and analysis, proven without a GPU.

- `model_dtype`: an extraction at bfloat16 (on the CPU, which has bfloat16 matmuls) records it in the store's
  `_config.json` and manifest, and its values are within bfloat16 rounding of the float32 extraction of the
  same images; evaluation rebuilds the model at the dtype the store records, interpretation and steering at
  the one their config gives, and the pixel inputs are cast to it once.
- `device`: the no-Ray stages (evaluate, analyze, steer) resolve it in this process and refuse `cuda` on a
  machine without a GPU, naming the field (explanation's embedder too: `embedder.device`); the Ray stages'
  start lines say what the pool got.
- The worker's one-synchronisation statistics equal the plain ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_ray import store
from prisma_ray.analysis.job import AnalyzeConfig, run_analysis
from prisma_ray.data import SyntheticSource, list_refs
from prisma_ray.data.shards import InputFormat, decode_shard
from prisma_ray.data.synthetic import ShapesConfig
from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import EvalConfig, Evaluator
from prisma_ray.evaluate.heldout import StoreSource
from prisma_ray.evaluate.sweep import SweepWorker
from prisma_ray.evaluate.sweep import start_line as sweep_start
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.pipeline import start_line as extract_start
from prisma_ray.extract.plan import config_hash, store_description
from prisma_ray.extract.worker import ExtractionWorker, WorkerJob, stats_vector, synchronize, to_host, unpack_stats
from prisma_ray.interpret.autointerp.run import EmbedderConfig, ExplainConfig, Pipeline
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.pipeline import start_line as interpret_start
from prisma_ray.interpret.steer import SteerConfig, SteerSpec, run_steer, steered_pair
from prisma_ray.models import ModelEntry, load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.models.token_selection import TokenSelection
from prisma_ray.runtime.pool import PoolSize
from prisma_ray.sae import Sites
from prisma_ray.storage import StorageOptions
from tests.lmm_tiny import tiny_entry
from tests.unit.test_evaluate_checkpoint import TINY_VIT, eval_config, extract_in_process, identity, save, site
from tests.unit.test_evaluate_checkpoint import shapes_config as eval_shapes_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOOK = "blocks.1.hook_resid_post"
ENTRY = ModelEntry(**TINY_VIT)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="proves the refusal on a machine without a GPU")


def shapes_config(root, **extra):
    return eval_shapes_config(root, hooks=[HOOK], **extra)


def _floating_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same 12 images extracted at float32 and at bfloat16 (both into float32 stores), and an identity SAE."""
    root = tmp_path_factory.mktemp("dtypes")
    f32 = extract_in_process(shapes_config(root / "f32"))[HOOK]
    bf16 = extract_in_process(shapes_config(root / "bf16", model_dtype="bfloat16"))[HOOK]
    ckpt = save(identity(Sites(inputs=(site(HOOK),))), root / "sae")
    return root, f32, bf16, ckpt


def test_a_bfloat16_extraction_records_its_dtype_and_stays_within_bfloat16_of_float32(twins):
    root, f32, bf16, _ = twins
    assert store.read_manifest(bf16).model_dtype == "bfloat16"
    assert store.StoreWriter(bf16).claimed()["model_dtype"] == "bfloat16"
    assert store.read_manifest(bf16).dtype == "float32", "the storage dtype is separate from the model's"
    assert store.read_manifest(f32).model_dtype == "float32"
    assert "model_dtype" not in store.StoreWriter(f32).claimed(), "float32 stores keep the hash they had before"
    cfg = shapes_config(root / "f32")
    description = store_description(cfg, ENTRY, HOOK, cfg.dataset, "d", None)
    bf16_description = store_description(
        cfg.model_copy(update={"model_dtype": "bfloat16"}), ENTRY, HOOK, cfg.dataset, "d", None
    )
    assert config_hash(description) != config_hash(bf16_description), "a changed model_dtype is a changed config"

    ref, low = store.read_acts(f32), store.read_acts(bf16)
    assert ref.shape == low.shape == (12 * 17, 32)
    assert not np.array_equal(ref, low), "the model really ran in bfloat16"
    # two blocks of bfloat16 (8 significant bits): a few rounding steps of 2^-8 relative to the activations' scale
    error = np.abs(low - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert error.max() < 0.05, error.max()
    stats_ref, stats_low = store.read_manifest(f32), store.read_manifest(bf16)
    np.testing.assert_allclose(stats_low.mean, stats_ref.mean, atol=0.05 * np.abs(ref).max())
    assert stats_low.mean_norm == pytest.approx(stats_ref.mean_norm, rel=0.02)


def test_evaluation_rebuilds_the_model_at_the_dtype_the_store_records(twins):
    root, f32, bf16, ckpt = twins
    for uri, dtype in ((bf16, torch.bfloat16), (f32, torch.float32)):
        evaluator = Evaluator(eval_config(root / ("bf16" if dtype == torch.bfloat16 else "f32")))
        model = evaluator._model("test-vit-tiny", StoreSource.open(uri))
        assert _floating_dtypes(model) == {dtype}
    # the spliced-in evaluation runs the bfloat16 model with the float32 dictionary
    row = Evaluator(eval_config(root / "bf16")).evaluate(ckpt)
    assert row["loss_recovered"] == pytest.approx(1.0, abs=0.05) and row["kl_with_error"] < 1e-3
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-6), "held-out rows are the stored float32 values"


def test_interpretation_and_steering_rebuild_the_model_at_their_model_dtype(twins, tmp_path):
    root, _, _, ckpt = twins
    dataset = shapes_config(root / "f32").dataset
    common = dict(checkpoint=ckpt, model=ENTRY, pretrained=False, dataset=dataset, output=str(tmp_path / "i"))
    latents = {}
    for dtype in ("float32", "bfloat16"):
        plan = plan_interpret(InterpretConfig(**common, model_dtype=dtype))
        assert plan.job().model_dtype == dtype
        worker = LatentWorker(plan.job())
        assert _floating_dtypes(worker.model) == {getattr(torch, dtype)}
        pixels = np.zeros((2, 32, 32, 3), np.uint8) + np.arange(32, dtype=np.uint8)[:, None, None]
        latents[dtype] = worker.latents(pixels, np.array(["a", "b"]))
        assert latents[dtype].dtype == np.float32
    scale = np.abs(latents["float32"]).max()
    np.testing.assert_allclose(latents["bfloat16"], latents["float32"], atol=0.05 * scale)
    assert (
        "model_dtype" in plan.description()
        and "model_dtype" not in plan_interpret(InterpretConfig(**common)).description()
    )

    steer = SteerConfig(
        checkpoint=ckpt,
        steer=SteerSpec(latents=[0], scale=1.0),
        model=ENTRY,
        pretrained=False,
        model_dtype="bfloat16",
        device="cpu",
        dataset=dataset,
        samples=4,
    )
    d, model = steered_pair(steer)
    assert _floating_dtypes(model) == {torch.bfloat16} and _floating_dtypes(d) == {torch.float32}
    summary = run_steer(steer)
    assert summary["inputs"] == 4 and summary["changed_prediction"] == 0.0, "scale 1 with the error term: no change"


def test_a_random_weight_vit_tiny_extracts_at_bfloat16_within_its_rounding(tmp_path):
    """The registry's timm ViT-Tiny (12 blocks, 197 tokens at 224 px) as extraction runs it on a GPU, here on
    the CPU: bfloat16 model, float16 store."""
    hook = "blocks.6.hook_resid_post"
    shapes = dict(type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=2))
    acts = {}
    for dtype in ("float32", "bfloat16"):
        cfg = ExtractConfig(
            model="timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k",
            hooks=[hook],
            dataset=shapes,
            output=str(tmp_path / dtype),
            model_dtype=dtype,
            shard_size=2,
            progress=False,
        )
        uri = extract_in_process(cfg)[hook]
        assert store.read_manifest(uri).model_dtype == dtype and store.read_manifest(uri).dtype == "float16"
        acts[dtype] = store.read_acts(uri)
    ref, low = acts["float32"], acts["bfloat16"]
    assert ref.shape == low.shape == (2 * 197, 192)
    error = np.abs(low - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert 0 < error.max() < 0.1, error.max()


@pytest.mark.parametrize("name", ["llava-next", "qwen2-vl"])
def test_a_multimodal_model_extracts_at_bfloat16_its_processor_pixels_cast_once(tmp_path, name):
    spec = SyntheticSource(uri=str(tmp_path / "shapes"), generator=ShapesConfig(n_images=3, image_size=40))
    rows = {}
    for dtype in ("float32", "bfloat16"):
        job = WorkerJob(
            model=tiny_entry(name),
            pretrained=False,
            seed=0,
            model_dtype=dtype,
            tokens=TokenSelection(mode="all"),
            dtype="float32",
            stores={"lm.blocks.1.hook_resid_post": str(tmp_path / dtype)},
            storage=StorageOptions(),
            batch_size=2,
            prompts=["Describe the image."],
        )
        worker = ExtractionWorker(job)
        data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, worker.model.preprocess))
        x, _ = worker.inputs.encode(data.pixels[:1], data.sample_ids[:1])
        assert x["pixel_values"].dtype == getattr(torch, dtype) and x["input_ids"].dtype == torch.int64
        worker.process(0, data)
        rows[dtype] = store.read_acts(str(tmp_path / dtype))
    ref, low = rows["float32"], rows["bfloat16"]
    assert ref.shape == low.shape and not np.array_equal(ref, low)
    assert (np.abs(low - ref).max(axis=1) / np.abs(ref).max(axis=1)).max() < 0.1


def test_pixel_inputs_are_cast_once_to_the_model_dtype():
    model = load_model(ENTRY, pretrained=False, dtype=torch.bfloat16)
    crops = np.full((2, 32, 32, 3), 200, np.uint8)
    x = PixelInputs(model).pixels(crops)
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3, 32, 32)
    reference = PixelInputs(load_model(ENTRY, pretrained=False)).pixels(crops)
    assert reference.dtype == torch.float32 and torch.equal(x, reference.to(torch.bfloat16))


@NO_GPU
def test_no_ray_stages_refuse_cuda_without_a_gpu_naming_the_field(twins, tmp_path):
    root, _, _, ckpt = twins
    assert AnalyzeConfig(device="cuda").device == "cuda" and AnalyzeConfig().device == "auto"
    with pytest.raises(InvalidRequest, match=r"^device=cuda.*no CUDA device"):
        run_analysis("logit-lens", AnalyzeConfig(device="cuda", output=str(tmp_path / "a")))
    steer = SteerConfig(checkpoint=ckpt, steer=SteerSpec(latents=[0], value=1.0), model=ENTRY, device="cuda")
    with pytest.raises(InvalidRequest, match=r"^device=cuda.*no CUDA device"):
        run_steer(steer)
    with pytest.raises(InvalidRequest, match=r"^device=cuda"):
        Evaluator(EvalConfig(device="cuda"))
    with pytest.raises(InvalidRequest, match=r"^evaluation\.device=cuda"):
        SweepWorker(EvalConfig(device="cuda"), str(tmp_path / "sweep"))
    assert Evaluator(EvalConfig(device="auto")).device == torch.device("cpu")
    explain = ExplainConfig(evidence="unused", embedder=EmbedderConfig(device="cuda"), use_ray=False)
    with pytest.raises(InvalidRequest, match=r"^embedder\.device=cuda"):
        Pipeline(explain)
    assert EmbedderConfig().device == "cpu", "explanation actors leave the GPUs to a served chat model by default"


def test_start_lines_say_what_each_ray_stage_got():
    gpus = PoolSize("cuda", 2, 1.0, 1.0, None, 2)
    cpu = PoolSize("cpu", 2, 1.0, 0.5, 1, 2)
    assert extract_start(8, gpus, "bfloat16") == (
        "extracting 8 shards: 2 extraction actors on 2 GPUs, 1 CPU each, model in bfloat16"
    )
    half = PoolSize("cpu", 2, 0.75, 0.5, 1, 2)
    assert extract_start(8, half, "float32") == (
        "extracting 8 shards: 2 extraction actors on CPU (1 torch thread each), 0.75 CPUs each, model in float32"
    )
    assert (
        interpret_start(3, gpus, "float32")
        == "interpreting 3 shards: 2 interpretation actors on 2 GPUs, model in float32"
    )
    assert (
        sweep_start(5, PoolSize("cuda", 1, 1.0, 0.0, None, 1))
        == "evaluating 5 checkpoints: 1 evaluation actor on 1 GPU"
    )
    assert sweep_start(5, cpu) == "evaluating 5 checkpoints: 2 evaluation actors on CPU (1 torch thread each)"
    assert extract_start(1, gpus, "float32").startswith("extracting 1 shard: ")
    assert interpret_start(1, gpus, "float32").startswith("interpreting 1 shard: ")
    assert sweep_start(1, gpus).startswith("evaluating 1 checkpoint: ")
    one = PoolSize("cpu", 1, 2.0, 0.0, 2, 2)  # the driver path (`shard_pool`): this process, no actors
    assert extract_start(4, one, "float32", here=True) == (
        "extracting 4 shards: in this process, no actors, 1 worker on CPU (2 torch threads each), model in float32"
    )
    assert interpret_start(1, one, "float32", here=True) == (
        "interpreting 1 shard: in this process, no actors, 1 worker on CPU (2 torch threads each), model in float32"
    )


def test_one_synchronisation_statistics_equal_the_plain_ones():
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3
    host = to_host(rows)
    synchronize(rows.device)
    assert host is rows, "on the CPU nothing is copied"
    finite, stats = unpack_stats(stats_vector(rows).numpy(), len(rows))
    plain = store.RunningStats.of(rows.numpy())
    assert finite and stats.count == 50
    np.testing.assert_allclose(stats.mean, plain.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.m2, plain.m2, rtol=1e-10)
    assert stats.norm_sum == pytest.approx(plain.norm_sum, rel=1e-12)
    rows[3, 2] = float("inf")
    assert not unpack_stats(stats_vector(rows).numpy(), len(rows))[0]
    empty_finite, empty = unpack_stats(stats_vector(rows[:0]).numpy(), 0)
    assert empty_finite and empty.count == 0 and np.array_equal(empty.mean, np.zeros(6))
