"""Steering a multimodal language model's answers: generate with a dictionary spliced in and latents clamped.

The dictionary is spliced in at its `lm.*` input hook point with `steer.steered` (the one splice: `x` becomes
`x + decode(z') - decode(z)`, the error term kept by default) on the chosen kinds of token: image tokens,
the prompt's text (the chat template included), generated tokens, or all. Generation is the model's own
(`transformers` `generate`, greedy unless `temperature > 0`) with its key/value cache, so the hook sees
only the new positions of each forward pass; it keeps count of the positions seen to know each one's kind.
Each (image, prompt) sample is answered once clean and once per intervention, the interventions in one
batch (sampled: one at a time, from the clean answer's seed). The log-probability change of each steered token is `log p_steered - log p_clean`, both conditioned
on the steered answer so far (the clean model teacher-forced on it). This is the steering step of
"Large Multi-modal Models Can Interpret Features in Large Multi-modal Models" (Zhang et al., 2024,
arXiv:2411.14982): a feature is clamped while the model answers about an image.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..models import HookedVisionModel
from ..models.hooked import per_token
from ..sae import Dictionary
from .dashboard import _page
from .heatmaps import png_bytes
from .steer import Intervention, SteerSpec, TokenKinds, steered, steered_hook, steering_inputs

if TYPE_CHECKING:
    from .steer import SteerConfig


class SteeredAnswer(BaseModel):
    """One intervention's answer: its tokens, their text, and each token's log-probability change."""

    intervention: Intervention
    tokens: list[int] = Field(description="the generated token ids (up to and with the first end-of-sequence token)")
    text: str = Field(description="the answer, special tokens left out")
    token_text: list[str] = Field(description="the text of each token")
    logprob_delta: list[float] = Field(
        description="per token: log p_steered - log p_clean (natural log), both given the steered answer before it"
    )


class SampleAnswers(BaseModel):
    """One (image, prompt) sample: the clean answer and one `SteeredAnswer` per intervention."""

    image: int = Field(description="index of the image in the images given")
    sample_id: str | None = Field(None, description="the image's sample id in the dataset (`prisma-ray steer`)")
    prompt: str
    clean_tokens: list[int]
    clean_text: str
    steered: list[SteeredAnswer]


class GenerationResults(BaseModel):
    """What `generate_steered` ran and every sample's answers (`model_dump()` is the JSON written)."""

    model: str
    hook: str
    token_kinds: TokenKinds
    keep_error: bool
    max_new_tokens: int
    temperature: float
    seed: int
    samples: list[SampleAnswers]


def check_lmm_steering(model: HookedVisionModel, d: Dictionary, interventions: Sequence[Intervention]) -> str:
    """The `lm.*` hook point where `d` steers `model`'s answers; `InvalidRequest` for a model that is not a
    multimodal language model, a dictionary not on its language model, a width mismatch or a missing latent."""
    if model.preprocess.modality != "multimodal":
        raise InvalidRequest(
            f"{model.name} is not a multimodal language model: generation with a steered dictionary needs an "
            "hf-lmm model (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL); steer vision models with "
            "prisma_ray.interpret.steer.steer"
        )
    if not interventions:
        raise InvalidRequest("give at least one intervention (latents and a value or scale)")
    hook = d.sites.inputs[0].name
    if not model.hook_point(hook).lm:
        raise InvalidRequest(
            f"the dictionary reads {hook}, in {model.name}'s vision tower; steering the answers needs a dictionary "
            "trained on the language model (an lm.* hook point, e.g. lm.blocks.N.hook_resid_post)"
        )
    for intervention in interventions:
        steered_hook(model, d, intervention.latents)
    return hook


def steered_positions(image: torch.Tensor, token_kinds: TokenKinds) -> tuple[torch.Tensor, bool]:
    """`(bool[B, T0], steer_generated)`: which prompt positions are steered (`image`: `bool[B, T0]`, the image
    tokens of the prompt) and whether generated tokens are."""
    if token_kinds == "all":
        return torch.ones_like(image), True
    if token_kinds == "image":
        return image.clone(), False
    if token_kinds == "prompt":
        return ~image, False
    return torch.zeros_like(image), True


