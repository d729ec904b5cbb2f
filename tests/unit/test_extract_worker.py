"""Extraction without Ray: token selection, shard planning, config hashing, decoding and the worker."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from prisma_ray import store
from prisma_ray.config import load_config
from prisma_ray.data import ImageSource, SampleRef, SyntheticSource, list_refs
from prisma_ray.data.errors import ErrorRecord, read_errors_table
from prisma_ray.data.shards import InputFormat, ShardData, decode_shard, plan_shards
from prisma_ray.errors import InvalidRequest
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.plan import config_hash, pending_shards, store_description
from prisma_ray.extract.worker import ExtractionWorker, WorkerJob
from prisma_ray.models import ModelEntry, TokenKind, TokenLayout, UnknownHookPoint, default_model
from prisma_ray.models.inputs import PixelInputs, model_prompts, normalize
from prisma_ray.models.loading import check_hooks, describe_model, load_model
from prisma_ray.models.token_selection import TokenSelection, check_selection, token_columns, token_positions
from prisma_ray.runtime.pool import ShardResources
from prisma_ray.storage import StorageOptions
from tests.tiny_models import tiny_vit

TINY_VIT = ModelEntry(**tiny_vit())
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
LAYOUT = TokenLayout(prefix=(TokenKind.CLS, TokenKind.REGISTER, TokenKind.REGISTER), grid=(2, 3))


def test_fixed_token_selections():
    ids = ["a", "b"]
    sel = {m: token_positions(LAYOUT, TokenSelection(mode=m), ids) for m in ("all", "cls", "patches")}
    np.testing.assert_array_equal(sel["all"], [list(range(9))] * 2)
    np.testing.assert_array_equal(sel["cls"], [[0], [0]])
    np.testing.assert_array_equal(sel["patches"], [list(range(3, 9))] * 2)
    token, frame, kind = token_columns(LAYOUT, sel["all"])
    assert token.dtype == np.int16 and list(token[:9]) == list(range(9))
    assert list(kind[:9]) == [TokenKind.CLS, TokenKind.REGISTER, TokenKind.REGISTER] + [TokenKind.PATCH] * 6
    assert set(frame) == {-1}


def test_random_patches_are_seeded_per_sample():
    sel = TokenSelection(mode="random", k=3, seed=7)
    ids = [f"img-{i}" for i in range(20)]
    pos = token_positions(LAYOUT, sel, ids)
    assert pos.shape == (20, 3)
    for row in pos:
        assert list(row) == sorted(set(row)) and row.min() >= 3 and row.max() < 9
    np.testing.assert_array_equal(pos, token_positions(LAYOUT, sel, ids))
    np.testing.assert_array_equal(pos[5:6], token_positions(LAYOUT, sel, ids[5:6]), "independent of the batch")
    assert len({tuple(r) for r in pos}) > 5, "samples draw different patches"
    other = token_positions(LAYOUT, TokenSelection(mode="random", k=3, seed=8), ids)
    assert not np.array_equal(pos, other)


@pytest.mark.parametrize(
    "layout,frames",
    [
        (TokenLayout(prefix=(), grid=(2, 2), time=3, tubelet=2), [0] * 4 + [2] * 4 + [4] * 4),
        (TokenLayout(prefix=(TokenKind.CLS,), grid=(1, 2), time=2, patch_order="hwt"), [-1, 0, 1, 0, 1]),
    ],
)
def test_video_tokens_keep_their_frame(layout, frames):
    pos = token_positions(layout, TokenSelection(mode="all"), ["clip"])
    token, frame, kind = token_columns(layout, pos)
    assert list(frame) == frames
    assert list(kind == TokenKind.PATCH) == [f >= 0 for f in frames]


def test_selection_and_hook_errors():
    with pytest.raises(ValidationError, match="`k`"):
        TokenSelection(mode="random")
    with pytest.raises(ValidationError, match="`k`"):
        TokenSelection(mode="all", k=3)
    with pytest.raises(ValueError, match="no CLS token"):
        check_selection(TokenLayout(prefix=(), grid=(2, 2)), TokenSelection(mode="cls"), "m")
    with pytest.raises(ValueError, match="only 6 patch tokens"):
        check_selection(LAYOUT, TokenSelection(mode="random", k=7), "m")
    model = describe_model(TINY_VIT)
    check_hooks(model, HOOKS)
    with pytest.raises(UnknownHookPoint, match="Did you mean"):
        check_hooks(model, ["blocks.1.hook_resid_pots"])
    with pytest.raises(ValueError, match="attention probabilities"):
        check_hooks(model, ["blocks.0.attn.hook_pattern"])


def _synthetic(tmp_path, n=12, size=40) -> SyntheticSource:
    return SyntheticSource(uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=n, image_size=size))


def test_shards_are_sorted_slices_and_pending_is_per_hook(tmp_path):
    spec = _synthetic(tmp_path, n=5)
    refs = [SampleRef(f"u{i}", f"s{i}") for i in (3, 0, 4, 1, 2)]
    shards = plan_shards(refs, spec, 2)
    assert [[r.sample_id for r in s] for s in shards] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert len(plan_shards(refs, ImageSource(uri="x"), 2)) == 3
    pending = pending_shards(3, {"a": {0, 1}, "b": {0}})
    assert pending == {1: ["b"], 2: ["a", "b"]}
    assert pending_shards(3, {"a": {0, 1, 2}}) == {}


def test_config_hash_covers_what_changes_rows(tmp_path):
    spec = _synthetic(tmp_path)
    base = ExtractConfig(model=TINY_VIT, hooks=HOOKS, dataset=spec)

    def digest(cfg, hook=HOOKS[0], inputs="d0", prompts=None):
        return config_hash(store_description(cfg, TINY_VIT, hook, cfg.dataset, inputs, prompts))

    same = base.model_copy(
        update={"batch_size": 7, "resources": ShardResources(actors=3), "max_shards": 1, "output": "elsewhere"}
    )
    assert digest(base) == digest(same)
    changed = [
        base.model_copy(update={"tokens": TokenSelection(mode="cls")}),
        base.model_copy(update={"dtype": "float32"}),
        base.model_copy(update={"seed": 1}),
        base.model_copy(update={"shard_size": 3}),
        base.model_copy(update={"dataset": _synthetic(tmp_path, n=13)}),
    ]
    assert all(digest(c) != digest(base) for c in changed)
    assert digest(base, hook=HOOKS[1]) != digest(base) and digest(base, inputs="d1") != digest(base)
    assert digest(base, prompts=["a"]) != digest(base) and digest(base, prompts=["a"]) != digest(base, prompts=["b"])

    writer = store.StoreWriter(str(tmp_path / "store"))
    writer.claim(digest(base), store_description(base, TINY_VIT, HOOKS[0], spec, "d0", None))
    with pytest.raises(store.StoreConfigMismatch, match="Changed: dtype"):
        writer.claim(digest(changed[1]), store_description(changed[1], TINY_VIT, HOOKS[0], spec, "d0", None))


def test_decoded_crops_normalise_to_the_model_pixels(tmp_path):
    spec = _synthetic(tmp_path)
    model = describe_model(TINY_VIT)
    assert model.preprocess.crop_pct < 1, "exercises resize + centre crop"
    refs = list_refs(spec)
    data = decode_shard(refs, spec, InputFormat.create(spec, model.preprocess))
    assert data.pixels.dtype == np.uint8 and data.pixels.shape == (12, 32, 32, 3)
    assert list(data.sample_ids) == [r.sample_id for r in refs]
    mean, std = torch.tensor(model.preprocess.mean), torch.tensor(model.preprocess.std)
    ours = normalize(torch.from_numpy(data.pixels), mean, std).numpy()
    x = data.pixels.astype(np.float32) / np.float32(255.0)  # (x / 255 - mean) / std in float32, channels first
    x = (x - np.asarray(model.preprocess.mean, np.float32)) / np.asarray(model.preprocess.std, np.float32)
    np.testing.assert_array_equal(ours, np.moveaxis(x, -1, -3))
    np.testing.assert_array_equal(PixelInputs(model).pixels(data.pixels).numpy(), ours)
    floats = torch.from_numpy(data.pixels.astype(np.float32))  # normalised in place: never its input
    np.testing.assert_array_equal(normalize(floats, mean, std).numpy(), ours)
    np.testing.assert_array_equal(floats.numpy(), data.pixels)
    clips = torch.from_numpy(np.stack([data.pixels[:4], data.pixels[4:8]]))  # videos: [B, T, H, W, 3]
    np.testing.assert_array_equal(normalize(clips, mean, std).numpy()[1], ours[4:8])


def test_shard_payload_roundtrip():
    err = ErrorRecord("b.png", "/x/b.png", "corrupt", "not an image")
    data = ShardData(np.array(["a.png"]), np.array([3]), np.ones((1, 4, 4, 3), np.uint8), [err])
    back = ShardData.from_bytes(data.to_bytes())
    assert list(back.sample_ids) == ["a.png"] and back.labels.tolist() == [3] and back.errors == [err]
    np.testing.assert_array_equal(back.pixels, data.pixels)
    empty = ShardData.from_bytes(ShardData(np.array([], str), np.array([], int), np.zeros((0, 2))).to_bytes())
    assert empty.errors == [] and len(empty.sample_ids) == 0


def _job(tmp_path, **kw) -> WorkerJob:
    fields = dict(
        model=TINY_VIT,
        pretrained=False,
        seed=0,
        tokens=TokenSelection(mode="random", k=5, seed=1),
        dtype="float32",
        stores={h: str(tmp_path / "out" / h) for h in HOOKS},
        storage=StorageOptions(),
        batch_size=5,
    )
    return WorkerJob(**{**fields, **kw})


@pytest.mark.parametrize(
    "dtype,tol,tokens,expected_tokens",
    [
        ("float32", 1e-5, dict(mode="random", k=5, seed=1), None),
        ("float16", 2e-3, dict(mode="all"), list(range(17))),
        ("bfloat16", 1e-2, dict(mode="patches"), list(range(1, 17))),
        ("float16", 2e-3, dict(mode="cls"), [0]),
    ],
)
def test_worker_rows_equal_run_with_cache(tmp_path, dtype, tol, tokens, expected_tokens):
    spec = _synthetic(tmp_path)
    selection = TokenSelection(**tokens)
    job = _job(tmp_path, dtype=dtype, tokens=selection)
    worker = ExtractionWorker(job)
    refs = list_refs(spec)
    data = decode_shard(refs, spec, InputFormat.create(spec, worker.model.preprocess))
    summary = worker.process(3, data)
    per_sample = selection.k or len(expected_tokens)
    assert summary["samples"] == 12 and summary["tokens"] == 12 * per_sample and summary["errors"] == 0
    assert summary["values"] == 12 * per_sample * 32 * 2

    reference = load_model(TINY_VIT, pretrained=False, seed=0)
    with torch.inference_mode():
        _, cache = reference.run_with_cache(PixelInputs(reference).pixels(data.pixels), HOOKS)
    row_of = {sid: i for i, sid in enumerate(data.sample_ids)}
    kinds = reference.token_layout.kinds()
    for hook in HOOKS:
        table = pq.read_table(tmp_path / "out" / hook / "part-00003.parquet")
        assert table.num_rows == 12 * per_sample, "samples x selected tokens"
        assert store.store_dtype(table.schema) == dtype
        ids, tokens = table.column("sample_id").to_pylist(), table.column("token").to_numpy()
        np.testing.assert_array_equal(table.column("kind").to_numpy(), kinds[tokens])
        assert set(table.column("frame").to_pylist()) == {-1}
        stored = store.decode_acts(table.column("act"), dtype)
        expected = np.stack([cache[hook][row_of[s], t].numpy() for s, t in zip(ids, tokens)])
        np.testing.assert_allclose(stored, expected, rtol=tol, atol=tol)
        for sid in row_of:
            chosen = tokens[[i for i, s in enumerate(ids) if s == sid]]
            if expected_tokens is None:
                assert len(set(chosen)) == 5 and list(chosen) == sorted(chosen) and chosen.min() >= 1
            else:
                assert list(chosen) == expected_tokens
        stats = store.StoreWriter(job.stores[hook]).merged_stats({3}, 32)
        np.testing.assert_allclose(stats.mean, expected.mean(0), atol=tol)
        np.testing.assert_allclose(stats.var, expected.var(0, ddof=1), rtol=1e-4 + tol, atol=tol)
        assert stats.mean_norm == pytest.approx(np.linalg.norm(expected, axis=1).mean(), rel=1e-5 + tol)


@pytest.mark.parametrize("dtype,limit", [("float16", 2.1), ("bfloat16", 2.1), ("float32", 4.2)])
def test_shards_take_about_the_dtype_size_per_value(tmp_path, dtype, limit):
    acts = np.random.default_rng(0).normal(size=(64 * 197, 192)).astype(np.float32)
    positions = np.tile(np.arange(197), (64, 1))
    token, frame, kind = token_columns(TokenLayout(grid=(14, 14)), positions)
    ids = np.repeat([f"images/{i:06d}.png" for i in range(64)], 197).tolist()
    table = store.token_table(ids, token, frame, kind, acts, dtype)
    nbytes = store.StoreWriter(str(tmp_path)).write_shard(0, table, store.RunningStats.of(acts))
    assert nbytes / acts.size <= limit


def test_worker_records_bad_samples_and_writes_empty_shards(tmp_path):
    good = [r.uri for r in list_refs(_synthetic(tmp_path, n=2))]
    (tmp_path / "broken.png").write_bytes(b"not an image at all" * 10)
    files = ImageSource(items=[good[0], str(tmp_path / "broken.png"), str(tmp_path / "missing.png")])
    job = _job(tmp_path, tokens=TokenSelection(mode="cls"))
    worker = ExtractionWorker(job)
    fmt = InputFormat.create(files, worker.model.preprocess)
    refs = list_refs(files)
    summary = worker.process(0, decode_shard(refs, files, fmt))
    assert summary["samples"] == 1 and summary["errors"] == 2 and summary["tokens"] == 1
    only_bad = worker.process(1, decode_shard(refs[1:], files, fmt), hooks=HOOKS[:1])
    assert only_bad["samples"] == 0 and only_bad["tokens"] == 0
    assert store.StoreWriter(job.stores[HOOKS[0]]).completed() == {0, 1}
    assert store.StoreWriter(job.stores[HOOKS[1]]).completed() == {0}
    errors = read_errors_table(job.stores[HOOKS[0]])
    assert sorted(errors.column("reason").to_pylist()) == ["corrupt", "corrupt", "missing", "missing"]
    again = worker.process(0, decode_shard(refs, files, fmt))
    assert again == {**summary, "seconds": again["seconds"]}
    assert read_errors_table(job.stores[HOOKS[0]]).num_rows == 4, "a rerun overwrites the shard's errors"
    assert pq.read_table(tmp_path / "out" / HOOKS[0] / "part-00000.parquet").column("sample_id").to_pylist() == [
        good[0]
    ]


def test_config_defaults_and_validation():
    cfg = ExtractConfig()
    assert cfg.dtype == "float16" and cfg.dataset.type == "synthetic" and cfg.model == default_model()
    assert ExtractConfig(model=json.loads(TINY_VIT.model_dump_json())).model == TINY_VIT
    with pytest.raises(ValidationError, match="distinct"):
        ExtractConfig(hooks=["hook_embed", "hook_embed"])
    with pytest.raises(ValidationError, match="plain name"):
        ExtractConfig(split="a/b")


def test_readme_extraction_examples_are_valid_configs(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Extraction\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    overrides = re.findall(r"--set (\S+)", "".join(re.findall(r"```bash\n(.*?)```", section, re.DOTALL)))
    assert len(blocks) == 3 and len(overrides) == 3
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        cfg = load_config(ExtractConfig, tmp_path / f"{i}.yaml", overrides)
        model = describe_model(cfg.model)
        check_hooks(model, cfg.hooks)
        multimodal = model.preprocess.modality == "multimodal"
        check_selection(model.token_layout, cfg.tokens, model.name, multimodal)
        assert (model_prompts(model, cfg.prompts) is not None) == multimodal


HEAD_HOOKS = ["blocks.1.attn.hook_z", "blocks.0.mlp.hook_post"]


@pytest.mark.parametrize("head,widths", [(None, (32, 128)), (1, (16, 128))], ids=["flattened", "head-1"])
def test_worker_stores_per_head_and_neuron_points(tmp_path, head, widths):
    """`attn.hook_z` is stored with its 2 heads of 16 flattened into 32 columns (head-major), or head 1 only;
    `mlp.hook_post` as its 128 neurons; the description (the manifest's config) records which."""
    spec = _synthetic(tmp_path)
    stores = {h: str(tmp_path / "out" / h) for h in HEAD_HOOKS}
    job = _job(tmp_path, stores=stores, head=head, tokens=TokenSelection(mode="all"))
    worker = ExtractionWorker(job)
    data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, worker.model.preprocess))
    worker.process(0, data)
    reference = load_model(TINY_VIT, pretrained=False, seed=0)
    with torch.inference_mode():
        _, cache = reference.run_with_cache(PixelInputs(reference).pixels(data.pixels), HEAD_HOOKS)
    z = cache[HEAD_HOOKS[0]]
    expected = {HEAD_HOOKS[0]: z.flatten(2) if head is None else z[:, :, head], HEAD_HOOKS[1]: cache[HEAD_HOOKS[1]]}
    for hook, width in zip(HEAD_HOOKS, widths):
        table = pq.read_table(tmp_path / "out" / hook / "part-00000.parquet")
        stored = store.decode_acts(table.column("act"), "float32")
        assert stored.shape == (12 * 17, width)
        np.testing.assert_allclose(stored, expected[hook].reshape(-1, width).numpy(), rtol=1e-5, atol=1e-6)
    cfg = ExtractConfig(model=TINY_VIT, hooks=HEAD_HOOKS, dataset=spec, head=head)
    described = [store_description(cfg, TINY_VIT, hook, spec, "d0", None) for hook in HEAD_HOOKS]
    assert described[0]["heads"] == ("flattened" if head is None else head) and "heads" not in described[1]


