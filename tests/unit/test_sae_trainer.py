"""The per-step trainer: several dictionaries per pass, schedules, dead latents, normalisation, configs."""

import pytest
import torch
import yaml

from prisma_ray.config import ConfigError, load_config
from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.init import geometric_median
from prisma_ray.sae.schedule import lr_factor, warmup_factor
from prisma_ray.sae.trainer import Normalization, SiteStats
from prisma_ray.train.config import TrainConfig

SITES = Sites(inputs=(Site(name="h", width=8),))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batches(n: int, width: int = 8, rows: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=gen) for _ in range(n)]


def test_several_dictionaries_per_pass_train_as_if_alone():
    cfgs = [
        DictionaryConfig(architecture="topk", d_sae=16, k=2),
        DictionaryConfig(architecture="relu", d_sae=16, lr=1e-3),
    ]
    data = batches(5)
    together = Trainer(cfgs, SITES, 5)
    together.initialize(data[0])
    for b in data:
        together.train_step(b)
    for cfg in cfgs:
        alone = Trainer([cfg], SITES, 5)
        alone.initialize(data[0])
        for b in data:
            alone.train_step(b)
        for key, value in alone.first.state_dict().items():
            torch.testing.assert_close(together.dictionaries[cfg.display_name()].state_dict()[key], value, msg=key)


def test_metrics_report_loss_parts_explained_variance_l0_dead_fraction_and_lr():
    trainer = Trainer([DictionaryConfig(architecture="relu", d_sae=16, l1_coefficient=0.1, lr=1e-2)], SITES, 100)
    b = batches(1)[0]
    trainer.initialize(b)
    for _ in range(20):
        trainer.train_step(b)
    trainer.metrics()
    for _ in range(4):
        trainer.train_step(b)
    m = trainer.metrics()
    name = "relu-l1-0.1"
    assert m["step"] == 24 and m["tokens"] == 24 * 32 and m["tokens_per_s"] > 0
    assert m[f"{name}/loss"] == pytest.approx(m[f"{name}/mse"] + m[f"{name}/l1"])
    assert 0 < m[f"{name}/explained_variance"] < 1 and m[f"{name}/l0"] > 0
    assert m[f"{name}/dead_fraction"] == 0 and m[f"{name}/lr"] == pytest.approx(1e-2)
    assert f"{name}/loss" not in trainer.metrics(), "a new window starts after each call"


@pytest.mark.parametrize("name", ["steps", "tokens", "start", "step", "tokens_per_s", "resumed_from", "error", "l0"])
def test_any_valid_dictionary_name_trains_and_reports_its_own_metrics(name):
    """Dictionary names and the run's counters live in separate key spaces. Reported keys cannot collide
    either: a dictionary reports `{name}/{metric}`, the run (and `train.job`) keys without `/`
    (`step`, `tokens`, `tokens_per_s`, `resumed_from`), and a name cannot hold `/` (`DictionaryConfig.name`)."""
    cfgs = [
        DictionaryConfig(architecture="relu", d_sae=16, name=name),
        DictionaryConfig(architecture="topk", d_sae=16, k=2),
    ]
    trainer = Trainer(cfgs, SITES, 3)
    b = batches(1)[0]
    trainer.initialize(b)
    for _ in range(3):
        trainer.train_step(b)
    m = trainer.metrics()
    assert {k for k in m if "/" not in k} == {"step", "tokens", "tokens_per_s"}
    assert (m["step"], m["tokens"]) == (3, 3 * 32) and m["tokens_per_s"] > 0
    assert m[f"{name}/loss"] == pytest.approx(m[f"{name}/mse"] + m[f"{name}/l1"]) and m[f"{name}/l0"] > 0
    assert m["topk-k-2/loss"] > 0
    with pytest.raises(ValueError, match="name"):
        DictionaryConfig(name=f"{name}/loss")


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"])
def test_loss_parts_never_shadow_the_derived_metrics(arch):
    """The loss parts are reported beside `loss`, `explained_variance`, `l0`, `dead_fraction` and `lr`:
    `loss` is the sum of the parts reported, so none of them was overwritten."""
    derived = {"loss", "explained_variance", "l0", "dead_fraction", "lr"}
    k = {"k": 2} if arch in ("topk", "batchtopk") else {}
    if arch == "matryoshka_batchtopk":
        k = {"k": 2, "matryoshka_widths": (4, 16)}
    trainer = Trainer([DictionaryConfig(architecture=arch, d_sae=16, name="d", dead_after_tokens=32, **k)], SITES, 2)
    for b in batches(2):
        trainer.train_step(b)
    m = trainer.metrics()
    parts = {k.split("/", 1)[1] for k in m if k.startswith("d/")} - derived
    assert "mse" in parts and m["d/loss"] == pytest.approx(sum(m[f"d/{p}"] for p in parts))


