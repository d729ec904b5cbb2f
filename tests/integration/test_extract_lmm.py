"""A multimodal language model's layer end to end (the loop of "Large Multi-modal Models Can Interpret Features in
Large Multi-modal Models", offline): `prisma-ray extract` (image + prompt in, sequence tokens out, through the Ray
actor pool), a TopK SAE trained on its image and text tokens, its evaluation, its latents' top images and top text
tokens with their dashboard, their explanations by a served chat model (a fixed-table server on 127.0.0.1), and
answers generated with an explained latent clamped."""

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

from prisma_ray import store
from prisma_ray.cli import main
from prisma_ray.evaluate import EvalConfig, evaluate_checkpoint
from prisma_ray.interpret.autointerp.run import ExplainConfig, run_explain
from prisma_ray.interpret.collect import InterpretConfig
from prisma_ray.interpret.dashboard import write_dashboard
from prisma_ray.interpret.evidence import read_explanations
from prisma_ray.interpret.pipeline import run_interpret
from prisma_ray.interpret.results import read_results
from prisma_ray.interpret.steer import GenerationSpec, SteerConfig, SteerSpec, run_steer
from prisma_ray.models import TokenKind
from prisma_ray.sae import load_dictionary
from prisma_ray.sae.io import read_checkpoint_info
from prisma_ray.train.config import TrainConfig
from prisma_ray.train.job import run_training
from tests.lmm_tiny import tiny_entry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

HOOK = "lm.blocks.1.hook_resid_post"
PROMPTS = ["Describe the image.", "Which shapes do you see, and where are they?"]


@pytest.fixture(scope="module")
def campaign(ray_local, tmp_path_factory):
    """`prisma-ray extract` of the tiny LLaVA-OneVision's `lm` layer on 24 images with prompts (through the Ray
    actor pool), then a TopK SAE trained on its image and text tokens: `(tmp dir, extract config, store URI,
    exported dictionary)`."""
    tmp_path = tmp_path_factory.mktemp("lmm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_torch_thread`, which is per test
    config = dict(
        model=tiny_entry("llava-onevision").model_dump(mode="json"),
        hooks=[HOOK],
        tokens=dict(mode="all"),
        prompts=PROMPTS,
        dtype="float32",
        output=str(tmp_path / "acts"),
        shard_size=8,
        batch_size=4,
        resources=dict(actors=1),
        progress=False,
        dataset=dict(
            type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=24, image_size=40)
        ),
    )
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["extract", str(path)]) == 0
    uri = str(tmp_path / "acts" / "tiny-llava-onevision" / HOOK / "train")
    summary = run_training(
        TrainConfig.model_validate(
            dict(
                name="lmm",
                runs=str(tmp_path / "runs"),
                data=dict(inputs=[uri], kinds=["patch", "text"]),
                dictionaries=[dict(architecture="topk", k=8, d_sae=128, lr=3e-3)],
                batch_size=256,
                steps=120,
                log_every=40,
                checkpoint_every=120,
                workers=0,
                resources=dict(torch_threads=1),
            )
        )
    )
    torch.set_num_threads(threads)
    assert summary.steps == 120
    (name,) = summary.dictionaries
    return tmp_path, config, path, uri, str(tmp_path / "runs" / "lmm" / "dictionaries" / name)


