"""The per-step training loop of several dictionaries on the same batches (plain PyTorch, no Ray).

`Trainer.train_step(x, y)` runs one optimisation step of every dictionary: normalise the batch
once, one forward and one backward through all dictionaries (one DDP all-reduce when wrapped),
then per dictionary: decoder gradient projection, clipping, its own Adam and schedule, decoder
renormalisation, and dead-latent bookkeeping in tokens. Distributed runs inject `wrap` (DDP) and
`all_reduce` (sum over workers); everything else is identical in one process.

Device and precision: the trainer's state (dictionaries, normalisation buffers, Adam moments, firing
counters) lives on its `device`; batches come from the host (pinned by the caller) and are copied
with `non_blocking=True`. A step reads nothing back to the host until latents can be dead (AuxK),
and `metrics()` is where the window's sums are read. With `autocast=True` the dictionaries' forward
runs under `torch.autocast(<device type>, bfloat16)` as SAELens does: the encoder and decoder products
in bfloat16, the parameters and Adam state float32 (master weights), the loss, its backward into the
parameters' gradients and the metrics float32.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from .config import DictionaryConfig
from .dictionary import Dictionary, Sites, rows
from .init import init_pre_bias
from .objectives import Outcome, objective
from .schedule import lr_factor, warmup_factor

AllReduce = Callable[[torch.Tensor], None]
NormalizeMode = Literal["center_scale", "scale", "none"]


@dataclass(frozen=True)
class SiteStats:
    """Statistics of one activation site: per-dimension mean and variance, mean L2 norm."""

    mean: torch.Tensor
    var: torch.Tensor
    mean_norm: float

    @classmethod
    def of(cls, x: torch.Tensor) -> SiteStats:
        """The statistics of the rows of `x [..., d]` (leading dimensions pooled)."""
        x = x.reshape(-1, x.shape[-1]).double()
        return cls(x.mean(0), x.var(0), float(x.norm(dim=1).mean()))

    def normalization(self, mode: NormalizeMode) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, scale)` vectors: `center_scale` subtracts the mean and scales to E‖x - mean‖² = d;
        `scale` only scales to E‖x‖ = √d (Anthropic); `none` is the identity."""
        d, on = self.mean.numel(), {"device": self.mean.device}
        if mode == "center_scale":
            return self.mean.float(), torch.full((d,), (d / float(self.var.sum().clamp_min(1e-12))) ** 0.5, **on)
        if mode == "scale":
            return torch.zeros(d, **on), torch.full((d,), d**0.5 / max(self.mean_norm, 1e-12), **on)
        return torch.zeros(d, **on), torch.ones(d, **on)


class Normalization:
    """Per-dimension `(mean, scale)` for the inputs and for the outputs: `x_n = (x - mean) · scale`.

    Host-side (CPU) vectors: the trainer copies them into each dictionary's buffers on its device."""

    @classmethod
    def from_stats(
        cls, inputs: Sequence[SiteStats], outputs: Sequence[SiteStats] | None, mode: NormalizeMode
    ) -> Normalization:
        """Each site normalised by its own statistics (outputs default to the inputs)."""

        def cat(stats: Sequence[SiteStats]) -> tuple[torch.Tensor, torch.Tensor]:
            pairs = [s.normalization(mode) for s in stats]
            return torch.cat([m for m, _ in pairs]), torch.cat([s for _, s in pairs])

        in_mean, in_scale = cat(inputs)
        out_mean, out_scale = cat(outputs) if outputs else (None, None)
        return cls(in_mean, in_scale, out_mean, out_scale)

    def __init__(
        self,
        in_mean: torch.Tensor,
        in_scale: torch.Tensor,
        out_mean: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ):
        self.in_mean, self.in_scale = in_mean.float(), in_scale.float()
        self.out_mean = self.in_mean if out_mean is None else out_mean.float()
        self.out_scale = self.in_scale if out_scale is None else out_scale.float()

    @classmethod
    def identity(cls, sites: Sites) -> Normalization:
        d_in, d_out = sites.d_in, sites.d_out
        return cls(torch.zeros(d_in), torch.ones(d_in), torch.zeros(d_out), torch.ones(d_out))  # host: moved by Trainer


