"""Generation with a dictionary spliced into a tiny random multimodal LM's language model, latents clamped."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prisma_ray.cli import main
from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.steer import Intervention, SteerSpec, steered
from prisma_ray.interpret.steer_generate import generate_steered
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from tests.lmm_tiny import IMAGE_ID, tiny, tiny_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOOK = "lm.blocks.0.hook_resid_post"
NO_CHANGE = Intervention(latents=[0, 5], scale=1.0)
CLAMP = Intervention(latents=list(range(8)), value=200.0)


def lm_dictionary(width: int = 32, hook: str = HOOK, seed: int = 3) -> Dictionary:
    d = Dictionary(
        DictionaryConfig(architecture="relu", d_sae=64, seed=seed), Sites(inputs=(Site(name=hook, width=width),))
    )
    with torch.no_grad():
        d.b_dec.normal_()
    return d.eval()


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl"])
def case(request):
    """`(model, dictionary, image)`: LLaVA-NeXT (base view, crops and newline tokens) and Qwen2-VL (M-RoPE)."""
    size = 56 if request.param.startswith("qwen") else 28
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tiny(request.param), lm_dictionary(), image


def plain_answer(model, image, prompt: str, n: int) -> list[int]:
    batch = model.encode([image], [prompt])
    with torch.inference_mode():
        out = model.model.generate(
            **batch, max_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
        )
    return out[0, batch["input_ids"].shape[1] :].tolist()


def test_no_change_with_the_error_term_generates_what_the_plain_model_does(case):
    model, d, image = case
    result = generate_steered(model, d, [image], ["What is it?"], [NO_CHANGE, NO_CHANGE], max_new_tokens=6)
    sample = result.samples[0]
    plain = plain_answer(model, image, "What is it?", 6)
    assert sample.clean_tokens == plain[: len(sample.clean_tokens)] and len(sample.clean_tokens) >= 1
    for answer in sample.steered:
        assert answer.tokens == sample.clean_tokens
        assert answer.text == sample.clean_text
        assert np.allclose(answer.logprob_delta, 0.0, atol=1e-4), answer.logprob_delta


def test_sampled_no_change_draws_the_clean_answer_and_the_seed_repeats_it(case):
    """At temperature > 0 each intervention draws from the clean answer's seed: no change, no different draw."""
    model, d, image = case
    ask = dict(temperature=1.0, max_new_tokens=5)
    result = generate_steered(model, d, [image], ["What is it?"], [NO_CHANGE, CLAMP, NO_CHANGE], seed=1, **ask)
    sample = result.samples[0]
    assert len(sample.clean_tokens) >= 2
    assert [a.tokens for a in sample.steered] == [sample.clean_tokens, sample.steered[1].tokens, sample.clean_tokens]
    assert sample.steered[1].tokens != sample.clean_tokens
    again = generate_steered(model, d, [image], ["What is it?"], [NO_CHANGE], seed=1, **ask).samples[0]
    assert again.clean_tokens == sample.clean_tokens
    other = generate_steered(model, d, [image], ["What is it?"], [NO_CHANGE], seed=2, **ask).samples[0]
    assert other.clean_tokens != sample.clean_tokens and other.steered[0].tokens == other.clean_tokens


def test_no_change_keeps_the_activations_bit_for_bit():
    """`x + (decode(z') - decode(z))`: `(x + decode(z)) - decode(z)` would round."""
    acts = 10 * torch.randn(3, 40, 32)
    assert torch.equal(steered(lm_dictionary(), acts, SteerSpec(**NO_CHANGE.model_dump())), acts)


def test_a_large_clamp_changes_the_answer(case):
    model, d, image = case
    result = generate_steered(model, d, [image], ["What is it?"], [CLAMP], max_new_tokens=6)
    sample = result.samples[0]
    (answer,) = sample.steered
    assert answer.tokens != sample.clean_tokens
    assert len(answer.logprob_delta) == len(answer.tokens) == len(answer.token_text)
    # a random model's next-token distribution is nearly flat: measured +0.05 to +0.4 nats per token
    assert min(answer.logprob_delta) > 0.01, "each steered token is likelier steered than clean"


def test_with_the_cache_the_hook_sees_each_position_once(case):
    """Every forward after the prompt's passes only the new token: a hook at the dictionary's point (an outer
    block, so it sees the clean, steered and teacher-forced passes) counts the positions of each call."""
    model, d, image = case
    calls = []
    with model.hooks([(HOOK, lambda t, _h: calls.append(tuple(t.shape[:2])))]):
        result = generate_steered(model, d, [image], ["What is it?"], [CLAMP, NO_CHANGE], max_new_tokens=5)
    prompt = model.encode([image], ["What is it?"])["input_ids"].shape[1]
    steered_n = max(len(a.tokens) for a in result.samples[0].steered)
    clean = [(1, prompt)] + [(1, 1)] * (len(calls) - 1 - steered_n - 1)
    assert calls[: len(clean)] == clean, calls
    assert calls[len(clean) :] == [(2, prompt)] + [(2, 1)] * (steered_n - 1) + [(2, prompt + steered_n)], calls