def test_an_sae_trains_on_an_lmm_layer_extracted_through_ray(campaign, capsys):
    tmp_path, config, path, uri, exported = campaign
    manifest = store.read_manifest(uri)
    table = store.read_table(uri)
    assert (manifest.d_model, manifest.n_samples, manifest.n_tokens) == (32, 24, table.num_rows)
    assert manifest.token_layout == {"multimodal": True, "prompts": PROMPTS}
    assert manifest.token_selection["mode"] == "all"
    kinds = pc.value_counts(table.column("kind")).to_pylist()
    counts = {TokenKind(k["values"]).name: k["counts"] for k in kinds}
    assert counts["PATCH"] == 24 * 8 and counts["NEWLINE"] == 24 * 2, "2x2 base view + 2x2 crop with row newlines"
    assert counts["TEXT"] > counts["PATCH"], "prompt and chat-template tokens"
    assert main(["extract", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0 written, 3 already complete" in out and f"store    {uri}" in out

    (site,) = read_checkpoint_info(exported).sites.inputs
    assert (site.name, site.model, site.width) == (HOOK, "tiny-llava-onevision", 32)
    sae = load_dictionary(exported)
    rows = table.filter(pc.not_equal(table.column("kind"), int(TokenKind.NEWLINE)))
    x = torch.from_numpy(store.decode_acts(rows.column("act"), "float32"))
    with torch.no_grad():
        explained = 1 - float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert explained > 0.5, explained

    row = evaluate_checkpoint(
        exported,
        EvalConfig(
            stores=str(tmp_path / "acts"), split="train", max_tokens=2048, splice_samples=8, splice_batch_size=4
        ),
    )
    assert row["token_kinds"] == "patch,text", "evaluated on the token kinds it was trained on"
    assert row["explained_variance"] > 0.5 and row["l0"] == pytest.approx(8)
    assert row["label_source"] == "next_token" and row["splice_samples"] == 8 and "gt_values" not in row
    assert row["kl_with_error"] < 1e-9 and row["loss_recovered_with_error"] == pytest.approx(1), "an exact splice"
    assert 0 < row["kl"] < 0.2 * row["kl_zero"], "the SAE moves the next-token predictions far less than zero ablation"


def explanation_table(request: dict) -> str:
    """The served explainer's fixed table: an answer per marked token of the request's best text context."""
    content = request["messages"][0]["content"]
    texts = [p["text"] for p in content if p["type"] == "text" and p["text"].startswith("Text contexts")]
    if not texts:
        return "no text contexts"
    best = texts[0].split("\n1. ", 1)[1].split("\n")[0]
    return TABLE.get(best.split("[[", 1)[1].split("]]", 1)[0], "another token")


TABLE = {c: f"prompt token number {ord(c)}" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:?!"}


def test_the_papers_loop_offline_interpret_explain_with_a_served_model_then_steer(campaign, chat_server):
    """extract (fixture) -> train (fixture) -> interpret on image and text tokens -> dashboard -> explain with the
    chat explainer against an OpenAI-compatible server on 127.0.0.1 answering from a fixed table -> steer the
    explained latent while the model answers about the images, and record the answers."""
    tmp_path, config, _, _, exported = campaign
    passed = run_interpret(
        InterpretConfig(
            checkpoint=exported,
            model=tiny_entry("llava-onevision"),
            pretrained=False,
            prompts=PROMPTS,
            dataset=config["dataset"],
            output=str(tmp_path / "interpret"),
            k=4,
            reservoir=8,
            shard_size=8,
            resources=dict(actors=1, torch_threads=1),
            progress=False,
        )
    )
    assert passed.samples == 24 and passed.alive > 0
    results = read_results(str(tmp_path / "interpret"))
    assert results.layout.grid == (2, 2) and results.summary["prompts"] == PROMPTS
    best = results.top_rows(int(results.latents.to_pandas()["max_activation"].idxmax()))[0]
    assert results.image(best["sample_id"]).shape == (28, 28, 3)
    texts = results.text.to_pandas()
    assert texts.latent.nunique() > 0 and (texts.score > 0).all() and (texts["rank"] < 4).all()
    top = texts[texts["rank"] == 0].iloc[0]
    assert f"[[{top.token}]]" in top.context and ("<image>" in top.context or "..." in top.context)
    assert results.image(top.sample_id).shape == (28, 28, 3), "the image the prompt asked about is kept"
    page = Path(write_dashboard(results, max_latents=4)).parent / "latents" / f"{int(texts.latent.min())}.html"
    assert "<h2>Top text tokens</h2>" in page.read_text() and "<mark>" in page.read_text()

    chat_server.reply = explanation_table
    latents = sorted(texts.latent.unique().tolist())[:3]
    summary = run_explain(
        ExplainConfig(
            evidence=str(tmp_path / "interpret"),
            explainer="chat",
            chat=dict(base_url=chat_server.url, model="llava-ov-served", backoff_s=0.01),
            judge="none",
            iou=False,
            similarity=False,
            latents=latents,
            images_per_latent=4,
            use_ray=False,
        )
    )
    assert summary.explained == len(latents) and len(chat_server.requests) == len(latents)
    explanations = read_explanations(str(tmp_path / "interpret"))
    for latent in latents:
        token = results.text_rows(latent)[0]["token"]
        assert explanations[latent].explanation == TABLE.get(token, "another token")
        assert explanations[latent].explainer == "chat:llava-ov-served"

    chosen = latents[0]  # steer the explained latent: clamp it high while the model answers about the images
    steered = run_steer(
        SteerConfig(
            checkpoint=exported,
            model=tiny_entry("llava-onevision"),
            pretrained=False,
            steer=[SteerSpec(latents=[chosen], value=50.0)],
            generation=GenerationSpec(prompts=[PROMPTS[0]], max_new_tokens=6),
            dataset=config["dataset"],
            samples=2,
            device="cpu",
            output=str(tmp_path / "steer"),
        )
    )
    answers = steered["answers"]
    assert len(answers) == 2 and all(a["prompt"] == PROMPTS[0] and len(a["steered"]) == 1 for a in answers)
    assert any(a["steered"][0]["text"] != a["clean"] for a in answers), "the clamp changes the answers"
    assert Path(steered["json"]).exists() and Path(steered["html"]).exists()
    print("steered latent", chosen, "explained as", repr(explanations[chosen].explanation), "answers:", answers)
