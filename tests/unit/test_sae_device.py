"""Training and inference on any device, and bf16 autocast: every tensor a step creates lives on its inputs' device.

No GPU exists in CI, so the device tests run under `torch._subclasses.fake_tensor.FakeTensorMode`: tensors
made there with `device="cuda"` carry only shape, dtype and device (no memory, no driver), every op runs its
fake (meta) kernel, and an op that mixes a fake CUDA tensor with a CPU one raises
`FakeTensorDeviceMismatchError` exactly where CUDA would raise "Expected all tensors to be on the same
device". A factory without `device=` in a step (what `sae/kernels.py`'s TopK backward did:
`torch.zeros(n_latents)`, `torch.arange(batch)`) therefore fails here as on a GPU. Ops without a fake kernel
(sparse matmul: `prisma_ray::sparse_encoder_grad` registers one) or that read values back to the host
(`bincount`, masked indexing, `if tensor:`) fail too, so a step that passes here also runs without host
syncs until latents can be dead. What fake tensors cannot check: numerics (the CPU autocast tests below),
and AuxK once latents are dead (finding them reads their number back: `objectives._dead_top`).
"""

from typing import get_args

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.config import K_ARCHITECTURES, Architecture
from prisma_ray.sae.kernels import gather_encode, sparse_decode
from prisma_ray.sae.synthetic import sparse_dictionary_data
from prisma_ray.sae.trainer import Normalization, SiteStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHITECTURES = get_args(Architecture)
SHAPES = {
    "sae": (Sites(inputs=(Site(name="h", width=8),)), False),
    "transcoder": (Sites(inputs=(Site(name="a", width=8),), outputs=(Site(name="b", width=6),)), False),
    "skip-transcoder": (Sites(inputs=(Site(name="a", width=8),), outputs=(Site(name="b", width=6),)), True),
    "crosscoder": (Sites(inputs=(Site(name="h", width=8, model="m1"), Site(name="h", width=8, model="m2"))), False),
}


