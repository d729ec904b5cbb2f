"""The dictionary module: parameters, input normalisation, and inference-time encode/decode.

One class covers SAEs, transcoders and crosscoders. Inputs are the concatenation of the input
sites (one for an SAE or transcoder, several layers or models for a crosscoder) and outputs the
concatenation of the output sites (the inputs themselves for an autoencoder, another hook point
for a transcoder). Autoencoders subtract `b_dec` from the input before encoding (the pre-bias).
Normalisation `x_n = (x - mean) · scale` is applied on the way in and undone on the way out.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from prisma_ray.errors import InvalidRequest

from .config import BATCHTOPK_ARCHITECTURES, K_ARCHITECTURES, DictionaryConfig


class Site(BaseModel):
    """One activation site a dictionary reads or writes: a hook point (of a model) and its width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    width: int = Field(ge=1)
    model: str = ""


class Sites(BaseModel):
    """What a dictionary reads (`inputs`) and writes (`outputs`, default: the inputs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: tuple[Site, ...] = Field(min_length=1)
    outputs: tuple[Site, ...] = ()

    @property
    def targets(self) -> tuple[Site, ...]:
        return self.outputs or self.inputs

    @property
    def autoencoder(self) -> bool:
        return self.targets == self.inputs

    @property
    def d_in(self) -> int:
        return sum(s.width for s in self.inputs)

    @property
    def d_out(self) -> int:
        return sum(s.width for s in self.targets)

    @property
    def kind(self) -> str:
        if not self.autoencoder:
            return "transcoder"
        return "crosscoder" if len(self.inputs) > 1 else "sae"

    def out_bounds(self) -> list[tuple[int, int]]:
        """`(start, stop)` column ranges of the output sites."""
        bounds, start = [], 0
        for site in self.targets:
            bounds.append((start, start + site.width))
            start += site.width
        return bounds


class Dictionary(nn.Module):
    """A sparse dictionary; `forward(x)` maps raw inputs to raw reconstructions (or predictions).

    Its parameters and buffers (float32; the (Matryoshka) BatchTopK threshold float64) are created on `device`
    (None: torch's default device). The random initialisation is drawn on the CPU from `cfg.seed`, so it is the
    same on every device.
    """

    def __init__(self, cfg: DictionaryConfig, sites: Sites, device: torch.device | str | None = None):
        super().__init__()
        n_latents = check_shape(cfg, sites)
        self.cfg, self.sites, self.n_latents = cfg, sites, n_latents
        d_in, d_out = sites.d_in, sites.d_out
        on = {"device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents, **on))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_out, **on))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **on))
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(n_latents, **on))
            self.r_mag = nn.Parameter(torch.zeros(n_latents, **on))
            self.b_mag = nn.Parameter(torch.zeros(n_latents, **on))
        else:
            self.b_enc = nn.Parameter(torch.zeros(n_latents, **on))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n_latents,), cfg.jumprelu_init_threshold, **on))
        if cfg.architecture in BATCHTOPK_ARCHITECTURES:
            self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64, **on))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **on))
        self.register_buffer("in_mean", torch.zeros(d_in, **on))
        self.register_buffer("in_scale", torch.ones(d_in, **on))
        self.register_buffer("out_mean", torch.zeros(d_out, **on))
        self.register_buffer("out_scale", torch.ones(d_out, **on))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Random decoder rows at `init_norm`; the encoder is the decoder transposed (tied init)
        for autoencoders, an independent draw at the same norm for transcoders. Drawn on the CPU
        (seeded generator), copied to the parameters' device."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        norm = self.cfg.init_norm
        W_dec = torch.randn(self.n_latents, self.sites.d_out, generator=gen)  # host: the same draw on every device
        self.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True) * norm)
        if self.sites.autoencoder:
            self.W_enc.copy_(self.W_dec.t())
        else:
            W_enc = torch.randn(self.sites.d_in, self.n_latents, generator=gen)  # host: as W_dec
            self.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True) * norm)

    @torch.no_grad()
    def set_normalization(
        self, in_mean: torch.Tensor, in_scale: torch.Tensor, out_mean: torch.Tensor, out_scale: torch.Tensor
    ) -> None:
        """Set the normalisation vectors (`[d_in]`, `[d_in]`, `[d_out]`, `[d_out]`, any device: copied to the buffers')."""
        for name, value in (
            ("in_mean", in_mean),
            ("in_scale", in_scale),
            ("out_mean", out_mean),
            ("out_scale", out_scale),
        ):
            getattr(self, name).copy_(value)

    def normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) * self.in_scale

    def normalize_out(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.out_mean) * self.out_scale

    @property
    def pre_bias(self) -> torch.Tensor | None:
        """`b_dec` for autoencoders (subtracted from the input before encoding), else None."""
        return self.b_dec if self.sites.autoencoder else None

    def centered(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n - self.b_dec if self.sites.autoencoder else x_n

    def decoder_norms(self) -> torch.Tensor:
        """`[n_latents]`: the decoder row norms summed over output sites (the crosscoder penalty weight)."""
        return sum(self.W_dec[:, a:b].norm(dim=1) for a, b in self.sites.out_bounds())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs `[..., d_in]` -> dense latent activations `[..., n_latents]` (inference rules).

        Every row (position of the leading dimensions) is encoded on its own: a `[B, T, d_in]` batch gives
        what its `B·T` rows give one by one. Raises `InvalidRequest` when the last dimension is not `d_in`.
        """
        check_width(x, self.sites.d_in, f"dictionary {self.cfg.display_name()!r}: encode")
        centered = self.centered(self.normalize_in(x))
        arch = self.cfg.architecture
        if arch == "gated":
            shared = centered @ self.W_enc
            gate = shared + self.b_gate > 0
            return gate * torch.relu(shared * self.r_mag.exp() + self.b_mag)
        pre = centered @ self.W_enc + self.b_enc
        if arch == "topk":
            values, idx = pre.topk(self.cfg.top_k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, values.relu())
        if arch in BATCHTOPK_ARCHITECTURES:
            return pre.relu() * (pre > self.topk_threshold.to(pre.dtype))
        if arch == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent activations `[..., n_latents]` -> raw outputs `[..., d_out]` (without the transcoder skip
        term, which needs the input). Raises `InvalidRequest` when the last dimension is not `n_latents`."""
        check_width(z, self.n_latents, f"dictionary {self.cfg.display_name()!r}: decode")
        return (z @ self.W_dec + self.b_dec) / self.out_scale + self.out_mean

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The transcoder skip term for raw inputs `[..., d_in]`, in normalised output units `[..., d_out]`."""
        check_width(x, self.sites.d_in, f"dictionary {self.cfg.display_name()!r}: skip")
        return self.normalize_in(x) @ self.W_skip.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs `[..., d_in]` -> raw reconstructions (or transcoder predictions) `[..., d_out]`, row by row."""
        out = self.encode(x) @ self.W_dec + self.b_dec
        if self.cfg.skip_connection:
            out = out + self.skip(x)
        return out / self.out_scale + self.out_mean


def check_width(x: torch.Tensor, width: int, what: str) -> None:
    """Raise `InvalidRequest` naming `what` unless `x` is `[..., width]` (any number of leading dimensions)."""
    if x.dim() == 0 or x.shape[-1] != width:
        raise InvalidRequest(
            f"{what}: expected activations of shape [..., {width}] (rows of width {width}, any leading "
            f"dimensions), got {list(x.shape)}"
        )


def rows(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    """`x [..., width]` as 2-D rows `[N, width]`, `N` the product of its leading dimensions (see `check_width`)."""
    check_width(x, width, what)
    return x.reshape(-1, width)


def check_shape(cfg: DictionaryConfig, sites: Sites) -> int:
    """The number of latents of `cfg` on `sites`; raises if the config cannot fit the data."""
    n_latents = cfg.latents(sites.d_in)
    name = cfg.display_name()
    if cfg.architecture in K_ARCHITECTURES and cfg.top_k > n_latents:
        raise InvalidRequest(
            f"dictionary {name!r}: k={cfg.top_k} exceeds its {n_latents} latents; lower k or raise d_sae"
        )
    if cfg.matryoshka_widths is not None and cfg.matryoshka_widths[-1] != n_latents:
        raise InvalidRequest(
            f"dictionary {name!r}: the last of matryoshka_widths {list(cfg.matryoshka_widths)} must be its number "
            f"of latents, {n_latents}; end the list with {n_latents} (or set d_sae to {cfg.matryoshka_widths[-1]})"
        )
    if cfg.skip_connection and sites.autoencoder:
        raise InvalidRequest(
            f"dictionary {name!r}: skip_connection is for transcoders (data.targets set); an autoencoder would "
            "learn the identity through it"
        )
    return n_latents