def test_head_must_exist_and_needs_a_per_head_point():
    model = describe_model(TINY_VIT)
    check_hooks(model, HEAD_HOOKS, head=1)
    with pytest.raises(InvalidRequest, match="heads 0..1"):
        check_hooks(model, HEAD_HOOKS, head=2)
    with pytest.raises(InvalidRequest, match="per-head hook points"):
        check_hooks(model, HOOKS, head=0)


def test_every_sample_rejected_fails_the_run_naming_why_and_keeps_the_rejections(tmp_path):
    """Clips shorter than the model's frames (the registry campaign gave TimeSformer-L, which samples 96 frames,
    16-frame clips): the run fails naming the store, the reason and an example, writes no manifest (nothing
    downstream reads an empty store) and keeps the `_errors` table; it used to finish with an empty store and
    fail at training with "no rows matched across the stores"."""
    from prisma_ray.extract.pipeline import run_extract
    from prisma_ray.runtime import pool
    from tests.tiny_models import tiny_videomae

    cfg = ExtractConfig(
        model=tiny_videomae("test-videomae-short", "VideoMAEModel", use_mean_pooling=False),
        hooks=["blocks.0.hook_resid_post"],
        output=str(tmp_path / "out"),
        shard_size=2,
        dataset=dict(
            type="synthetic",
            uri=str(tmp_path / "clips"),
            generator=dict(name="moving-shapes", n_clips=2, image_size=32, num_frames=2),
        ),
        progress=False,
    )
    with pool.inline({"CPU": 1.0}), pytest.raises(InvalidRequest) as caught:
        run_extract(cfg)
    uri = str(tmp_path / "out" / "test-videomae-short" / "blocks.0.hook_resid_post" / "train")
    message = str(caught.value)
    assert message.startswith(f"{uri}: every sample of {tmp_path / 'clips'} was rejected (2: 2 too_short")
    assert "sampling needs 4" in message and f"{uri}/_errors" in message
    assert not (Path(uri) / "manifest.json").exists()
    assert read_errors_table(uri).column("reason").to_pylist() == ["too_short", "too_short"]
