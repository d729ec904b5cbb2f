"""Extraction from multimodal language models without Ray: processor inputs, token selection, the worker,
image and video datasets."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prisma_ray import store
from prisma_ray.data import SyntheticSource, list_refs
from prisma_ray.data.shards import InputFormat, decode_shard
from prisma_ray.data.synthetic import MovingShapesConfig, ShapesConfig
from prisma_ray.evaluate.splice import put_at_positions, take
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.plan import plan_extract
from prisma_ray.extract.worker import ExtractionWorker, WorkerJob
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.models import TokenKind, TokenLayout
from prisma_ray.models.adapters.lmm_adapter import NORMALISATION
from prisma_ray.models.adapters.lmm_processor import build_processor
from prisma_ray.models.inputs import model_inputs, model_prompts, sample_prompt
from prisma_ray.models.loading import check_hooks, describe_model, load_model
from prisma_ray.models.token_selection import TokenSelection, check_selection, multimodal_positions
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, load_dictionary, write_files
from prisma_ray.storage import StorageOptions
from tests.lmm_tiny import CONFIGS, IMAGE_ID, tiny, tiny_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Describe the image.", "What shape is in the middle of this picture, and what colour is it?"]
HOOK = "lm.blocks.1.hook_resid_post"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    return request.param, tiny(request.param)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8))


def test_processor_gives_each_image_its_tokens_and_pads_the_shorter_prompt(case):
    name, model = case
    batch = model.encode(images(2), PROMPTS)
    layout = model.multimodal_layout(batch)
    mask = batch["attention_mask"].numpy().astype(bool)
    n_image = (batch["input_ids"] == IMAGE_ID).sum(1)
    assert n_image[0] == n_image[1] > 0
    assert (layout.image_mask() == (batch["input_ids"] == IMAGE_ID).numpy()).all()
    assert mask[1].all() and not mask[0].all(), "the short prompt is padded, the long one is not"
    assert mask.sum(1)[1] - mask.sum(1)[0] == len(PROMPTS[1]) - len(PROMPTS[0]), "one token per byte of text"
    ids = batch["input_ids"][1][torch.from_numpy(mask[1])]
    entry = tiny_entry(name)
    tokenizer = build_processor(model.model, entry, False, NORMALISATION[entry.family]).tokenizer
    text = tokenizer.decode(ids[ids != IMAGE_ID])
    assert PROMPTS[1] in text and text.rstrip().endswith("assistant:")
    with pytest.raises(ValueError, match="give one prompt each"):
        model.encode(images(2), PROMPTS[:1])


def test_selection_modes_on_a_multimodal_batch(case):
    _, model = case
    batch = model.encode(images(2), PROMPTS)
    layout, mask = model.multimodal_layout(batch), batch["attention_mask"].numpy()
    ids = ["a", "b"]

    def kept(**selection) -> set[tuple[int, int]]:
        sample, position = multimodal_positions(layout, mask, TokenSelection(**selection), ids)
        assert list(sample) == sorted(sample)
        return set(zip(sample.tolist(), position.tolist()))

    every = kept(mode="all")
    assert every == set(zip(*np.nonzero(mask)))
    text, image, patches = kept(mode="text"), kept(mode="image"), kept(mode="patches")
    assert text | image == every and not text & image and patches <= image
    assert all(layout.kind[b, p] == TokenKind.PATCH for b, p in patches)
    assert all(layout.kind[b, p] == TokenKind.TEXT for b, p in text)
    drawn = kept(mode="random", k=3)
    assert drawn <= patches and [b for b, _ in drawn].count(0) == 3 == [b for b, _ in drawn].count(1)
    assert drawn == kept(mode="random", k=3), "the draw is fixed by the seed and sample id"
    with pytest.raises(ValueError, match="fewer than tokens.k=99"):
        kept(mode="random", k=99)


def test_multimodal_models_refuse_vision_only_requests():
    model = describe_model(tiny_entry("llava-next"))
    with pytest.raises(ValueError, match="vision tower.*extract lm"):
        check_hooks(model, ["blocks.1.hook_resid_post"])
    check_hooks(model, [HOOK])
    with pytest.raises(ValueError, match="no CLS token"):
        check_selection(model.token_layout, TokenSelection(mode="cls"), model.name, multimodal=True)
    assert model_prompts(model, None) == ["Describe the image."]
    vit = describe_model("prisma-toy-vit-shapes")
    with pytest.raises(ValueError, match="takes no prompt"):
        model_prompts(vit, ["hello"])
    with pytest.raises(ValueError, match="tokens.mode=text is for multimodal"):
        check_selection(vit.token_layout, TokenSelection(mode="text"), vit.name)


def test_input_format_crops_images_to_the_vision_towers_size(tmp_path):
    model = describe_model(tiny_entry("qwen2-vl"))
    spec = SyntheticSource(uri=str(tmp_path / "shapes"), generator=ShapesConfig(n_images=3, image_size=40))
    data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, model.preprocess))
    assert data.pixels.shape == (3, 56, 56, 3) and data.pixels.dtype == np.uint8


@pytest.mark.parametrize("mode", ["all", "text", "image"])
def test_worker_rows_are_the_sequences_tokens_as_run_with_cache_gives_them(tmp_path, case, mode):
    name, reference = case
    hooks = [HOOK, "lm.blocks.0.hook_mlp_out"]
    spec = SyntheticSource(uri=str(tmp_path / "shapes"), generator=ShapesConfig(n_images=5, image_size=40))
    job = WorkerJob(
        model=tiny_entry(name),
        pretrained=False,
        seed=0,
        tokens=TokenSelection(mode=mode),
        dtype="float32",
        stores={h: str(tmp_path / "out" / h) for h in hooks},
        storage=StorageOptions(),
        batch_size=2,
        prompts=PROMPTS,
    )
    worker = ExtractionWorker(job)
    data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, worker.model.preprocess))
    summary = worker.process(0, data)

    reference = load_model(tiny_entry(name), pretrained=False, seed=0)
    batch = reference.encode(list(data.pixels), [sample_prompt(PROMPTS, s) for s in data.sample_ids])
    assert len({sample_prompt(PROMPTS, s) for s in data.sample_ids}) == 2, "both prompts are in use"
    layout = reference.multimodal_layout(batch)
    sample, position = multimodal_positions(layout, batch["attention_mask"].numpy(), job.tokens, data.sample_ids)
    with torch.inference_mode():
        _, cache = reference.run_with_cache(batch, hooks)
    assert summary["samples"] == 5 and summary["tokens"] == len(sample)
    assert summary["values"] == len(sample) * reference.lm_d_model * 2
    for hook in hooks:
        table = pq.read_table(tmp_path / "out" / hook / "part-00000.parquet")
        assert table.column("sample_id").to_pylist() == data.sample_ids[sample].tolist()
        assert table.column("token").to_pylist() == position.tolist()
        np.testing.assert_array_equal(table.column("kind").to_numpy(), layout.kind[sample, position])
        expected = cache[hook][torch.from_numpy(sample), torch.from_numpy(position)].numpy()
        np.testing.assert_allclose(store.decode_acts(table.column("act"), "float32"), expected, rtol=1e-4, atol=1e-4)
    kinds = set(pq.read_table(tmp_path / "out" / HOOK / "part-00000.parquet").column("kind").to_pylist())
    assert (
        kinds
        == {
            "all": {TokenKind.TEXT, TokenKind.PATCH} | ({TokenKind.NEWLINE} if "llava" in name else set()),
            "text": {TokenKind.TEXT},
            "image": kinds - {TokenKind.TEXT},
        }[mode]
    )


def test_inputs_for_a_vision_model_are_normalised_pixels():
    vit = load_model("prisma-toy-vit-shapes", pretrained=True, seed=0)
    build = model_inputs(vit, TokenSelection(mode="cls"), None, torch.device("cpu"))
    x, kept = build(np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"])
    assert x.shape == (2, 3, 32, 32) and kept.shape == (2, vit.token_layout.n_tokens)
    assert kept.sample.tolist() == [0, 1] and kept.position.tolist() == [0, 0]


def test_qwen_stores_video_tokens_with_their_frames(tmp_path):
    clips = SyntheticSource(
        uri=str(tmp_path / "clips"), generator=MovingShapesConfig(n_clips=3, num_frames=4, image_size=40)
    )
    job = WorkerJob(
        model=tiny_entry("qwen2-vl"),
        pretrained=False,
        seed=0,
        tokens=TokenSelection(mode="image"),
        dtype="float32",
        stores={HOOK: str(tmp_path / "out")},
        storage=StorageOptions(),
        batch_size=2,
    )
    worker = ExtractionWorker(job)
    fmt = InputFormat.create(clips, worker.model.preprocess)
    data = decode_shard(list_refs(clips), clips, fmt)
    assert data.pixels.shape == (3, 4, 56, 56, 3)
    summary = worker.process(0, data)
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert summary["tokens"] == table.num_rows == 3 * 8
    assert table.column("frame").to_pylist() == ([0] * 4 + [2] * 4) * 3
    assert set(table.column("kind").to_pylist()) == {TokenKind.PATCH}


def test_plan_refuses_videos_for_llava_before_any_work(tmp_path):
    clips = dict(
        type="synthetic",
        uri=str(tmp_path / "clips"),
        generator=dict(name="moving-shapes", n_clips=2, num_frames=4, image_size=40),
    )
    cfg = ExtractConfig(model=tiny_entry("llava-onevision"), hooks=[HOOK], dataset=clips, output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="cannot take the synthetic dataset.*supported for Qwen2-VL"):
        plan_extract(cfg)
    assert not (tmp_path / "out").exists(), "refused before any store was claimed"


def test_interpretation_reads_an_lmm_dictionary_on_each_images_base_view_and_its_text_tokens(tmp_path):
    entry = tiny_entry("llava-onevision")
    sites = Sites(inputs=(Site(name=HOOK, width=32, model=entry.name),))
    torch.manual_seed(0)
    sae = Dictionary(DictionaryConfig(architecture="relu", d_sae=16), sites)
    torch.nn.init.normal_(sae.W_enc)
    checkpoint = str(tmp_path / "sae")
    write_files(export_files(sae), checkpoint)
    shapes = dict(
        type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=4, image_size=40)
    )
    cfg = InterpretConfig(
        checkpoint=checkpoint,
        model=entry,
        pretrained=False,
        dataset=shapes,
        prompts=PROMPTS,
        output=str(tmp_path / "out"),
        k=2,
        reservoir=4,
    )
    plan = plan_interpret(cfg)
    assert plan.layout == TokenLayout(prefix=(), grid=(2, 2)) and plan.description()["prompts"] == PROMPTS
    data = decode_shard(list_refs(plan.spec), plan.spec, plan.fmt)
    worker = LatentWorker(plan.job(torch_threads=1))
    latents, texts, prompts, crops = worker.prompt_latents(data.pixels, data.sample_ids)
    assert crops is None, "LLaVA-OneVision: no tiles"

    model = load_model(entry, pretrained=False, seed=0)
    batch = model.encode(list(data.pixels), [sample_prompt(PROMPTS, s) for s in data.sample_ids])
    layout = model.multimodal_layout(batch)
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch, [HOOK])
        loaded = load_dictionary(checkpoint)
        for b in range(len(data.sample_ids)):
            base = np.flatnonzero((layout.kind[b] == TokenKind.PATCH) & (layout.view[b] == 0))
            assert layout.row[b, base].tolist() == [0, 0, 1, 1] and layout.col[b, base].tolist() == [0, 1, 0, 1]
            expected = loaded.encode(cache[HOOK][b, base]).numpy()
            np.testing.assert_allclose(latents[b], expected, rtol=1e-4, atol=1e-5)
            text = np.flatnonzero((layout.kind[b] == TokenKind.TEXT) & batch["attention_mask"][b].bool().numpy())
            assert prompts[b].positions.tolist() == text.tolist(), "every text token but the padding"
            np.testing.assert_allclose(texts[b], loaded.encode(cache[HOOK][b, text]).numpy(), rtol=1e-4, atol=1e-5)
            prompt = sample_prompt(PROMPTS, data.sample_ids[b])
            assert "".join(prompts[b].tokens).startswith("user:") and prompt in "".join(prompts[b].tokens)
    assert (latents > 0).any()
    record, _ = worker.process(data)
    best = record.text.scores[:, 0]
    assert np.isfinite(best).any() and set(record.text.ids[np.isfinite(record.text.scores)]) <= set(data.sample_ids)
    latent = int(np.nanargmax(np.where(np.isfinite(best), best, np.nan)))
    assert "[[" + record.text.tokens[latent, 0] + "]]" in record.text.contexts[latent, 0]
    assert "<image>" in record.text.contexts[latent, 0] or "user:" not in record.text.contexts[latent, 0]

    with pytest.raises(ValueError, match="takes images, not videos"):
        plan_interpret(
            cfg.model_copy(
                update={
                    "dataset": SyntheticSource(
                        uri=str(tmp_path / "clips"),
                        generator=MovingShapesConfig(n_clips=2, num_frames=4, image_size=40),
                    )
                }
            )
        )
    with pytest.raises(ValueError, match="vision tower"):
        plan_interpret(cfg.model_copy(update={"hook": "blocks.1.hook_resid_post"}))


def test_a_per_sample_token_mask_splices_exactly_those_tokens():
    cur = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, False, True, False], [False, False, True, False, False]])
    rows = take(cur, mask)
    assert rows.shape == (1, 3, 3) and torch.equal(rows[0], cur[mask])
    out = put_at_positions(mask, lambda acts: torch.zeros_like(take(acts, mask)))(cur, None)
    assert (out[mask] == 0).all() and torch.equal(out[~mask], cur[~mask])