class StepHook:
    """The forward hook that steers row `r` of the batch per `specs[r]` at the positions of the chosen kinds.

    It counts the positions it has seen: a forward with the key/value cache passes only the new positions, and
    every position from `len(prompt)` on is a generated token. `seen` lists the positions of each call.
    """

    def __init__(self, d: Dictionary, specs: Sequence[SteerSpec], prompt: torch.Tensor, generated: bool):
        self.d, self.specs, self.prompt, self.generated = d, list(specs), prompt, generated
        self.seen: list[int] = []

    def mask(self, start: int, n: int) -> torch.Tensor:
        """`bool[B, n]`: the steered positions among `start .. start + n - 1`."""
        rows, length = self.prompt.shape
        out = torch.full((rows, n), self.generated, dtype=torch.bool, device=self.prompt.device)
        stop = min(start + n, length)
        if start < stop:
            out[:, : stop - start] = self.prompt[:, start:stop]
        return out

    def __call__(self, cur: torch.Tensor, _hook) -> torch.Tensor | None:
        start = sum(self.seen)
        self.seen.append(cur.shape[1])
        mask = self.mask(start, cur.shape[1]).to(cur.device)
        if len(self.specs) != cur.shape[0]:
            raise InvalidRequest(f"{len(self.specs)} interventions for a batch of {cur.shape[0]} rows")
        if not mask.any():
            return None
        out = cur.clone(memory_format=torch.contiguous_format)
        view, source = per_token(out), per_token(cur)
        for row, spec in enumerate(self.specs):
            if mask[row].any():
                view[row, mask[row]] = steered(self.d, source[row, mask[row]], spec).to(cur.dtype)
        return out


def _device(model: HookedVisionModel) -> torch.device:
    return next(model.model.parameters()).device


def _generate(model: HookedVisionModel, inputs: dict, max_new_tokens: int, temperature: float, seed: int):
    """`(sequences [B, T0 + n], logits [B, n, vocab])` of the model's own generation (greedy at temperature 0)."""
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    if temperature > 0:
        torch.manual_seed(seed)
    out = model.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        use_cache=True,  # the steering hook counts positions: each must be seen once
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=model.tokenizer.pad_token_id,
        **sampling,
    )
    return out.sequences, torch.stack(out.logits, dim=1).float()


def _eos_ids(model: HookedVisionModel) -> set[int]:
    eos = model.model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _answer_length(tokens: list[int], eos: set[int]) -> int:
    """Tokens up to and with the first end-of-sequence token."""
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


def _teacher_forced(inputs: dict, sequences: torch.Tensor) -> dict:
    """`inputs` (one prompt repeated) with the generated tokens appended: `input_ids` takes them, the attention mask
    ones, other per-token inputs (Qwen's `mm_token_type_ids`) zeros (text)."""
    ids = inputs["input_ids"]
    extra = sequences.shape[1] - ids.shape[1]
    out = dict(inputs, input_ids=sequences)
    for key, value in inputs.items():
        if key != "input_ids" and torch.is_tensor(value) and value.shape == ids.shape:
            fill = torch.ones if key == "attention_mask" else torch.zeros
            out[key] = torch.cat([value, fill(len(value), extra, dtype=value.dtype, device=value.device)], dim=1)
    return out


class Decoding(NamedTuple):
    """How the answers are generated and which positions are steered (see `generate_steered`)."""

    token_kinds: TokenKinds
    max_new_tokens: int
    temperature: float
    seed: int


@torch.inference_mode()
def _steered_batch(
    model: HookedVisionModel,
    d: Dictionary,
    image: np.ndarray,
    prompt: str,
    specs: Sequence[SteerSpec],
    how: Decoding,
) -> list[SteeredAnswer]:
    """One generation of a batch of rows, row `r` steered per `specs[r]`, and each row's answer."""
    device, eos, tokenizer = _device(model), _eos_ids(model), model.tokenizer
    rows = {k: v.to(device) for k, v in model.encode([image] * len(specs), [prompt] * len(specs)).items()}
    length = rows["input_ids"].shape[1]
    image_mask = torch.from_numpy(model.multimodal_layout(rows).image_mask())
    hook = StepHook(d, specs, *steered_positions(image_mask, how.token_kinds))
    with model.hooks([(d.sites.inputs[0].name, hook)]):
        sequences, logits = _generate(model, rows, how.max_new_tokens, how.temperature, how.seed)
    n = logits.shape[1]
    new = sequences[:, length : length + n]
    forced = _teacher_forced(rows, sequences[:, : length + n])
    clean_logits = model({**forced, "logits_to_keep": n + 1})[:, :n].float()  # the last n + 1 positions only
    picked = new[..., None]
    delta = (logits.log_softmax(-1).gather(-1, picked) - clean_logits.log_softmax(-1).gather(-1, picked))[..., 0]
    answers = []
    for row, spec in enumerate(specs):
        tokens = new[row].tolist()
        keep = _answer_length(tokens, eos)
        answers.append(
            SteeredAnswer(
                intervention=Intervention(latents=spec.latents, value=spec.value, scale=spec.scale),
                tokens=tokens[:keep],
                text=tokenizer.decode(tokens[:keep], skip_special_tokens=True),
                token_text=[tokenizer.decode([t]) for t in tokens[:keep]],
                logprob_delta=delta[row, :keep].tolist(),
            )
        )
    return answers


