"""Spliced-in evaluation: run the model with a dictionary's output in place of the activations it models.

Three runs per batch besides the clean one, all at the dictionary's output hook points and token
positions (the same positions in every sample, `int64[K]`, or per sample, a `bool[B, T]` mask for
multimodal sequences): `sae` (the reconstruction, or for a transcoder the MLP replacement's prediction),
`error` (the same plus the clean run's error term `x − x̂`, which for a single site reproduces the
clean run: `kl_with_error ≈ 0` checks the splice itself) and `zero` (zero ablation). From their
task losses: `loss_recovered = (L_zero − L_sae) / (L_zero − L_clean)`, the KL divergence from the
clean predictions and the top-1 accuracy delta. Heads turn the model's output into class logits:
the model's own classifier, or a CLIP-style zero-shot head over text embeddings of class names. A
multimodal language model's task is next-token prediction: a batch's `readout` mask picks the
output positions scored (those followed by a text token) and its labels are those next tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from prisma_ray.errors import InvalidRequest

from ..models import HookedVisionModel
from ..models.hooked import per_token
from ..sae import Dictionary
from ..sae.dictionary import Site

Mode = Literal["sae", "error", "zero"]
Head = Callable[[torch.Tensor], torch.Tensor]
HookList = list[tuple[str, Callable]]
Where = Callable[["SpliceBatch"], torch.Tensor]
Heads = Mapping[str, int | None]  # per-head hook points stored as one head: that head's index (absent: flattened)


def classifier_head(output: torch.Tensor) -> torch.Tensor:
    """The model's own classifier: its output already holds the class logits."""
    return output


@dataclass(frozen=True)
class ZeroShotHead:
    """CLIP-style zero-shot classification: `logit_scale · cos(image embedding, text embedding of each class)`."""

    text_embeddings: torch.Tensor
    logit_scale: float = 100.0

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2 or output.shape[1] != self.text_embeddings.shape[1]:
            raise InvalidRequest(
                f"zero-shot head: the model outputs {list(output.shape)} but the text embeddings are "
                f"{list(self.text_embeddings.shape)}; they must share the embedding width"
            )
        text = F.normalize(self.text_embeddings.to(output), dim=1)
        return self.logit_scale * F.normalize(output, dim=1) @ text.t()


def outputs_logits(model: HookedVisionModel) -> bool:
    """Whether the model's output is a classifier's logits (timm heads, `...Classification` classes)."""
    net = model.model
    classes = getattr(net, "num_classes", None)
    if isinstance(classes, int):
        return classes > 0
    return type(net).__name__.endswith("Classification")


