"""Checks every hooked-model source must pass (timm, OpenCLIP, Hugging Face): shared by their test files."""

import torch

from prisma_ray.models import HookedVisionModel


def batch(model: HookedVisionModel, n: int = 2) -> torch.Tensor:
    """`n` random inputs of the model's input shape (fixed seed)."""
    return torch.randn(n, *model.preprocess.input_shape(), generator=torch.Generator().manual_seed(1))


def read_only_names(model: HookedVisionModel) -> list[str]:
    """Every hook point whose reading leaves the computation as it is (attention patterns excluded)."""
    return [n for n in model.hook_names if not n.endswith("hook_pattern")]


def check_cache_shapes(model: HookedVisionModel, cache: dict[str, torch.Tensor], n: int) -> None:
    """Activations are `[n, tokens, d_model]`, patterns `[n, heads, tokens, tokens]` rows summing to 1."""
    n_tokens = model.token_layout.n_tokens
    for name, value in cache.items():
        if name.endswith("hook_pattern"):
            assert value.shape == (n, model.n_heads, n_tokens, n_tokens)
            assert torch.allclose(value.sum(-1), torch.ones(()), atol=1e-5)
        else:
            assert value.shape == (n, n_tokens, model.d_model), name


def check_residual_decomposition(model: HookedVisionModel, cache: dict[str, torch.Tensor]) -> None:
    """pre + attn_out == mid exactly, mid + mlp_out == post, and the embedding is block 0's input."""
    for layer in range(model.n_layers):
        pre, mid, post = (cache[f"blocks.{layer}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        assert torch.equal(pre + cache[f"blocks.{layer}.hook_attn_out"], mid)
        assert torch.allclose(mid + cache[f"blocks.{layer}.hook_mlp_out"], post, atol=1e-6)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])


def check_zero_ablation(model: HookedVisionModel, x: torch.Tensor) -> None:
    """Zeroing block 0's residual stream changes the output, and the hook is gone afterwards."""
    reference = model(x)
    with model.hooks([("blocks.0.hook_resid_post", lambda t, hook: torch.zeros_like(t))]):
        ablated = model(x)
    assert not torch.allclose(ablated, reference)
    assert torch.equal(model(x), reference), "hooks must be removed when the block ends"


def check_early_stop(model: HookedVisionModel, x: torch.Tensor, names: list[str]) -> None:
    """`stop_early` runs no later block and caches exactly what a full run caches."""
    _, full = model.run_with_cache(x, names)
    calls = []
    handle = model._sites.layers[-1].block.register_forward_hook(lambda *a: calls.append(1))
    output, early = model.run_with_cache(x, names, stop_early=True)
    handle.remove()
    assert output is None and not calls, "later blocks must not run"
    for name in names:
        assert torch.equal(full[name], early[name])


def check_identity_intervention(model: HookedVisionModel, x: torch.Tensor, name: str) -> None:
    """Replacing hook point `name` with a copy of itself leaves the output as it is."""
    reference = model(x)
    with model.hooks([(name, lambda t, hook: t.clone())]):
        assert torch.allclose(model(x), reference, atol=1e-6)
