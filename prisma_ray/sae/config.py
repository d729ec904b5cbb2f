"""Hyperparameters of one sparse dictionary, validated where they enter (YAML or Python)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prisma_ray.errors import InvalidRequest

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
PreBiasInit = Literal["geometric_median", "mean", "zeros"]

BATCHTOPK_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")
"""Architectures trained with BatchTopK and a learned inference threshold (exported as JumpReLU)."""
K_ARCHITECTURES = ("topk", *BATCHTOPK_ARCHITECTURES)
_L1_ARCHITECTURES = ("relu", "gated")


class DictionaryConfig(BaseModel):
    """One dictionary (SAE, transcoder or crosscoder: what it reads and writes comes from the data).

    - `relu`: ReLU with the L1 penalty `Σ_i f_i ‖W_dec,i‖` (summed over sources for crosscoders).
    - `topk` / `batchtopk`: `k` active latents per token / `k·rows` per training batch, with AuxK on
      dead latents; BatchTopK learns the inference threshold (saved with the weights). A batch `[..., d]`
      is its rows, all leading positions pooled: `[B, T, d]` is the `[B·T, d]` batch, `k·B·T` latents.
    - `matryoshka_batchtopk` (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
      Autoencoders"; SAELens `MatryoshkaBatchTopKTrainingSAE`): BatchTopK whose nested prefixes of the
      latents (`matryoshka_widths`) each reconstruct the target; the loss sums the prefixes' reconstruction
      errors. With one width it is `batchtopk`.
    - `jumprelu`: per-latent thresholds trained by straight-through estimators (`bandwidth`) with an
      L0 penalty. `gated`: gate and magnitude paths sharing encoder directions, L1 on the gate.

    `decoder_norm="unit"` keeps every decoder row at unit norm (gradient component along the row
    removed, rows renormalised after each step); the default is `unit` except for `relu`, whose
    penalty is weighted by the decoder norms instead (Anthropic, 2024).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$",
        description="unique in a run, used as a directory name; default: architecture and sparsity setting",
    )
    architecture: Architecture = Field(
        "topk",
        description="relu, topk, batchtopk, jumprelu, gated or matryoshka_batchtopk (SAELens: architecture)",
    )
    expansion_factor: int = Field(16, ge=1, description="latents per input dimension (ignored when d_sae is set)")
    d_sae: int | None = Field(None, ge=1, description="number of latents")
    k: int | None = Field(
        None, ge=1, description="active latents per token (topk, batchtopk, matryoshka_batchtopk); default 32"
    )
    matryoshka_widths: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description="matryoshka_batchtopk (required): the nested prefix widths, strictly increasing, the last "
        "the number of latents (SAELens: matryoshka_widths)",
    )
    aux_k: int = Field(
        256, ge=1, description="dead latents used by the AuxK loss (topk, batchtopk, matryoshka_batchtopk)"
    )
    aux_coefficient: float = Field(
        1 / 32, ge=0, description="weight of the AuxK loss (topk, batchtopk, matryoshka_batchtopk)"
    )
    l1_coefficient: float | None = Field(None, ge=0, description="relu, gated; default 5.0")
    l0_coefficient: float | None = Field(None, ge=0, description="jumprelu; default 1.0")
    sparsity_warmup_steps: int = Field(0, ge=0, description="linear warm-up of the L1/L0 coefficient")
    jumprelu_init_threshold: float = Field(0.01, ge=0, description="jumprelu: initial threshold of every latent")
    jumprelu_bandwidth: float = Field(
        0.05, gt=0, description="jumprelu: kernel width of the straight-through threshold gradient"
    )
    batchtopk_threshold_lr: float = Field(
        0.01,
        gt=0,
        le=1,
        description="batchtopk, matryoshka_batchtopk: rate of the moving average that learns the inference threshold",
    )
    skip_connection: bool = Field(False, description="transcoders: add a learned linear map input -> output")
    decoder_norm: Literal["unit", "free"] | None = Field(
        None, description="unit: decoder rows kept at unit norm; free: unconstrained (default: unit, free for relu)"
    )
    decoder_init_norm: float | None = Field(None, gt=0, description="default 1 with unit decoders, 0.1 otherwise")
    pre_bias_init: PreBiasInit = Field(
        "geometric_median",
        description="initial decoder bias b_dec: geometric_median or mean of a first batch, or zeros "
        "(SAELens: b_dec_init_method)",
    )
    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    lr_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up from 0, in steps")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="linear decay to 0 over this last part of training")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam (beta1, beta2)")
    adam_eps: float = Field(6.25e-10, gt=0, description="Adam epsilon")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm of this dictionary")
    dead_after_tokens: int = Field(10_000_000, ge=1, description="a latent unfired for this many tokens is dead")
    seed: int = Field(0, description="seed of the weight initialisation")

    @model_validator(mode="after")
    def _check_architecture_fields(self) -> DictionaryConfig:
        arch = self.architecture
        misplaced = {
            "k": (self.k, K_ARCHITECTURES),
            "l1_coefficient": (self.l1_coefficient, _L1_ARCHITECTURES),
            "l0_coefficient": (self.l0_coefficient, ("jumprelu",)),
            "matryoshka_widths": (self.matryoshka_widths, ("matryoshka_batchtopk",)),
        }
        for field, (value, allowed) in misplaced.items():
            if value is not None and arch not in allowed:
                raise InvalidRequest(f"{field} applies to architecture {' or '.join(allowed)}, not {arch!r}; remove it")
        if arch == "matryoshka_batchtopk":
            widths = self.matryoshka_widths
            if widths is None:
                raise InvalidRequest(
                    "architecture 'matryoshka_batchtopk' needs matryoshka_widths: the nested prefix widths, "
                    "e.g. [128, 512, 2048] for 2048 latents (the last one is the number of latents)"
                )
            if widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:])):
                raise InvalidRequest(
                    f"matryoshka_widths {list(widths)} must be positive and strictly increasing, "
                    "the last one the number of latents"
                )
        return self

    @property
    def top_k(self) -> int:
        """Active latents per token (topk) or on average over a batch (batchtopk)."""
        return self.k if self.k is not None else 32

    @property
    def sparsity(self) -> float:
        """k, the L1 or the L0 coefficient, whichever this architecture uses."""
        if self.architecture in K_ARCHITECTURES:
            return float(self.top_k)
        if self.architecture in _L1_ARCHITECTURES:
            return self.l1_coefficient if self.l1_coefficient is not None else 5.0
        return self.l0_coefficient if self.l0_coefficient is not None else 1.0

    @property
    def unit_decoder(self) -> bool:
        return (self.decoder_norm or ("free" if self.architecture == "relu" else "unit")) == "unit"

    @property
    def init_norm(self) -> float:
        return self.decoder_init_norm or (1.0 if self.unit_decoder else 0.1)

    def latents(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def display_name(self) -> str:
        if self.name:
            return self.name
        label = (
            "k"
            if self.architecture in K_ARCHITECTURES
            else {"relu": "l1", "gated": "l1", "jumprelu": "l0"}[self.architecture]
        )
        return f"{self.architecture}-{label}-{self.sparsity:g}"