@dataclass
class _Sums:
    """One dictionary's sums over a metrics window: its loss parts, squared error, target variance, L0."""

    parts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    error: torch.Tensor | float = 0.0
    variance: torch.Tensor | float = 0.0
    l0: torch.Tensor | float = 0.0


@dataclass
class _Window:
    """The steps since the last `Trainer.metrics()`: the run's counters, and sums per dictionary name."""

    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, _Sums] = field(default_factory=dict)


class DictionarySet(nn.Module):
    """All dictionaries of a run behind one `forward`, so that one DDP wrapper covers them all."""

    def __init__(self, dictionaries: dict[str, Dictionary]):
        super().__init__()
        self.names = list(dictionaries)
        self.dictionaries = nn.ModuleList(dictionaries.values())

    def forward(
        self, x_n: torch.Tensor, y_n: torch.Tensor, dead: dict[str, torch.Tensor | None], coefficients: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, Outcome]]:
        outcomes = {
            name: objective(d, x_n, y_n, dead[name], coefficients[name])
            for name, d in zip(self.names, self.dictionaries)
        }
        return sum(o.loss for o in outcomes.values()), outcomes


class Trainer:
    """Trains `configs` (one dictionary each) together for `total_steps` steps."""

    def __init__(
        self,
        configs: Sequence[DictionaryConfig],
        sites: Sites,
        total_steps: int,
        normalization: Normalization | None = None,
        world_size: int = 1,
        all_reduce: AllReduce | None = None,
        *,
        device: torch.device | str = "cpu",
        autocast: bool = False,
    ):
        """`device`: where every dictionary, its Adam state and the counters live (batches are moved there);
        `autocast`: run the forward in bfloat16 autocast on that device type (float32 master weights)."""
        names = [c.display_name() for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidRequest(
                f"dictionary names must be unique in a run; set `name` on the ones called {duplicates}"
            )
        if total_steps < 1:
            raise InvalidRequest(f"total_steps must be at least 1, got {total_steps}")
        norm = normalization or Normalization.identity(sites)
        self.sites, self.total_steps, self.world_size = sites, total_steps, world_size
        self.all_reduce = all_reduce
        self.device, self.autocast = torch.device(device), autocast
        self.dictionaries: dict[str, Dictionary] = {}
        for name, cfg in zip(names, configs):
            d = Dictionary(cfg, sites, device=self.device)
            d.set_normalization(norm.in_mean, norm.in_scale, norm.out_mean, norm.out_scale)
            self.dictionaries[name] = d
        self.net = DictionarySet(self.dictionaries)
        self.model: nn.Module = self.net
        self.optimizers = {
            name: torch.optim.Adam(d.parameters(), lr=d.cfg.lr, betas=d.cfg.adam_betas, eps=d.cfg.adam_eps, fused=True)
            for name, d in self.dictionaries.items()
        }
        self.since_fired = {
            n: torch.zeros(d.n_latents, dtype=torch.int64, device=self.device) for n, d in self.dictionaries.items()
        }
        self.fire_counts = {
            n: torch.zeros(d.n_latents, dtype=torch.float64, device=self.device) for n, d in self.dictionaries.items()
        }
        self.step = 0
        self.tokens = 0
        self._window = _Window()

    @property
    def first(self) -> Dictionary:
        return next(iter(self.dictionaries.values()))

    def normalize(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs `x [..., d_in]` and targets `y [..., d_out]` (None: `x`; any device, copied to the trainer's
        without blocking) as normalised 2-D rows on the trainer's device.

        Every leading position is one token (`[B, T, d]` is `B·T` rows, BatchTopK's batch included);
        raises `InvalidRequest` naming the expected shape when a width does not fit the sites.
        """
        x_rows = rows(x, self.sites.d_in, "training inputs").to(self.device, non_blocking=True)
        x_n = self.first.normalize_in(x_rows)
        if y is None:
            return x_n, x_n
        y_rows = rows(y, self.sites.d_out, "training targets").to(self.device, non_blocking=True)
        return x_n, self.first.normalize_out(y_rows)

    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation (pre-bias) from a first batch (`[..., d_in]`, see `normalize`);
        call before `wrap`."""
        _, y_n = self.normalize(x, y)
        for d in self.dictionaries.values():
            init_pre_bias(d, y_n)

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the module that runs the forward pass (e.g. in DDP); parameters stay shared."""
        self.model = fn(self.net)

    def dead(self, name: str) -> torch.Tensor:
        """`[n_latents]` bool: the latents of dictionary `name` unfired for `dead_after_tokens` tokens."""
        return self.since_fired[name] >= self.dictionaries[name].cfg.dead_after_tokens

    def _step_dead(self, name: str) -> torch.Tensor | None:
        """`dead(name)`, or None while no latent can be dead yet: decided on the host without reading the device,
        as no `since_fired` counter exceeds the tokens trained since the start (`tokens`)."""
        return self.dead(name) if self.tokens >= self.dictionaries[name].cfg.dead_after_tokens else None

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One optimisation step of every dictionary on inputs `x [..., d_in]` and targets `y [..., d_out]`
        (None: `x`); the batch is its rows (see `normalize`), tokens are counted per row."""
        x_n, y_n = self.normalize(x, y)
        dead = {name: self._step_dead(name) for name in self.dictionaries}
        coefficients = {
            n: d.cfg.sparsity * warmup_factor(self.step, d.cfg.sparsity_warmup_steps)
            for n, d in self.dictionaries.items()
        }
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            total, outcomes = self.model(x_n, y_n, dead, coefficients)
        total.backward()
        for name, d in self.dictionaries.items():
            self._update(d, self.optimizers[name])
        tokens = x_n.shape[0] * self.world_size
        self._count_firing(outcomes, tokens)
        self._accumulate(outcomes, y_n, x_n.shape[0])
        self.step += 1
        self.tokens += tokens

    def lr(self, d: Dictionary) -> float:
        cfg = d.cfg
        return cfg.lr * lr_factor(self.step, self.total_steps, cfg.lr_warmup_steps, cfg.lr_decay_fraction)

    @torch.no_grad()
    def _update(self, d: Dictionary, optimizer: torch.optim.Optimizer) -> None:
        if d.cfg.unit_decoder:
            W = d.W_dec
            W.grad.sub_((W.grad * W).sum(1, keepdim=True) * W)
        if d.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(d.parameters(), d.cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(d)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.cfg.unit_decoder:
            d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if d.cfg.architecture == "jumprelu":
            d.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def _count_firing(self, outcomes: dict[str, Outcome], tokens: int) -> None:
        counts = torch.cat([outcomes[name].fire_counts for name in self.dictionaries])
        if self.all_reduce is not None:
            self.all_reduce(counts)
        for name, part in zip(self.dictionaries, counts.split([d.n_latents for d in self.dictionaries.values()])):
            since = self.since_fired[name]
            since.add_(tokens).masked_fill_(part > 0, 0)
            self.fire_counts[name].add_(part.double())

    @torch.no_grad()
    def _accumulate(self, outcomes: dict[str, Outcome], y_n: torch.Tensor, batch: int) -> None:
        w = self._window
        w.steps += 1
        w.tokens += batch * self.world_size
        variance = (y_n - y_n.mean(0)).pow(2).sum()
        for name, o in outcomes.items():
            sums = w.sums.setdefault(name, _Sums())
            for part, value in o.parts.items():
                sums.parts[part] = sums.parts.get(part, 0.0) + value
            sums.error += (o.prediction - y_n).pow(2).sum()
            sums.variance += variance
            sums.l0 += o.fire_counts.sum() / batch

    def metrics(self) -> dict[str, float]:
        """Means over the steps since the last call: per dictionary `{name}/{loss part}`, `/loss`,
        `/explained_variance`, `/l0`, `/dead_fraction`, `/lr`; plus `step`, `tokens`, `tokens_per_s`."""
        w = self._window
        steps = max(w.steps, 1)
        out: dict[str, float] = {
            "step": self.step,
            "tokens": self.tokens,
            "tokens_per_s": w.tokens / max(time.perf_counter() - w.start, 1e-9),
        }
        for name, d in self.dictionaries.items():
            sums = w.sums.get(name)
            if sums is not None:
                parts = {k: float(v) / steps for k, v in sums.parts.items()}
                out.update({f"{name}/{k}": v for k, v in parts.items()})
                out[f"{name}/loss"] = sum(parts.values())
                out[f"{name}/explained_variance"] = 1.0 - float(sums.error) / max(float(sums.variance), 1e-12)
                out[f"{name}/l0"] = float(sums.l0) / steps
            out[f"{name}/dead_fraction"] = float(self.dead(name).float().mean())
            out[f"{name}/lr"] = self.lr(d)
        self._window = _Window()
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume exactly: raw parameters and buffers, Adam moments, firing counters;
        CPU copies whatever the trainer's device (what checkpoints are written from)."""

        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        out: dict[str, torch.Tensor] = {}
        for name, d in self.dictionaries.items():
            out.update({f"{name}/model/{k}": host(v) for k, v in d.state_dict().items()})
            optimizer = self.optimizers[name]
            for pname, p in d.named_parameters():
                for key, value in optimizer.state.get(p, {}).items():
                    out[f"{name}/adam/{pname}/{key}"] = host(value)
            out[f"{name}/since_fired"] = host(self.since_fired[name])
            out[f"{name}/fire_counts"] = host(self.fire_counts[name])
        return out

    def state_meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "sites": self.sites.model_dump(mode="json"),
            "dictionaries": {name: d.cfg.model_dump(mode="json") for name, d in self.dictionaries.items()},
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_tensors`/`state_meta` saved (tensors on any device, e.g. CPU ones read from a
        checkpoint: copied to the trainer's); the run's dictionaries must be the same."""
        check_same_run(meta, [d.cfg for d in self.dictionaries.values()], self.sites)
        for name, d in self.dictionaries.items():
            d.load_state_dict({k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{name}/model/")})
            params = dict(d.named_parameters())
            state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(f"{name}/adam/"):
                    pname, field = key[len(f"{name}/adam/") :].rsplit("/", 1)
                    state.setdefault(params[pname], {})[field] = value.to(params[pname].device, copy=True)
            self.optimizers[name].state.update(state)
            self.since_fired[name].copy_(tensors[f"{name}/since_fired"])
            self.fire_counts[name].copy_(tensors[f"{name}/fire_counts"])
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])


def check_same_run(meta: dict[str, Any], configs: Sequence[DictionaryConfig], sites: Sites, where: str = "") -> None:
    """Raise `InvalidRequest` unless a checkpoint's `state_meta` (`meta`) was written by a run of these
    dictionaries on these sites, naming what changed (the names, a dictionary's settings, or the sites) and
    the checkpoint (`where`)."""
    mine = {c.display_name(): c.model_dump(mode="json") for c in configs}
    theirs = meta["dictionaries"]
    if theirs == mine and meta["sites"] == sites.model_dump(mode="json"):
        return
    if sorted(theirs) != sorted(mine):
        changed = f"dictionaries {sorted(theirs)} there, {sorted(mine)} now"
    elif theirs != mine:
        changed = "settings of " + ", ".join(n for n in mine if theirs[n] != mine[n])
    else:
        changed = "the input/output sites (stores, hooks or widths)"
    raise InvalidRequest(
        f"the checkpoint {where + ' ' if where else ''}was written by a run with other dictionaries or data "
        f"({changed}); resume with the same config, or start a new run name"
    )