def test_dead_latents_are_counted_in_tokens():
    cfg = DictionaryConfig(architecture="topk", d_sae=16, k=1, dead_after_tokens=64, lr=1e-9)
    trainer = Trainer([cfg], SITES, 10)
    b = batches(1)[0][:1].expand(32, 8)  # one token repeated: a single latent fires
    trainer.train_step(b)
    fired = trainer.since_fired["topk-k-1"] == 0
    assert int(fired.sum()) == 1
    assert not trainer.dead("topk-k-1").any()
    trainer.train_step(b)  # 64 tokens seen: the latents that never fired are now dead
    assert torch.equal(trainer.dead("topk-k-1"), ~fired)
    assert trainer.metrics()["topk-k-1/dead_fraction"] == pytest.approx(float((~fired).float().mean()))


def test_firing_counts_are_summed_over_workers():
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        t.mul_(2)  # as if a second worker saw the same batch

    trainer = Trainer(
        [DictionaryConfig(architecture="topk", d_sae=16, k=2)], SITES, 10, world_size=2, all_reduce=all_reduce
    )
    trainer.train_step(batches(1)[0])
    assert len(calls) == 1 and trainer.tokens == 64
    assert float(trainer.fire_counts["topk-k-2"].sum()) == 2 * 32 * 2


def test_unit_norm_decoder_is_kept_and_free_decoder_is_not_renormalised():
    unit = DictionaryConfig(architecture="topk", d_sae=16, k=2, lr=1e-2)
    free = DictionaryConfig(architecture="relu", d_sae=16, lr=1e-2)
    trainer = Trainer([unit, free], SITES, 10)
    assert torch.allclose(trainer.dictionaries["relu-l1-5"].W_dec.norm(dim=1), torch.full((16,), 0.1))
    for b in batches(5):
        trainer.train_step(b)
    torch.testing.assert_close(trainer.dictionaries["topk-k-2"].W_dec.norm(dim=1), torch.ones(16))
    assert not torch.allclose(trainer.dictionaries["relu-l1-5"].W_dec.norm(dim=1), torch.full((16,), 0.1))


def test_tied_init_and_crosscoder_penalty_sums_decoder_norms_over_sources():
    sites = Sites(inputs=(Site(name="a", width=4), Site(name="b", width=6)))
    trainer = Trainer([DictionaryConfig(architecture="relu", d_sae=8)], sites, 1)
    d = trainer.first
    torch.testing.assert_close(d.W_enc, d.W_dec.t())
    expected = d.W_dec[:, :4].norm(dim=1) + d.W_dec[:, 4:].norm(dim=1)
    torch.testing.assert_close(d.decoder_norms(), expected)


def test_lr_warmup_and_decay():
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.2) == 1.0 and lr_factor(50, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, 0.0) == 1.0
    assert warmup_factor(4, 10) == pytest.approx(0.5) and warmup_factor(20, 10) == 1.0 and warmup_factor(0, 0) == 1.0


def test_sparsity_coefficient_warms_up():
    cfg = DictionaryConfig(architecture="relu", d_sae=16, l1_coefficient=1.0, sparsity_warmup_steps=4)
    trainer = Trainer([cfg], SITES, 10)
    b = batches(1)[0]
    with torch.no_grad():
        expected = 0.25 * float((trainer.first.encode(b) * trainer.first.decoder_norms()).sum(1).mean())
    trainer.train_step(b)
    assert trainer.metrics()["relu-l1-1/l1"] == pytest.approx(expected, rel=1e-5)


