"""Classic analysis of image and video models: logit lens, attention maps and rollout, activation
patching and direct attribution. Pure functions over a `HookedVisionModel`; `job` writes figures."""

from .attention import attention_patterns, query_rows, rollout
from .attribution import Attribution, latent_attribution, logit_attribution
from .inputs import Inputs, InputsConfig, load_inputs, render
from .logit_lens import LensResult, lens_accuracy, logit_lens
from .patching import PatchingResult, activation_patching, patch_positions
from .readout import FrozenReadout, NoReadout, Readout, class_readout, source_readout

__all__ = [
    "Attribution",
    "FrozenReadout",
    "Inputs",
    "InputsConfig",
    "LensResult",
    "NoReadout",
    "PatchingResult",
    "Readout",
    "activation_patching",
    "attention_patterns",
    "class_readout",
    "latent_attribution",
    "lens_accuracy",
    "load_inputs",
    "logit_attribution",
    "logit_lens",
    "patch_positions",
    "query_rows",
    "render",
    "rollout",
    "source_readout",
]
