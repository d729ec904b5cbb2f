"""Hooked models loaded at `model_dtype: bfloat16` (extraction's GPU dtype), one model per adapter, on the CPU
(which has bfloat16 matmuls): every hook point caches bfloat16 activations close to the float32 model's, and
interventions (a replacement, a zero ablation) run at that dtype. float16 on the CPU: see the last test.
"""

from __future__ import annotations

import pytest
import torch

from prisma_ray.models import load_model
from tests.tiny_models import read_only_names
from tests.unit.test_hooked_contract import CASES, PER_ADAPTER, _cast

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _relative_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    return float((low.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@torch.inference_mode()
@pytest.mark.parametrize("key", PER_ADAPTER)
def test_every_hook_point_runs_and_caches_at_bfloat16(key):
    case = CASES[key]
    ref = load_model(case.entry, pretrained=False, seed=0)
    low = load_model(case.entry, pretrained=False, seed=0, dtype=torch.bfloat16)
    x = case.inputs(ref)
    names = [n for n in low.hook_names if n in read_only_names(low) or n.endswith("hook_pattern")]
    out_ref, cache_ref = ref.run_with_cache(x, names)
    out_low, cache_low = low.run_with_cache(_cast(x, torch.bfloat16), names)
    assert out_low.dtype == torch.bfloat16 and {t.dtype for t in cache_low.values()} == {torch.bfloat16}
    worst = max(_relative_error(cache_low[n], cache_ref[n]) for n in names)
    assert worst < 0.1, f"{key}: bfloat16 activations {worst:.3f} of their scale away from float32"

    x_low = _cast(x, torch.bfloat16)
    plain = low(x_low)  # without pattern hooks, which change how attention is computed (README)
    with low.hooks([(f"{case.prefix}blocks.0.hook_resid_post", lambda t, hook: t * 1.0)]):
        assert torch.equal(low(x_low), plain), "an identity replacement changes nothing"
    with low.hooks([(f"{case.prefix}blocks.0.hook_mlp_out", lambda t, hook: torch.zeros_like(t))]):
        ablated = low(x_low)
    assert ablated.dtype == torch.bfloat16 and not torch.equal(ablated, plain)


@torch.inference_mode()
def test_float16_on_the_cpu_runs_the_toy_and_timm_vits():
    """float16 is a GPU dtype; on the CPU torch 2.x runs these models' float16 ops too (slowly), so a float16
    extraction can be checked here, within float16's rounding of the float32 model."""
    for key in ("prisma-toy-vit-shapes", "timm-vit"):
        case = CASES[key]
        ref = load_model(case.entry, pretrained=False, seed=0)
        half = load_model(case.entry, pretrained=False, seed=0, dtype=torch.float16)
        x = case.inputs(ref)
        _, cache_ref = ref.run_with_cache(x, ["blocks.1.hook_resid_post"])
        _, cache = half.run_with_cache(x.half(), ["blocks.1.hook_resid_post"])
        assert cache["blocks.1.hook_resid_post"].dtype == torch.float16
        assert _relative_error(cache["blocks.1.hook_resid_post"], cache_ref["blocks.1.hook_resid_post"]) < 0.01