@torch.inference_mode()
def _clean_answer(model: HookedVisionModel, image: np.ndarray, prompt: str, how: Decoding) -> list[int]:
    """The plain model's answer to `prompt` about `image` (up to and with its first end-of-sequence token)."""
    one = {k: v.to(_device(model)) for k, v in model.encode([image], [prompt]).items()}
    clean, _ = _generate(model, one, how.max_new_tokens, how.temperature, how.seed)
    tokens = clean[0, one["input_ids"].shape[1] :].tolist()
    return tokens[: _answer_length(tokens, _eos_ids(model))]


def generate_steered(
    model: HookedVisionModel,
    dictionary: Dictionary,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    interventions: Sequence[Intervention],
    *,
    token_kinds: TokenKinds = "all",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    keep_error: bool = True,
) -> GenerationResults:
    """Answer each image's prompt clean and with `dictionary` spliced in and steered per each intervention.

    `images`: `uint8[H, W, 3]` (or Qwen's `[T, H, W, 3]` videos), with one prompt each (or one prompt for all).
    `interventions`: latents clamped to a value or scaled, each answered on its own (one batch per sample), on
    the positions of `token_kinds`: `image` (the prompt's image tokens, newlines included), `prompt` (its text:
    the chat template and the question), `generated`, or `all`. `keep_error` adds the dictionary's error term
    back, so that an intervention that changes nothing generates exactly what the plain model does.
    `temperature > 0` samples (the model's generation config's top-k / top-p), each intervention generated on its
    own with torch's global generator seeded with `seed`, as the clean answer: they draw the same numbers, so an
    intervention that changes nothing gives the clean answer (at the cost of one generation per intervention).
    The dictionary and the model must be on one device. Raises `InvalidRequest` (see `check_lmm_steering`; and
    for prompts that do not pair with the images).
    """
    hook = check_lmm_steering(model, dictionary, interventions)
    prompts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
    if len(prompts) != len(images):
        raise InvalidRequest(f"got {len(images)} images but {len(prompts)} prompts; give one prompt each, or one")
    if empty := [i for i, p in enumerate(prompts) if not p.strip()]:
        raise InvalidRequest(f"prompts {empty} are empty: ask each image a question (e.g. 'Describe the image.')")
    if temperature < 0:
        raise InvalidRequest(f"temperature must be 0 (greedy) or above (sampled); got {temperature}")
    if max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    specs = [
        SteerSpec(**i.model_dump(include={"latents", "value", "scale"}), keep_error=keep_error) for i in interventions
    ]
    how = Decoding(token_kinds, max_new_tokens, temperature, seed)
    # greedy: the interventions in one batch; sampled: each on its own from the clean answer's seed, so that it draws
    # what the clean run draws (an intervention that changes nothing gives the clean answer)
    batches = [specs] if temperature == 0 else [[spec] for spec in specs]
    samples = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        clean = _clean_answer(model, image, prompt, how)
        answers = [a for batch in batches for a in _steered_batch(model, dictionary, image, prompt, batch, how)]
        text = model.tokenizer.decode(clean, skip_special_tokens=True)
        samples.append(SampleAnswers(image=index, prompt=prompt, clean_tokens=clean, clean_text=text, steered=answers))
    return GenerationResults(
        model=model.name,
        hook=hook,
        token_kinds=token_kinds,
        keep_error=keep_error,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        samples=samples,
    )


def _token_spans(answer: SteeredAnswer) -> str:
    """The answer's tokens, each shaded by its log-probability change (red: likelier steered, blue: less likely)."""
    spans = []
    for text, delta in zip(answer.token_text, answer.logprob_delta):
        colour = "192,57,43" if delta > 0 else "41,128,185"
        alpha = min(abs(delta) / 2.0, 1.0)
        spans.append(
            f"<span style='background:rgba({colour},{alpha:.2f})' title='{delta:+.3f} nats'>{html.escape(text)}</span>"
        )
    return "".join(spans)


def _rule(intervention: Intervention) -> str:
    rule = f"= {intervention.value:g}" if intervention.value is not None else f"x {intervention.scale:g}"
    return f"{', '.join(map(str, intervention.latents))} {rule}"