def splice_hooks(
    d: Dictionary, positions: torch.Tensor, mode: Mode, clean: dict[str, torch.Tensor], heads: Heads | None = None
) -> HookList:
    """Forward hooks that put `d`'s output (per `mode`) at the token `positions` of its output hook points.

    `clean` holds the clean run's activations at `d`'s input and output hook points for this batch.
    Autoencoders (SAEs, crosscoders over layers) reconstruct every site; a crosscoder encodes all its
    input sites from the clean run (acausally). Transcoders read their input hook during the spliced
    run and replace their output hook with the prediction (the MLP replacement).

    Per-head hook points (`attn.hook_q/k/v/z/result`, `[B, T, heads, d_head]`) are seen as their store holds
    them (`models.hooked.per_token`): every head flattened into the width (head-major), or only head
    `heads[name]`, whose slice alone is then replaced (the other heads keep their clean values). A site whose
    width is not the dictionary's raises `InvalidRequest`.
    """
    heads = heads or {}
    sites = d.sites

    def rows(acts: torch.Tensor, s: Site) -> torch.Tensor:
        return take(acts, positions, heads.get(s.name), s)

    def put(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        return put_at_positions(positions, value, heads.get(name))

    if mode == "zero":
        return [(s.name, put(s.name, lambda cur, s=s: torch.zeros_like(rows(cur, s)))) for s in sites.targets]
    bounds = dict(zip((s.name for s in sites.targets), sites.out_bounds()))
    clean_in = torch.cat([rows(clean[s.name], s) for s in sites.inputs], dim=-1)
    clean_out = torch.cat([rows(clean[s.name], s) for s in sites.targets], dim=-1)
    error = clean_out - _apply(d, clean_in) if mode == "error" else torch.zeros_like(clean_out)
    if sites.autoencoder:
        single = len(sites.inputs) == 1
        recon = None if single else _apply(d, clean_in)

        def autoencoder(cur: torch.Tensor, a: int, b: int) -> torch.Tensor:
            hat = _apply(d, rows(cur, sites.inputs[0])) if single else recon
            return hat[..., a:b] + error[..., a:b]

        return [(name, put(name, lambda cur, a=a, b=b: autoencoder(cur, a, b))) for name, (a, b) in bounds.items()]
    if len(sites.inputs) != 1 or len(sites.targets) != 1:
        raise InvalidRequest("spliced-in evaluation of a transcoder needs exactly one input and one output hook point")
    (source,), (target,) = sites.inputs, sites.targets
    stash: dict[str, torch.Tensor] = {}

    def read(cur: torch.Tensor, _hook) -> None:
        stash["x"] = rows(cur, source)

    def predict(cur: torch.Tensor) -> torch.Tensor:
        if "x" not in stash:
            raise InvalidRequest(
                f"transcoder input {source.name} runs after its output {target.name}: cannot splice it"
            )
        return _apply(d, stash["x"]) + error

    return [(source.name, read), (target.name, put(target.name, predict))]


def _apply(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """`d` on `[B, K, d_in]` rows -> `[B, K, d_out]`, in the dtype of `x`."""
    return d(x.to(d.W_dec.dtype)).to(x.dtype)


def take(
    acts: torch.Tensor, positions: torch.Tensor, head: int | None = None, site: Site | None = None
) -> torch.Tensor:
    """The `[B, K, d]` rows of activations at `positions` (`[1, N, d]` for a `bool[B, T]` mask): `[B, T, d]`
    activations, or per-head ones `[B, T, heads, d_head]` seen through `per_token(acts, head)`. With `site`, a
    width other than `site.width` raises `InvalidRequest`."""
    acts = per_token(acts, head)
    if site is not None and acts.shape[-1] != site.width:
        held = "every head flattened" if head is None else f"head {head}"
        raise InvalidRequest(
            f"{site.name}: the model gives {acts.shape[-1]} values per token ({held}) but the dictionary reads "
            f"{site.width}; evaluate it against a store extracted as it was trained (extract's `head`)"
        )
    return acts[positions][None] if positions.dtype == torch.bool else acts[:, positions]


def put_at_positions(
    positions: torch.Tensor, value: Callable[[torch.Tensor], torch.Tensor], head: int | None = None
) -> Callable:
    """A hook that writes `value(cur)` (shaped as `take(cur, positions, head)` gives) at `positions` of a copy of
    its activations: for per-head activations into the flattened heads, or into head `head` only."""

    def hook(cur: torch.Tensor, _hook) -> torch.Tensor:
        out = cur.clone(memory_format=torch.contiguous_format)
        view = per_token(out, head)  # a view of `out` (contiguous), so writing it writes `out`
        if positions.dtype == torch.bool:
            view[positions] = value(cur)[0].to(cur.dtype)
        else:
            view[:, positions] = value(cur).to(cur.dtype)
        return out

    return hook


@dataclass
class TaskTotals:
    """Running sums of the task loss, the KL divergence from the clean run and top-1 hits."""

    n: int = 0
    loss: float = 0.0
    kl: float = 0.0
    correct: int = 0

    def update(self, logits: torch.Tensor, clean_logits: torch.Tensor, labels: torch.Tensor) -> None:
        logp, clean_logp = logits.double().log_softmax(-1), clean_logits.double().log_softmax(-1)
        self.n += len(labels)
        self.loss += float(F.nll_loss(logp, labels, reduction="sum"))
        self.kl += float((clean_logp.exp() * (clean_logp - logp)).sum())
        self.correct += int((logits.argmax(-1) == labels).sum())

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.n, 1)

    @property
    def top1(self) -> float:
        return self.correct / max(self.n, 1)


def loss_recovered(clean: float, spliced: float, zero: float) -> float:
    """`(L_zero − L_spliced) / (L_zero − L_clean)`: 1 when splicing costs nothing, 0 when it is as bad as
    zero ablation; NaN when zero ablation does not change the loss."""
    gap = zero - clean
    return (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan")


@dataclass
class SpliceBatch:
    """One batch of inputs with its clean run: labels, clean logits and clean activations by hook point.

    Multimodal sequences add `kinds` (`int8[B, T]`: the kind of each token the store holds, -1 for
    padding and tokens it does not hold), `readout` (`bool[B, T]`: the output positions scored; only their
    logits are computed) and `lm_x` (`x` with its images already through the vision tower,
    `HookedVisionModel.lm_input`: runs hooked on the language model only start there, the tower run once). Such
    a run also skips the language model's layers before the first one it hooks where `clean` holds that layer's
    `hook_resid_pre` (`resume_point`, `HookedVisionModel.resume`).
    """

    x: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    clean_logits: torch.Tensor | None  # None until the clean run fills it in
    clean: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: torch.Tensor | None = None
    readout: torch.Tensor | None = None
    lm_x: dict | None = None

    def input(self, model: HookedVisionModel, hooks: Iterable[str]) -> torch.Tensor | dict:
        """The model input for a run with hooks at `hooks`: `lm_x` where there is one and every hook is on the
        language model, else `x`."""
        if self.lm_x is not None and all(model.hook_point(name).lm for name in hooks):
            return self.lm_x
        return self.x

    def run(self, model: HookedVisionModel, head: Head, hooks: HookList) -> torch.Tensor:
        """The scored logits of the model on this batch with `hooks` attached: `head` on its output, or the
        next-token logits at the `readout` positions (`[N, vocab]`)."""
        names = [name for name, _ in hooks]
        resume = resume_point(model, names)
        with model.hooks(hooks):
            if self.readout is None:
                return head(model(self.x))
            x = self.input(model, names)
            if x is not self.lm_x or resume not in self.clean:
                return model(x, logits_at=self.readout)
            with model.resume(model.hook_point(resume).layer, self.clean[resume]):
                return model(x, logits_at=self.readout)


def next_token_readout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(readout, labels)` of a multimodal batch's next-token task: `readout` (`bool[B, T]`) marks the positions
    followed by a text token (`text`: `bool[B, T]`, padding excluded by `attention_mask`), `labels` (`int64[N]`)
    are those next tokens, in the order `output[readout]` gives the positions."""
    next_text = attention_mask[:, 1:].bool() & text[:, 1:]
    return F.pad(next_text, (0, 1), value=False), input_ids[:, 1:][next_text]


def resume_point(model: HookedVisionModel, hooks: Iterable[str]) -> str | None:
    """`lm.blocks.{k}.hook_resid_pre` for the first language-model layer k > 0 that `hooks` touch, where each of
    them is at a layer of the language model: what a run hooked there can resume from
    (`HookedVisionModel.resume`, with its clean value); None otherwise."""
    points = [model.hook_point(name) for name in hooks]
    if not points or any(not p.lm or p.layer is None for p in points):
        return None
    layer = min(p.layer for p in points)
    return f"lm.blocks.{layer}.hook_resid_pre" if layer > 0 else None


@torch.inference_mode()
def run_mode(
    model: HookedVisionModel,
    head: Head,
    d: Dictionary,
    where: Where,
    mode: Mode,
    batches: list[SpliceBatch],
    heads: Heads | None = None,
) -> TaskTotals:
    """Task totals of the model with `d` spliced in per `mode` over `batches`, at the positions `where(batch)`
    (`heads`: as `splice_hooks`)."""
    totals = TaskTotals()
    for batch in batches:
        logits = batch.run(model, head, splice_hooks(d, where(batch), mode, batch.clean, heads))
        totals.update(logits, batch.clean_logits, batch.labels)
    return totals


def clean_totals(batches: list[SpliceBatch]) -> TaskTotals:
    totals = TaskTotals()
    for batch in batches:
        totals.update(batch.clean_logits, batch.clean_logits, batch.labels)
    return totals


def summarize(clean: TaskTotals, sae: TaskTotals, error: TaskTotals, zero: TaskTotals) -> dict[str, float]:
    """The spliced-in metrics of one dictionary from the totals of its runs."""
    return {
        "loss_clean": clean.mean_loss,
        "loss_spliced": sae.mean_loss,
        "loss_zero": zero.mean_loss,
        "loss_recovered": loss_recovered(clean.mean_loss, sae.mean_loss, zero.mean_loss),
        "kl": sae.mean_kl,
        "kl_zero": zero.mean_kl,
        "top1_clean": clean.top1,
        "top1_spliced": sae.top1,
        "top1_delta": sae.top1 - clean.top1,
        "loss_recovered_with_error": loss_recovered(clean.mean_loss, error.mean_loss, zero.mean_loss),
        "kl_with_error": error.mean_kl,
        "top1_delta_with_error": error.top1 - clean.top1,
    }