@torch.no_grad()
def test_clamping_image_tokens_leaves_the_prompt_before_the_image_unchanged(case):
    model, d, image = case
    later = "lm.blocks.1.hook_resid_post"
    first = {}

    def record(t, _h):
        first.setdefault(len(first), t.clone())  # the first call of each generation: the whole prompt

    batch = model.encode([image], ["What is it?"])
    with model.hooks([(later, record)]):
        generate_steered(model, d, [image], ["What is it?"], [CLAMP], token_kinds="image", max_new_tokens=1)
    clean, steered = first[0][0], first[1][0]
    is_image = batch["input_ids"][0] == IMAGE_ID
    start = int(is_image.int().argmax())
    assert start > 0
    torch.testing.assert_close(steered[:start], clean[:start], rtol=0, atol=0)
    assert not torch.allclose(steered[is_image], clean[is_image], atol=1e-3)
    assert not torch.allclose(steered[-1], clean[-1], atol=1e-3), "the text after the image reads the steered image"


def test_bad_requests_are_clear_errors(case, toy_vit):
    model, d, image = case
    ask = dict(images=[image], prompts=["What is it?"], max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="not a multimodal language model"):
        generate_steered(toy_vit, lm_dictionary(64, "blocks.0.hook_resid_post"), interventions=[CLAMP], **ask)
    with pytest.raises(InvalidRequest, match=r"vision tower.*an lm\.\* hook point"):
        generate_steered(model, lm_dictionary(16, "blocks.0.hook_resid_post"), interventions=[CLAMP], **ask)
    with pytest.raises(InvalidRequest, match=r"latents \[64\] do not exist: the dictionary has 64"):
        generate_steered(model, d, interventions=[Intervention(latents=[64], value=1.0)], **ask)
    with pytest.raises(InvalidRequest, match="reads 16-wide activations but .* is 32 wide at lm.blocks.0"):
        generate_steered(model, lm_dictionary(16), interventions=[CLAMP], **ask)
    with pytest.raises(InvalidRequest, match=r"prompts \[1\] are empty"):
        generate_steered(model, d, [image, image], ["What?", " "], [CLAMP])
    with pytest.raises(InvalidRequest, match="temperature must be 0 .* got -0.5"):
        generate_steered(model, d, [image], ["What?"], [CLAMP], temperature=-0.5)
    with pytest.raises(InvalidRequest, match=r"images or videos \[0\] are empty"):
        generate_steered(model, d, [np.zeros((0, 28, 3), np.uint8)], ["What?"], [CLAMP])
    pattern = lm_dictionary(32, "lm.blocks.0.attn.hook_pattern")
    with pytest.raises(InvalidRequest, match=r"lm.blocks.0.attn.hook_pattern, an attention pattern"):
        generate_steered(model, pattern, interventions=[CLAMP], **ask)
    with pytest.raises(InvalidRequest, match="1 images but 2 prompts"):
        generate_steered(model, d, [image], ["a", "b"], [CLAMP])


def test_steer_command_writes_the_answers_as_json_and_html(tmp_path, capsys):
    """`prisma-ray steer` on an hf-lmm dictionary: 2 images x 2 prompts, 2 latents each alone x 2 values."""
    d = lm_dictionary()
    d.sites = Sites(inputs=(Site(name=HOOK, width=32, model="tiny-llava-next"),))
    write_files(export_files(d), str(tmp_path / "sae"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    config = tmp_path / "steer.yaml"
    config.write_text(yaml.safe_dump(dict(model=tiny_entry("llava-next").model_dump(), pretrained=False)))
    args = [
        "steer",
        str(tmp_path / "sae"),
        str(config),
        "--latent",
        "3",
        "--latent",
        "7",
        "--separately",
        "--value",
        "200",
    ]
    args += [
        "--value",
        "0",
        "--data",
        str(images),
        "--prompt",
        "What is <it>?",
        "--prompt",
        "Why?",
        "--max-new-tokens",
        "3",
    ]
    assert main([*args, "--token-kinds", "generated", "--output", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    answers = [(a["image"], a["sample_id"], len(a["steered"])) for a in printed["answers"]]
    assert answers == [(0, "0.png", 4), (0, "0.png", 4), (1, "1.png", 4), (1, "1.png", 4)], "which file each is"
    assert [s["latents"] for s in printed["answers"][0]["steered"]] == [[3], [3], [7], [7]]
    assert [s["value"] for s in printed["answers"][0]["steered"]] == [200.0, 0.0, 200.0, 0.0]
    written = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert written["token_kinds"] == "generated" and written["hook"] == HOOK and len(written["samples"]) == 4
    steered = written["samples"][0]["steered"][0]
    assert steered["tokens"] != written["samples"][0]["clean_tokens"]
    assert len(steered["logprob_delta"]) == len(steered["tokens"]) == len(steered["token_text"])
    page = (tmp_path / "out" / "steer.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 4 and "<h2>image 1.png: What is &lt;it&gt;?" in page
    assert page.count("nats'>") == sum(len(a["tokens"]) for s in written["samples"] for a in s["steered"])
    assert main([*args, "--text-embeddings", "t.npy"]) == 2
    assert "text_embeddings and labels are for vision models" in capsys.readouterr().err
