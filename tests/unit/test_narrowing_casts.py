"""Narrowing casts never turn a finite value into inf or garbage silently: activation stores (float16 and
bfloat16 as uint16), the extraction worker, dictionary checkpoints (float32), top-k maps (float16) and
heatmaps / dimmed images (uint8). Each either refuses naming the input or cannot overflow by construction."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prisma_ray import store
from prisma_ray.analysis.draw import matrix_png
from prisma_ray.data import SyntheticSource, list_refs
from prisma_ray.data.shards import InputFormat, decode_shard
from prisma_ray.data.synthetic import ShapesConfig
from prisma_ray.errors import InvalidRequest
from prisma_ray.extract.worker import ExtractionWorker, WorkerJob
from prisma_ray.interpret import heatmaps
from prisma_ray.interpret.autointerp.embedders import synthetic_prototypes
from prisma_ray.interpret.collect import InterpretConfig
from prisma_ray.interpret.evidence import mask_images
from prisma_ray.interpret.topk import LatentRecord
from prisma_ray.models import ModelEntry
from prisma_ray.models.spec import TokenLayout
from prisma_ray.models.token_selection import TokenSelection, check_selection
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, load_dictionary, write_files
from prisma_ray.storage import StorageOptions
from tests.tiny_models import tiny_vit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VIT = ModelEntry(**tiny_vit())
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


# --- the store's encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,value,holds",
    [("float16", 1e5, "bfloat16"), ("float16", 65520.0, "bfloat16"), ("bfloat16", 3.4e38, "float32")],
)
def test_values_beyond_the_store_dtype_are_refused_naming_the_rows(dtype, value, holds):
    acts = np.ones((6, 4), np.float32)
    acts[3, 2] = -value
    ids = [f"img-{i // 2}" for i in range(6)]
    with pytest.raises(store.ActivationRangeError) as err:
        store.token_table(ids, np.arange(6), np.full(6, -1), np.full(6, 2), acts, dtype, where="store s (hook h)")
    message = str(err.value)
    assert message.startswith("store s (hook h): activations of samples 'img-1' reach magnitude")
    assert f"{value:.6g}" in message and f"{holds} holds them" in message and dtype in message
    assert isinstance(err.value, InvalidRequest)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_from_the_model_is_refused_in_every_dtype(dtype, bad):
    acts = np.zeros((4, 3), np.float32)
    acts[1, 0] = bad
    with pytest.raises(store.ActivationRangeError, match=r"rows 1 hold (NaN|inf) values from the model itself"):
        store.encode_acts(acts, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_largest_value_of_a_dtype_is_kept(dtype):
    acts = np.array([[store.DTYPE_MAX[dtype], -store.DTYPE_MAX[dtype], 1.0]], np.float32)
    back = store.decode_acts(store.encode_acts(acts, dtype), dtype)
    np.testing.assert_array_equal(back, acts)


# --- the extraction worker ------------------------------------------------------------------------


def _worker(tmp_path, dtype: str, inject: dict) -> tuple[ExtractionWorker, object]:
    """A worker over the tiny ViT whose block 0 output (`blocks.0.hook_resid_post`) carries `inject["value"]`
    at one token of batch row 1 whenever `inject["value"]` is set (a forward hook on the timm block)."""
    job = WorkerJob(
        model=TINY_VIT,
        pretrained=False,
        seed=0,
        tokens=TokenSelection(mode="all"),
        dtype=dtype,
        stores={h: str(tmp_path / "out" / h) for h in HOOKS},
        storage=StorageOptions(),
        batch_size=5,
    )
    worker = ExtractionWorker(job)

    def massive(_module, _args, output):
        if inject.get("value") is None:
            return None
        output = output.clone()
        output[1, 3, 0] = inject["value"]
        return output

    worker.model.model.blocks[0].mlp.fc2.register_forward_hook(massive)  # inside the block: no hook point there
    spec = SyntheticSource(uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=12, image_size=40))
    data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, worker.model.preprocess))
    return worker, data


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("value,match", [(1e5, "reach magnitude 100000, beyond float16's"), (np.nan, "hold NaN")])
def test_a_shard_the_store_cannot_hold_fails_and_nothing_of_it_is_written(tmp_path, value, match):
    inject: dict = {}
    worker, data = _worker(tmp_path, "float16", inject)
    worker.process(0, data)  # a clean shard first: it stays
    before = _files(tmp_path / "out")
    inject["value"] = value
    with pytest.raises(store.ActivationRangeError, match=match) as err:
        worker.process(1, data)
    message = str(err.value)
    uri = worker.job.stores[HOOKS[0]]
    assert f"store {uri} (hook point {HOOKS[0]} of {TINY_VIT.name}, input shard 1)" in message
    ids = data.sample_ids
    assert f"activations of samples {str(ids[1])!r} " in message, "the sample of row 1 of the first minibatch"
    if np.isfinite(value):
        assert "bfloat16 holds them" in message
    assert _files(tmp_path / "out") == before, "nothing of shard 1 (no shard, statistics or errors of any hook)"
    for hook in HOOKS:
        assert store.StoreWriter(worker.job.stores[hook]).completed() == {0}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_dtype_that_holds_the_values_succeeds_and_its_statistics_are_the_stored_values(tmp_path, dtype):
    inject = {"value": 1e5}
    worker, data = _worker(tmp_path, dtype, inject)
    worker.process(0, data)
    for hook in HOOKS:
        table = pq.read_table(tmp_path / "out" / hook / "part-00000.parquet")
        stored = store.decode_acts(table.column("act"), dtype).astype(np.float64)
        assert np.isfinite(stored).all()
        if hook == HOOKS[0]:
            assert np.abs(stored).max() == pytest.approx(1e5, rel=1e-2)
        stats = store.StoreWriter(worker.job.stores[hook]).merged_stats({0}, stored.shape[1])
        expected = store.RunningStats.of(stored)
        assert stats.count == expected.count
        np.testing.assert_allclose(stats.mean, expected.mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(stats.var, expected.var, rtol=1e-9, atol=1e-9)
        assert stats.mean_norm == pytest.approx(expected.mean_norm, rel=1e-9)


# --- dictionary checkpoints (float32) -------------------------------------------------------------


def _dictionary() -> Dictionary:
    torch.manual_seed(0)
    return Dictionary(
        DictionaryConfig(architecture="relu", d_sae=8), Sites(inputs=(Site(name="h", width=4, model="m"),))
    )


def test_a_checkpoint_beyond_float32_is_refused_naming_the_file_and_tensor(tmp_path):
    write_files(export_files(_dictionary()), str(tmp_path))
    path = tmp_path / "sae_weights.safetensors"
    weights = {k: v.double() for k, v in load_safetensors(path.read_bytes()).items()}
    weights["W_enc"][0, 0] = -1e39
    path.write_bytes(save_safetensors(weights))
    with pytest.raises(InvalidRequest, match=re.escape(f"{tmp_path}: weights W_enc reaches magnitude 1e+39, beyond")):
        load_dictionary(str(tmp_path))


def test_exporting_weights_whose_folded_normalisation_overflows_float32_is_refused():
    d = _dictionary()
    with torch.no_grad():
        d.out_scale[1] = 1e-44  # W_dec / out_scale: ~1e43 in float64, inf in float32
    with pytest.raises(
        InvalidRequest, match=r"dictionary on m h \(export\): weights W_dec reaches magnitude [\d.]+e\+4"
    ):
        export_files(d)


# --- top-k maps (float16) -------------------------------------------------------------------------


@pytest.mark.parametrize("value,match", [(1e5, "reach magnitude 100000, beyond float16"), (np.nan, "are NaN or inf")])
def test_latent_activations_the_maps_cannot_hold_are_refused(value, match):
    record = LatentRecord.empty(3, 2, k=2)
    acts = np.ones((2, 2, 3), np.float32)
    acts[1, 0, 2] = value
    with pytest.raises(InvalidRequest, match=rf"samples \['b'\] at latents \[2\] {match}"):
        record.update(np.array(["a", "b"]), acts, np.array([0, 2]))
    acts[1, 0, 2] = 65504.0
    kept = record.update(np.array(["a", "b"]), acts, np.array([0, 2]))
    assert kept.top["max"].maps.max() == 65504.0 and np.isfinite(kept.top["max"].maps).all()


# --- heatmaps and dimmed images (uint8) -----------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_heatmaps_of_nan_or_inf_are_refused(bad):
    image = np.full((8, 8, 3), 100, np.uint8)
    grid = np.ones((2, 2), np.float32)
    grid[0, 1] = bad
    with pytest.raises(InvalidRequest, match=r"latent 3: 1 of 4 heatmap values are NaN or inf"):
        heatmaps.overlay(image, grid, where="latent 3")
    with pytest.raises(InvalidRequest, match="NaN or inf"):
        heatmaps.overlay(image, np.ones((2, 2)), vmax=bad)
    with pytest.raises(InvalidRequest, match="clip: 1 of 8"):
        heatmaps.frame_overlays(np.stack([image, image]), np.stack([grid, np.ones_like(grid)]), where="clip")
    layout = TokenLayout(prefix=(), grid=(2, 2))
    values = np.array([1.0, bad, 0.0, 2.0], np.float32)
    png = matrix_png(values.reshape(2, 2), ["a", "b"], ["x", "y"], "t", "v")
    assert png.startswith(b"\x89PNG"), "a matrix figure draws NaN/inf cells blank"
    assert heatmaps.patch_grid(values, layout).shape == (1, 2, 2)


def test_dimming_factors_outside_zero_one_are_refused():
    images = np.full((1, 4, 4, 3), 200, np.uint8)
    maps = np.zeros((1, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0
    for dim in (1.5, -0.1):
        with pytest.raises(InvalidRequest, match="mask_images: dim must be a fraction in"):
            mask_images(images, maps, dim=dim)
        with pytest.raises(InvalidRequest, match="masked: dim must be a fraction"):
            heatmaps.masked(images[0], maps[0] > 0, dim=dim)
    with pytest.raises(InvalidRequest, match="synthetic_prototypes: dim"):
        synthetic_prototypes(["circle"], ShapesConfig(), n=1, dim=2.0)
    assert mask_images(images, maps, dim=1.0).tolist() == images.tolist()


def test_mask_images_are_binary():
    mask = np.array([[True, False], [False, True]])
    assert set(np.unique(heatmaps.mask_image(mask, (4, 4))).tolist()) == {0, 255}
    assert heatmaps.mask_image(mask * 2, (2, 2)).tolist() == [[255, 0], [0, 255]], "any non-zero is active"


# --- integer columns (int16 token positions and frames) -------------------------------------------


def test_layouts_beyond_the_int16_token_columns_are_refused():
    check_selection(TokenLayout(prefix=(), grid=(181, 181)), TokenSelection(mode="all"), "m")  # 32761 tokens
    with pytest.raises(InvalidRequest, match=r"m: 40000 tokens over 1 frames per sample exceed the store's int16"):
        check_selection(TokenLayout(prefix=(), grid=(200, 200)), TokenSelection(mode="cls"), "m")
    with pytest.raises(ValidationError, match="k"):
        InterpretConfig(checkpoint="x", k=40000)
