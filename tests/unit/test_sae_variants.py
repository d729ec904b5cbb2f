"""Each dictionary variant recovers a known sparse dictionary; the sparse TopK gradients are exact."""

import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, Trainer
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
        DictionaryConfig(architecture="matryoshka_batchtopk", k=ACTIVE, matryoshka_widths=(16, 32, 64)),
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


MATRYOSHKA = DictionaryConfig(architecture="matryoshka_batchtopk", k=4, d_sae=40, matryoshka_widths=(5, 15, 40))


def test_matryoshka_loss_sums_the_prefix_reconstructions():
    """Each prefix `[0, width)` reconstructs the input from its own latents (SAELens: `inner_mse_loss_{width}`),
    the whole dictionary is `mse`, and the loss is their sum (plus AuxK)."""
    torch.manual_seed(0)
    sites = Sites(inputs=(Site(name="h", width=16),))
    d = Trainer([MATRYOSHKA], sites, 10).first
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_()
    x = torch.randn(64, 16)
    out = objective(d, x, x, None, 0.0)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in d.named_parameters()}
    d.zero_grad()
    # the reference, written densely: the same BatchTopK selection, each prefix decoded on its own
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    with torch.no_grad():
        kept = torch.zeros(64 * 40).index_fill_(0, pre.relu().flatten().topk(4 * 64).indices, 1.0).view(64, 40)
    z = kept * pre.relu()
    expected = {
        name: (z[:, :width] @ d.W_dec[:width] + d.b_dec - x).pow(2).sum(1).mean()
        for name, width in (("inner_mse_5", 5), ("inner_mse_15", 15), ("mse", 40))
    }
    assert set(out.parts) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.parts[name], value.detach(), msg=name)
    torch.testing.assert_close(out.prediction, (z @ d.W_dec + d.b_dec).detach())
    sum(expected.values()).backward(retain_graph=True)
    for name, p in d.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # the inner prefixes' latents get more than BatchTopK's gradient, the outer ones only its
    d.zero_grad()
    expected["mse"].backward()
    assert not torch.allclose(grads["W_dec"][:15], d.W_dec.grad[:15])
    torch.testing.assert_close(grads["W_dec"][15:], d.W_dec.grad[15:], rtol=1e-4, atol=1e-5)


def test_matryoshka_with_one_width_trains_exactly_as_batchtopk():
    sites = Sites(inputs=(Site(name="h", width=D),))
    data = sparse_dictionary_data(4096, D, FEATURES, ACTIVE, seed=3)
    common = {"k": ACTIVE, "d_sae": 64, "lr": 3e-3, "dead_after_tokens": 512}  # AuxK runs too
    one = DictionaryConfig(architecture="matryoshka_batchtopk", matryoshka_widths=(64,), **common)
    batchtopk = DictionaryConfig(architecture="batchtopk", **common)
    norm = Normalization.from_stats([SiteStats.of(data.acts)], None, "center_scale")
    trainers = [Trainer([cfg], sites, 30, norm) for cfg in (one, batchtopk)]
    for trainer in trainers:
        trainer.initialize(data.acts[:128])
        for i in range(30):
            trainer.train_step(data.acts[i * 128 : (i + 1) * 128])
    metrics = [t.metrics() for t in trainers]
    assert metrics[0][f"{one.display_name()}/aux"] > 0
    a, b = (t.first.state_dict() for t in trainers)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"matryoshka_widths": None}, "needs matryoshka_widths"),
        ({"matryoshka_widths": (10, 10, 40)}, "strictly increasing"),
        ({"matryoshka_widths": (20, 10, 40)}, "strictly increasing"),
        ({"matryoshka_widths": (0, 40)}, "positive"),
        ({"matryoshka_widths": ()}, "at least 1"),
    ],
)
def test_matryoshka_widths_are_validated(fields, match):
    with pytest.raises(ValueError, match=match):
        DictionaryConfig(**{**MATRYOSHKA.model_dump(), **fields})


def test_matryoshka_widths_must_end_at_the_number_of_latents():
    sites = Sites(inputs=(Site(name="h", width=8),))
    cfg = MATRYOSHKA.model_copy(update={"d_sae": None, "expansion_factor": 4})  # 32 latents, widths end at 40
    with pytest.raises(InvalidRequest, match="must be its number of latents, 32"):
        Dictionary(cfg, sites)
    with pytest.raises(ValueError, match="matryoshka_widths applies to architecture matryoshka_batchtopk"):
        DictionaryConfig(architecture="batchtopk", matryoshka_widths=(8, 32))