def steer_page(results: GenerationResults, images: Sequence[np.ndarray]) -> str:
    """A self-contained HTML page: per sample, its image, prompt and clean answer, then a row per intervention
    with the steered answer (tokens shaded by their log-probability change) and the mean change."""
    head = (
        f"<h1>Steering {html.escape(results.model)}</h1><p class='muted'>{html.escape(results.hook)}, "
        f"{results.token_kinds} tokens, error term {'kept' if results.keep_error else 'dropped'}, "
        f"{results.max_new_tokens} new tokens, temperature {results.temperature:g}, seed {results.seed}; tokens "
        "shaded by log p(steered) - log p(clean): red likelier steered, blue less likely</p>"
    )
    parts = [head]
    for sample in results.samples:
        image = np.asarray(images[sample.image])
        frame = image[0] if image.ndim == 4 else image
        data = base64.b64encode(png_bytes(frame, max(1, 128 // max(frame.shape[:2])))).decode()
        rows = "".join(
            f"<tr><td>{html.escape(_rule(a.intervention))}</td><td>{_token_spans(a)}</td>"
            f"<td data-v='{np.mean(a.logprob_delta):.4f}'>{np.mean(a.logprob_delta):+.3f}</td></tr>"
            for a in sample.steered
        )
        parts.append(
            f"<h2>image {html.escape(sample.sample_id or str(sample.image))}: {html.escape(sample.prompt)}</h2><div class='row'>"
            f"<img src='data:image/png;base64,{data}' alt='image {sample.image}'>"
            f"<p>clean: <b>{html.escape(sample.clean_text)}</b></p></div>"
            "<table><thead><tr><th>latents</th><th>steered answer</th><th>mean change (nats)</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    return _page(f"steering {results.model}", "".join(parts))


def write_steering(
    results: GenerationResults,
    images: Sequence[np.ndarray],
    output: str,
    options: storage.StorageOptions | None = None,
) -> tuple[str, str]:
    """Write `<output>/steer.json` (`results`) and `<output>/steer.html` (`steer_page`); return their URIs."""
    json_uri, html_uri = storage.join(output, "steer.json"), storage.join(output, "steer.html")
    storage.write_bytes(json_uri, json.dumps(results.model_dump(), indent=1).encode(), options)
    storage.write_bytes(html_uri, steer_page(results, images).encode(), options)
    return json_uri, html_uri


def run_generation(cfg: SteerConfig, d: Dictionary, model: HookedVisionModel) -> dict:
    """`prisma-ray steer` for a multimodal language model: every one of the dataset's first `cfg.samples` images
    asked every prompt, clean and per intervention; writes `steer.json` and `steer.html` under `cfg.output` and
    returns their URIs with each answer's text and mean log-probability change."""
    specs = cfg.steer if isinstance(cfg.steer, list) else [cfg.steer]
    if len({s.keep_error for s in specs}) > 1:
        raise InvalidRequest("steer: keep_error differs between the interventions; generation keeps one for all")
    if any(s.tokens != "all" for s in specs):
        raise InvalidRequest(
            "steer.tokens is for vision models; choose a multimodal model's with generation.token_kinds"
        )
    if cfg.text_embeddings or cfg.labels:
        raise InvalidRequest("text_embeddings and labels are for vision models; a multimodal model answers in text")
    options = cfg.storage.resolved()
    data = steering_inputs(cfg, model)
    images = list(data.pixels)
    prompts = cfg.generation.prompts
    pairs = [(image, prompt) for image in images for prompt in prompts]
    gen = cfg.generation
    results = generate_steered(
        model,
        d,
        [image for image, _ in pairs],
        [prompt for _, prompt in pairs],
        specs,
        token_kinds=gen.token_kinds,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        seed=gen.seed,
        keep_error=specs[0].keep_error,
    )
    for sample in results.samples:  # the index of the dataset's image, asked each prompt in turn
        sample.image //= len(prompts)
        sample.sample_id = str(data.sample_ids[sample.image])
    json_uri, html_uri = write_steering(results, images, cfg.output, options)
    return {
        "checkpoint": cfg.checkpoint,
        "model": model.name,
        "hook": results.hook,
        "json": json_uri,
        "html": html_uri,
        "answers": [
            {
                "image": s.image,
                "sample_id": s.sample_id,
                "prompt": s.prompt,
                "clean": s.clean_text,
                "steered": [
                    {
                        **a.intervention.model_dump(exclude_none=True),
                        "text": a.text,
                        "mean_logprob_delta": float(np.mean(a.logprob_delta)),
                    }
                    for a in s.steered
                ],
            }
            for s in results.samples
        ],
    }
