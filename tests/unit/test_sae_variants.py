"""Each dictionary variant recovers a known sparse dictionary; the sparse TopK gradients are exact."""

import pytest
import torch

from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.kernels import JumpReLU, Step
from prisma_ray.sae.objectives import objective
from prisma_ray.sae.synthetic import mean_max_cosine, sparse_dictionary_data
from prisma_ray.sae.trainer import Normalization, SiteStats

D, FEATURES, ACTIVE = 32, 48, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return sparse_dictionary_data(40_000, D, FEATURES, ACTIVE, seed=1)


def train(data, cfg: DictionaryConfig, steps: int = 800, batch: int = 256) -> Trainer:
    sites = Sites(inputs=(Site(name="h", width=D),))
    norm = Normalization.from_stats([SiteStats.of(data.acts)], None, "center_scale")
    trainer = Trainer([cfg], sites, steps, norm)
    gen = torch.Generator().manual_seed(0)
    trainer.initialize(data.acts[:batch])
    for _ in range(steps):
        trainer.train_step(data.acts[torch.randint(0, len(data.acts), (batch,), generator=gen)])
    return trainer


@pytest.mark.parametrize(
    "cfg",
    [
        DictionaryConfig(architecture="topk", k=ACTIVE),
        DictionaryConfig(architecture="batchtopk", k=ACTIVE),
        DictionaryConfig(architecture="relu", l1_coefficient=1.0),
        DictionaryConfig(architecture="jumprelu", l0_coefficient=1.0),
        DictionaryConfig(architecture="gated", l1_coefficient=5.0),
    ],
    ids=lambda c: c.architecture,
)
def test_variant_recovers_the_true_dictionary(data, cfg):
    cfg = cfg.model_copy(update={"d_sae": 64, "lr": 3e-3, "dead_after_tokens": 20_000})
    trainer = train(data, cfg)
    d = trainer.first
    true_directions = data.features * d.in_scale  # the features as the dictionary sees them (normalised)
    assert mean_max_cosine(d.W_dec.detach(), true_directions) >= 0.9
    # at the right sparsity, with the inference encoder (BatchTopK: its learned threshold)
    x = data.acts[-4096:]
    with torch.no_grad():
        l0 = float((d.encode(x) > 0).sum(1).float().mean())
        explained = 1 - float((d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ACTIVE * 0.7 <= l0 <= ACTIVE * 2, l0
    assert explained > 0.85


def _dense_topk_loss(d, x_n, k):
    """The TopK objective written densely (what SAELens does), as the gradient reference."""
    pre = (x_n - d.b_dec) @ d.W_enc + d.b_enc
    values, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, values.relu())
    return (z @ d.W_dec + d.b_dec - x_n).pow(2).sum(1).mean()


def test_sparse_topk_gradients_match_dense_autograd():
    torch.manual_seed(0)
    sites = Sites(inputs=(Site(name="h", width=16),))
    cfg = DictionaryConfig(architecture="topk", k=4, d_sae=40)
    trainer = Trainer([cfg], sites, 10)
    d = trainer.first
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_()
    x = torch.randn(64, 16)
    no_dead = torch.zeros(40, dtype=torch.bool)
    objective(d, x, x, no_dead, 0.0).loss.backward()
    sparse = {k: p.grad.clone() for k, p in d.named_parameters()}
    d.zero_grad()
    _dense_topk_loss(d, x, 4).backward()
    for name, p in d.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_auxk_trains_dead_latents_only():
    torch.manual_seed(0)
    sites = Sites(inputs=(Site(name="h", width=16),))
    d = Trainer([DictionaryConfig(architecture="topk", k=2, d_sae=32, aux_k=2)], sites, 10).first
    x = torch.randn(8, 16)
    with torch.no_grad():
        used = set(((x - d.b_dec) @ d.W_enc + d.b_enc).topk(2, dim=1).indices.flatten().tolist())
    unused = sorted(set(range(32)) - used)
    dead_ids, idle_ids = unused[:2], unused[2:]
    dead = torch.zeros(32, dtype=torch.bool)
    assert "aux" not in objective(d, x, x, dead, 0.0).parts
    dead[dead_ids] = True
    out = objective(d, x, x, dead, 0.0)
    assert out.parts["aux"] > 0
    out.loss.backward()
    assert d.W_dec.grad[dead_ids].abs().sum(1).min() > 0, "AuxK trains the dead latents' decoder rows"
    assert d.W_dec.grad[idle_ids].abs().sum() == 0, "and no other unused latent"


def test_jumprelu_straight_through_gradients():
    z = torch.tensor([[0.5, 0.98, 1.02, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    out = JumpReLU.apply(z, theta, 0.1)
    assert out[0].tolist() == pytest.approx([0.0, 0.0, 1.02, 2.0])
    out.sum().backward()
    # inside the bandwidth window the threshold gets -(θ/ε)·1, outside nothing
    assert theta.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])
    assert z.grad.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    theta.grad = None
    Step.apply(z.detach(), theta, 0.1).sum().backward()
    assert theta.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])
