"""Activations `[..., d]` are rows: every architecture and entry point gives on `[B, T, d]` (or more
leading dimensions) what it gives on the same rows one by one, or an error naming the expected shape."""

import numpy as np
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate.ground_truth import factor_recovery
from prisma_ray.evaluate.metrics import Reconstruction, Sparsity
from prisma_ray.interpret.steer import SteerSpec, steered
from prisma_ray.interpret.topk import LatentRecord
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.config import BATCHTOPK_ARCHITECTURES, K_ARCHITECTURES
from prisma_ray.sae.init import geometric_median
from prisma_ray.sae.kernels import JumpReLU, Step, sparse_decode
from prisma_ray.sae.objectives import objective
from prisma_ray.sae.trainer import SiteStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, D_OUT, N_LATENTS, K = 16, 12, 64, 4
ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
KINDS = {
    "sae": Sites(inputs=(Site(name="h", width=D),)),
    "transcoder": Sites(inputs=(Site(name="in", width=D),), outputs=(Site(name="out", width=D_OUT),)),
    "crosscoder": Sites(inputs=(Site(name="a", width=D // 2), Site(name="b", width=D // 2))),
}
SHAPES = [(10,), (2, 5), (2, 1, 5)]  # leading dimensions: 2-D, 3-D and 4-D inputs of the same 10 rows


def config(arch: str, kind: str) -> DictionaryConfig:
    k = {"k": K} if arch in K_ARCHITECTURES else {}
    if arch == "matryoshka_batchtopk":
        k["matryoshka_widths"] = (8, 24, N_LATENTS)
    return DictionaryConfig(architecture=arch, d_sae=N_LATENTS, skip_connection=kind == "transcoder", **k)


def randomized(arch: str, kind: str) -> Dictionary:
    """A float64 dictionary with every parameter and buffer random (thresholds small and positive)."""
    sites = KINDS[kind]
    d = Dictionary(config(arch, kind), sites).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.1 if name == "threshold" else 0.5))
        if arch == "jumprelu":
            d.threshold.abs_()
        if arch in BATCHTOPK_ARCHITECTURES:
            d.topk_threshold.fill_(0.3)
        d.set_normalization(
            torch.randn(sites.d_in, generator=gen),
            torch.rand(sites.d_in, generator=gen) + 0.5,
            torch.randn(sites.d_out, generator=gen),
            torch.rand(sites.d_out, generator=gen) + 0.5,
        )
    return d


def one_by_one(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn` applied to each row of `x [..., d]` alone (as a `[1, d]` batch), stacked back to `x`'s leading shape."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([fn(flat[i : i + 1]) for i in range(len(flat))])
    return out.reshape(*x.shape[:-1], out.shape[-1])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_decode_forward_equal_the_rows_one_by_one(arch, kind):
    d = randomized(arch, kind)
    rows = torch.randn(10, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    with torch.no_grad():
        for lead in SHAPES:
            x = rows.reshape(*lead, D)
            z = d.encode(x)
            assert z.shape == (*lead, N_LATENTS)
            torch.testing.assert_close(z, one_by_one(d.encode, x), rtol=0, atol=1e-12)
            torch.testing.assert_close(d.decode(z), one_by_one(d.decode, z), rtol=0, atol=1e-12)
            torch.testing.assert_close(d(x), one_by_one(d, x), rtol=0, atol=1e-12)
            if kind == "transcoder":
                torch.testing.assert_close(d.skip(x), one_by_one(d.skip, x), rtol=0, atol=1e-12)
        if arch == "topk":  # the input: k active latents per token, not per column of tokens
            assert ((d.encode(rows.reshape(2, 5, D)) > 0).sum(-1) <= K).all()
        single = d.encode(rows[0])  # one activation vector `[d_in]` is one row
        torch.testing.assert_close(single, d.encode(rows[:1])[0], rtol=0, atol=1e-12)


def test_a_wrong_width_names_the_expected_shape():
    d = randomized("topk", "sae")
    with pytest.raises(InvalidRequest, match=r"encode: expected activations of shape \[\.\.\., 16\].*got \[2, 5, 8\]"):
        d.encode(torch.zeros(2, 5, 8, dtype=torch.float64))
    with pytest.raises(InvalidRequest, match=r"decode: expected activations of shape \[\.\.\., 64\]"):
        d.decode(torch.zeros(2, 5, D, dtype=torch.float64))
    with pytest.raises(InvalidRequest, match=r"\[\.\.\., 16\].*got \[5, 16, 2\]"):
        d(torch.zeros(5, D, 2, dtype=torch.float64))
    with pytest.raises(InvalidRequest, match=r"training inputs: expected activations of shape \[\.\.\., 16\]"):
        Trainer([config("topk", "sae")], KINDS["sae"], 1).train_step(torch.zeros(4, 8))


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_training_step_on_a_3d_batch_is_the_step_on_its_rows(arch, kind):
    """Every leading position is one token: BatchTopK keeps k x B x T latents of a [B, T, d] batch."""
    sites = KINDS[kind]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, sites.d_in, generator=gen)
    y = torch.randn(4, 6, sites.d_out, generator=gen) if kind == "transcoder" else None
    trainers = []
    for batch in (lambda t: t, lambda t: None if t is None else t.reshape(-1, t.shape[-1])):
        trainer = Trainer([config(arch, kind)], sites, 10)
        trainer.initialize(batch(x), batch(y))
        for _ in range(2):
            trainer.train_step(batch(x), batch(y))
        trainers.append(trainer)
    shaped, flat = (t.state_tensors() for t in trainers)
    assert shaped.keys() == flat.keys()
    for key in flat:
        torch.testing.assert_close(shaped[key], flat[key], rtol=1e-5, atol=1e-6, msg=key)
    assert trainers[0].tokens == trainers[1].tokens == 2 * 24
    shaped_metrics, flat_metrics = (t.metrics() for t in trainers)
    for key in ("tokens", "step") + tuple(k for k in flat_metrics if k.endswith(("/l0", "/explained_variance"))):
        assert shaped_metrics[key] == pytest.approx(flat_metrics[key], rel=1e-5), key


def test_objective_takes_leading_dimensions():
    d = randomized("batchtopk", "sae").float()
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    shaped, flat = objective(d, x, x, dead, 0.0), objective(d, x.reshape(-1, D), x.reshape(-1, D), dead, 0.0)
    torch.testing.assert_close(shaped.prediction, flat.prediction)
    assert float(shaped.fire_counts.sum()) == float(flat.fire_counts.sum()) == K * 15


@pytest.mark.parametrize("fn", [JumpReLU, Step], ids=["jumprelu", "step"])
def test_threshold_gradients_sum_over_every_row(fn):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    grads = []
    for pre in (z, z.reshape(10, 8)):
        threshold = torch.full((8,), 0.2, dtype=torch.float64, requires_grad=True)
        fn.apply(pre, threshold, 1.0).sum().backward()
        grads.append(threshold.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_sparse_decode_takes_leading_dimensions():
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(N_LATENTS, D, generator=gen)
    idx, values = torch.randint(0, N_LATENTS, (2, 5, K), generator=gen), torch.rand(2, 5, K, generator=gen)
    flat = sparse_decode(idx.reshape(10, K), values.reshape(10, K), W)
    torch.testing.assert_close(sparse_decode(idx, values, W), flat.reshape(2, 5, D))


def test_statistics_and_initialisation_pool_leading_dimensions():
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(8))
    flat = x.reshape(-1, D)
    shaped_stats, flat_stats = SiteStats.of(x), SiteStats.of(flat)
    torch.testing.assert_close(shaped_stats.mean, flat_stats.mean)
    torch.testing.assert_close(shaped_stats.var, flat_stats.var)
    assert shaped_stats.mean_norm == pytest.approx(flat_stats.mean_norm)
    torch.testing.assert_close(geometric_median(x), geometric_median(flat))


def test_metrics_count_every_leading_position_as_a_row():
    gen = torch.Generator().manual_seed(9)
    x, x_hat = torch.randn(2, 5, D, generator=gen), torch.randn(2, 5, D, generator=gen)
    z = torch.relu(torch.randn(2, 5, N_LATENTS, generator=gen))
    rec3, rec2, sp3, sp2 = Reconstruction(), Reconstruction(), Sparsity(N_LATENTS), Sparsity(N_LATENTS)
    rec3.update(x, x_hat)
    rec2.update(x.reshape(-1, D), x_hat.reshape(-1, D))
    sp3.update(z)
    sp2.update(z.reshape(-1, N_LATENTS))
    assert rec3.n == rec2.n == 10
    assert rec3.summary() == pytest.approx(rec2.summary())
    assert sp3.summary() == sp2.summary()
    with pytest.raises(InvalidRequest, match=r"targets \[2, 5, 16\] and predictions \[10, 16\] differ"):
        Reconstruction().update(x, x_hat.reshape(-1, D))
    with pytest.raises(InvalidRequest, match=r"sparsity metrics: expected activations of shape \[\.\.\., 64\]"):
        Sparsity(N_LATENTS).update(z[..., :8])


def test_factor_recovery_takes_leading_dimensions():
    rng = np.random.default_rng(0)
    latents = np.maximum(rng.normal(size=(4, 6, 20)), 0)
    shape = np.array(["circle", "square", None] * 8, dtype=object)
    latents[..., 3] = (shape == "circle").reshape(4, 6) * 5.0  # latent 3 detects circles
    shaped = factor_recovery(latents, {"shape": shape})
    assert shaped == factor_recovery(latents.reshape(-1, 20), {"shape": shape})
    assert shaped["best_latent"][shaped["values"].index("shape=circle")] == 3
    with pytest.raises(InvalidRequest, match=r"24 rows of latents but factors of \{'shape': 6\} values"):
        factor_recovery(latents, {"shape": shape[:6]})


def test_latent_record_names_the_shape_it_needs():
    record = LatentRecord.empty(n_latents=8, n_tokens=5, k=2, reservoir=2, negatives=1)
    with pytest.raises(InvalidRequest, match=r"expected \[samples, 5, 8\]"):
        record.update(np.array(["a", "b"]), np.zeros((2, 8), np.float32), np.zeros(5, np.int8))


@pytest.mark.parametrize("keep_error", [True, False])
def test_steering_equals_steering_the_rows_one_by_one(keep_error):
    d = randomized("topk", "sae")
    spec = SteerSpec(latents=[0, 5, 9], value=3.0, keep_error=keep_error)
    x = torch.randn(2, 3, 5, D, generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        out = steered(d, x, spec)
        expected = one_by_one(lambda r: steered(d, r, spec), x)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected)