def test_input_normalisation_from_stats_is_undone_on_decode():
    x = torch.randn(4096, 8) * torch.linspace(1, 20, 8) + 50
    norm = Normalization.from_stats([SiteStats.of(x)], None, "center_scale")
    trainer = Trainer([DictionaryConfig(architecture="topk", d_sae=16, k=2)], SITES, 1, norm)
    d = trainer.first
    x_n = d.normalize_in(x)
    assert float(x_n.pow(2).sum(1).mean()) == pytest.approx(8, rel=0.05)
    assert float(x_n.mean()) == pytest.approx(0, abs=0.05)
    with torch.no_grad():
        assert float(d.decode(torch.zeros(1, 16)).mean()) == pytest.approx(50, rel=0.05), "output in raw units"
    scaled = Normalization.from_stats([SiteStats.of(x)], None, "scale")
    assert float(((x * scaled.in_scale).norm(dim=1)).mean()) == pytest.approx(8**0.5, rel=1e-3)


def test_geometric_median_ignores_outliers():
    points = torch.cat([torch.randn(200, 3) * 0.01 + 1.0, torch.full((20, 3), 1000.0)])
    assert torch.allclose(geometric_median(points), torch.ones(3), atol=0.05)
    trainer = Trainer(
        [DictionaryConfig(architecture="topk", d_sae=16, k=2)], Sites(inputs=(Site(name="h", width=3),)), 1
    )
    trainer.initialize(points)
    assert torch.allclose(trainer.first.b_dec, torch.ones(3), atol=0.05)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"architecture": "relu", "k": 4}, "k applies to architecture topk or batchtopk"),
        ({"architecture": "topk", "l1_coefficient": 1.0}, "l1_coefficient applies to"),
        ({"architecture": "rbf"}, "architecture"),
        ({"name": "a/b"}, "name"),
        ({"lr": -1}, "lr"),
    ],
)
def test_bad_dictionary_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        DictionaryConfig(**fields)


def test_dictionary_that_cannot_fit_the_data_is_refused():
    with pytest.raises(ValueError, match="k=64 exceeds its 16 latents"):
        Trainer([DictionaryConfig(architecture="topk", k=64, d_sae=16)], SITES, 1)
    with pytest.raises(ValueError, match="skip_connection is for transcoders"):
        Trainer([DictionaryConfig(architecture="relu", skip_connection=True)], SITES, 1)
    with pytest.raises(ValueError, match="unique"):
        Trainer([DictionaryConfig(), DictionaryConfig()], SITES, 1)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"steps": 10, "tokens": 100}, "steps or tokens, not both"),
        ({"batch_size": 100, "workers": 3}, "divisible by workers"),
        ({"dictionaries": [{"architecture": "relu", "skip_connection": True}]}, "set data.targets"),
        ({"dictionaries": [{}, {}]}, "names must be unique"),
        ({"dictionaries": [{"name": "trainer_state.json"}]}, r"\['trainer_state.json'\] .* trainer state"),
        ({"dictionaries": [{"architecture": "topk", "l1_coefficient": 2}]}, "dictionaries.0"),
        ({"data": {"inputs": ["a", "a"]}}, "appears twice"),
        ({"data": {"kinds": ["pixels"]}}, "data.kinds"),
        ({"workers": -1}, "workers"),
    ],
)
def test_bad_train_config_is_a_clear_error(tmp_path, config, message):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TrainConfig, path)
    assert "TrainConfig" in str(info.value) and str(path) in str(info.value)


def test_train_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "name: sweep\nruns: s3://bucket/runs\ndata:\n  inputs: [s3://bucket/acts/blocks.6.hook_resid_post/train]\n"
        "dictionaries:\n  - {architecture: topk, k: 16}\n  - {architecture: topk, k: 32}\n  - {architecture: relu}\n"
    )
    cfg = load_config(TrainConfig, path, ["batch_size=1024", "workers=2"])
    assert [d.display_name() for d in cfg.dictionaries] == ["topk-k-16", "topk-k-32", "relu-l1-5"]
    assert cfg.batch_size == 1024 and cfg.workers == 2
    assert cfg.output_uri == "s3://bucket/runs/sweep/dictionaries"


def test_token_kind_codes_match_the_model_token_kinds():
    from prisma_ray.models.spec import TokenKind
    from prisma_ray.store import KIND_CODES

    assert KIND_CODES == {k.name.lower(): int(k) for k in TokenKind}