def config(arch: str, **fields) -> DictionaryConfig:
    """`arch` with 24 latents, k=3 where it takes k, Matryoshka prefixes of a quarter, a half and all latents."""
    fields = {"d_sae": 24, **({"k": 3} if arch in K_ARCHITECTURES else {}), **fields}
    if arch == "matryoshka_batchtopk":
        fields.setdefault("matryoshka_widths", (fields["d_sae"] // 4, fields["d_sae"] // 2, fields["d_sae"]))
    return DictionaryConfig(architecture=arch, **fields)


def assert_on(trainer: Trainer, device_type: str) -> None:
    for name, d in trainer.dictionaries.items():
        for pname, p in d.named_parameters():
            assert p.device.type == device_type and p.dtype == torch.float32, (name, pname, p.device, p.dtype)
            assert p.grad is None, (name, pname)
            state = trainer.optimizers[name].state[p]
            assert state, (name, pname)
            for key, value in state.items():
                assert value.device.type == device_type, (name, pname, key, value.device)
                assert key == "step" or value.dtype == torch.float32, (name, pname, key, value.dtype)
        for bname, b in d.named_buffers():
            assert b.device.type == device_type, (name, bname, b.device)
        assert trainer.since_fired[name].device.type == device_type
        assert trainer.fire_counts[name].device.type == device_type


def run_backward(root: torch.Tensor, gradient: torch.Tensor | None = None) -> None:
    """`root.backward()`, node by node in Python: each node's backward (the same kernels) in dependency order,
    gradients checked against, cast and reduced to what the next node expects (the engine's `validate_outputs`),
    accumulated into the leaves' `.grad`.

    Why: since torch 2.11 the C++ autograd engine asks the CUDA driver about every CUDA device a graph
    touches (`hasPrimaryContext`), so `backward()` on fake CUDA tensors raises without a GPU before any
    backward kernel runs; this executor calls those kernels itself.
    """
    deps: dict = {}
    stack, seen = [root.grad_fn], {root.grad_fn}
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None:
                deps[nxt] = deps.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    buffers = {root.grad_fn: [torch.ones_like(root) if gradient is None else gradient]}
    ready = [root.grad_fn]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            metas = node._input_metadata
            grads = [
                torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                for g, m in zip(buffers.pop(node), metas)
            ]
            if type(node).__name__ == "AccumulateGrad":
                leaf = node.variable
                leaf.grad = grads[0] if leaf.grad is None else leaf.grad + grads[0]
                continue
            if hasattr(node, "_forward_cls"):  # a custom autograd.Function: one result per forward argument
                out = node.apply(*grads)
                out = [g for g, need in zip(out if isinstance(out, tuple) else (out,), node.needs_input_grad) if need]
                edges = [e for e in node.next_functions if e[0] is not None]
            else:
                out = node(*grads)
                out, edges = (out if isinstance(out, tuple) else (out,)), node.next_functions
            assert len(out) == len(edges), (node, len(out), len(edges))
            for (nxt, nr), g in zip(edges, out):
                if nxt is None:
                    continue
                buffer = buffers.setdefault(nxt, [None] * len(nxt._input_metadata))
                if g is not None:
                    meta = nxt._input_metadata[nr]
                    assert g.device == meta.device, f"{node.name()} made a gradient on {g.device}, not {meta.device}"
                    g = g.to(meta.dtype).sum_to_size(meta.shape)  # broadcast inputs get the reduced gradient
                    buffer[nr] = g if buffer[nr] is None else buffer[nr] + g
                deps[nxt] -= 1
                if deps[nxt] == 0:
                    ready.append(nxt)


@pytest.fixture
def cuda_autocast(monkeypatch):
    """Let `torch.autocast("cuda")` run without a driver (it disables itself with a warning otherwise), so that
    CUDA autocast's casts really run on the fake tensors; checked by a product coming out bfloat16."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.Tensor, "backward", run_backward)
    with FakeTensorMode(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = torch.randn(2, 2, device="cuda")
        assert (a @ a).dtype == torch.bfloat16


def fake_steps(configs: list[DictionaryConfig], sites: Sites, autocast: bool) -> Trainer:
    """`initialize` and two steps on fake CUDA: the first batch on the device, the second from the host."""
    trainer = Trainer(configs, sites, 4, device="cuda", autocast=autocast)
    assert trainer.device.type == "cuda"
    targets = None if sites.autoencoder else torch.randn(32, sites.d_out)
    trainer.initialize(torch.randn(32, sites.d_in), targets)
    trainer.train_step(torch.randn(32, sites.d_in, device="cuda"), None if targets is None else targets.to("cuda"))
    trainer.train_step(torch.randn(2, 16, sites.d_in), None if targets is None else targets.reshape(2, 16, -1))
    return trainer


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_steps_run_on_fake_cuda(arch, kind, autocast, cuda_autocast):
    sites, skip = SHAPES[kind]
    with FakeTensorMode():
        trainer = fake_steps([config(arch, skip_connection=skip)], sites, autocast)
        assert_on(trainer, "cuda")
        assert trainer.step == 2 and trainer.tokens == 64


def test_several_dictionaries_train_in_one_pass_on_fake_cuda_and_checkpoint_to_the_host(cuda_autocast):
    sites = SHAPES["sae"][0]
    configs = [config(arch) for arch in ARCHITECTURES]
    with FakeTensorMode():
        trainer = fake_steps(configs, sites, autocast=True)
        assert_on(trainer, "cuda")
        state = trainer.state_tensors()
        assert {t.device.type for t in state.values()} == {"cpu"}
        resumed = Trainer(configs, sites, 4, device="cuda", autocast=True)
        resumed.load_state(state, trainer.state_meta())
        resumed.train_step(torch.randn(32, sites.d_in))
        assert_on(resumed, "cuda")


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_runs_on_fake_cuda(arch, kind, cuda_autocast):
    sites, skip = SHAPES[kind]
    with FakeTensorMode():
        d = Dictionary(config(arch, skip_connection=skip), sites, device="cuda")
        assert {t.device.type for t in (*d.parameters(), *d.buffers())} == {"cuda"}
        x = torch.randn(2, 5, sites.d_in, device="cuda")
        z = d.encode(x)
        outputs = (z, d.decode(z), d(x))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs += (d(x),)
        assert [t.device.type for t in outputs] == ["cuda"] * 4
        assert z.shape == (2, 5, 24) and d(x).shape == (2, 5, sites.d_out)


def test_topk_backward_runs_on_fake_cuda():
    """The kernel itself: the TopK backward's index tensors and accumulators are made on the gradient's device
    (before: `torch.zeros(n_latents)` and `torch.arange(batch)` on the CPU, FakeTensorDeviceMismatchError)."""
    with FakeTensorMode():
        W_enc = torch.randn(8, 24, device="cuda", requires_grad=True)
        b_enc = torch.zeros(24, device="cuda", requires_grad=True)
        b_pre = torch.zeros(8, device="cuda", requires_grad=True)
        centered = torch.randn(16, 8, device="cuda")
        pre = centered @ W_enc.detach() + b_enc.detach()
        idx = pre.topk(3, dim=1).indices
        values = gather_encode(centered, b_pre, W_enc, b_enc, idx, pre)
        run_backward(sparse_decode(idx, values, torch.randn(24, 8, device="cuda")).sum())
        assert [t.grad.device.type for t in (W_enc, b_enc, b_pre)] == ["cuda"] * 3


def test_sparse_encoder_grad_passes_opcheck_and_equals_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 12, (6, 3), generator=gen)
    grad = torch.randn(6, 3, generator=gen)
    centered = torch.randn(6, 5, generator=gen)
    op = torch.ops.prisma_ray.sparse_encoder_grad.default
    torch.library.opcheck(op, (idx, grad, centered, 12))

    def dense(grad):
        G = torch.zeros(6, 12).index_put_((torch.arange(6)[:, None].expand(6, 3), idx), grad, accumulate=True)
        return G.t() @ centered

    assert torch.allclose(op(idx, grad, centered, 12), dense(grad), atol=1e-6)
    # a bfloat16 gradient (autocast) is accumulated in centered's float32
    half = op(idx, grad.bfloat16(), centered, 12)
    assert half.dtype == torch.float32
    assert torch.allclose(half, dense(grad.bfloat16().float()), atol=1e-6)


def test_sparse_decode_takes_bfloat16_values_under_autocast():
    idx = torch.tensor([[0, 2], [1, 3]])
    W_dec = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = torch.randn(2, 4) @ torch.randn(4, 2)
        assert values.dtype == torch.bfloat16
        out = sparse_decode(idx, values, W_dec)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (values.float()[:, :, None] * W_dec[idx]).sum(1))


D, FEATURES, ACTIVE = 16, 32, 3


@pytest.fixture(scope="module")
def data():
    return sparse_dictionary_data(6_000, D, FEATURES, ACTIVE, seed=3)


def cpu_run(data, cfg: DictionaryConfig, autocast: bool, steps: int = 45, batch: int = 128):
    sites = Sites(inputs=(Site(name="h", width=D),))
    norm = Normalization.from_stats([SiteStats.of(data.acts)], None, "center_scale")
    trainer = Trainer([cfg], sites, steps, norm, autocast=autocast)
    trainer.initialize(data.acts[:batch])
    for i in range(steps):
        trainer.train_step(data.acts[i * batch : (i + 1) * batch])
    return trainer, trainer.metrics()


# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) in the encoder and decoder products; over
# 45 Adam steps that moved the run's explained variance (0.35 to 0.51 here) by at most 2e-4 (measured, every
# architecture); 0.01 leaves room for other CPUs' bfloat16 kernels while catching a broken precision path.
EV_TOLERANCE = 0.01


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cpu_autocast_trains_every_architecture_close_to_float32(data, arch):
    # dead after one batch unfired, so that AuxK (topk, (matryoshka) batchtopk) runs under autocast too; k=3 = ACTIVE
    cfg = config(arch, d_sae=48, lr=3e-3, dead_after_tokens=128, **({"l1_coefficient": 0.5} if arch == "relu" else {}))
    exact, exact_metrics = cpu_run(data, cfg, autocast=False)
    mixed, mixed_metrics = cpu_run(data, cfg, autocast=True)
    name = cfg.display_name()
    assert_on(mixed, "cpu")  # parameters and Adam state float32
    assert all(torch.isfinite(torch.tensor(v)) for k, v in mixed_metrics.items() if k.startswith(name))
    ev, ev_exact = mixed_metrics[f"{name}/explained_variance"], exact_metrics[f"{name}/explained_variance"]
    assert ev_exact > 0.3, ev_exact  # it learned something: the comparison is not between two failures
    if arch in K_ARCHITECTURES:
        assert f"{name}/aux" in mixed_metrics
    assert abs(ev - ev_exact) <= EV_TOLERANCE, (ev, ev_exact)
