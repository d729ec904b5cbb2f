"""Checkpoints: SAELens 6 layout, exact round trips, folded normalisation, no unpickling."""

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prisma_ray.errors import InvalidRequest, PrismaRayError
from prisma_ray.evaluate import read_checkpoint_info
from prisma_ray.sae import (
    Dictionary,
    DictionaryConfig,
    Site,
    Sites,
    Trainer,
    export_files,
    load_dictionary,
    load_sparsity,
    write_files,
)
from prisma_ray.sae.io import CheckpointFileError, checkpoint_files, latest_checkpoint_state, restore_checkpoint
from prisma_ray.sae.trainer import Normalization, check_same_run

SAE = Sites(inputs=(Site(name="blocks.3.hook_resid_post", width=12, model="toy"),))
CROSS = Sites(inputs=(Site(name="blocks.2.hook_resid_post", width=12), Site(name="blocks.3.hook_resid_post", width=8)))
TRANSCODER = Sites(
    inputs=(Site(name="blocks.3.hook_mlp_in", width=12),), outputs=(Site(name="blocks.3.hook_mlp_out", width=10),)
)
SAELENS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-saelens" / "bin" / "python"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(cfg: DictionaryConfig, sites: Sites, steps: int = 6) -> Trainer:
    """A trainer after a few steps on random data with a non-trivial normalisation."""
    gen = torch.Generator().manual_seed(0)
    in_norm = (torch.randn(sites.d_in, generator=gen), torch.rand(sites.d_in, generator=gen) + 0.5)
    out_norm = (torch.randn(sites.d_out, generator=gen), torch.rand(sites.d_out, generator=gen) + 0.5)
    norm = Normalization(*in_norm) if sites.autoencoder else Normalization(*in_norm, *out_norm)
    trainer = Trainer([cfg], sites, steps, norm)
    x = torch.randn(64, sites.d_in, generator=gen) * 3 + 1
    y = None if sites.autoencoder else torch.randn(64, sites.d_out, generator=gen)
    trainer.initialize(x, y)
    for _ in range(steps):
        trainer.train_step(x, y)
    return trainer


MATRYOSHKA = DictionaryConfig(architecture="matryoshka_batchtopk", d_sae=24, k=4, matryoshka_widths=(4, 12, 24))
CASES = [
    (DictionaryConfig(architecture="relu", d_sae=24), SAE, "standard"),
    (DictionaryConfig(architecture="topk", d_sae=24, k=4), SAE, "topk"),
    (DictionaryConfig(architecture="batchtopk", d_sae=24, k=4), SAE, "jumprelu"),
    (DictionaryConfig(architecture="jumprelu", d_sae=24), SAE, "jumprelu"),
    (DictionaryConfig(architecture="gated", d_sae=24), SAE, "gated"),
    (DictionaryConfig(architecture="topk", d_sae=24, k=4), CROSS, "topk"),
    (DictionaryConfig(architecture="relu", d_sae=24), TRANSCODER, "transcoder"),
    (DictionaryConfig(architecture="relu", d_sae=24, skip_connection=True), TRANSCODER, "skip_transcoder"),
    (DictionaryConfig(architecture="jumprelu", d_sae=24, skip_connection=True), TRANSCODER, "jumprelu_skip_transcoder"),
    (DictionaryConfig(architecture="topk", d_sae=24, k=4), TRANSCODER, "topk_transcoder"),
    (DictionaryConfig(architecture="gated", d_sae=24), TRANSCODER, "gated_transcoder"),
    (MATRYOSHKA, SAE, "jumprelu"),
    (MATRYOSHKA, CROSS, "jumprelu"),
    (MATRYOSHKA, TRANSCODER, "jumprelu_transcoder"),
    (MATRYOSHKA.model_copy(update={"skip_connection": True}), TRANSCODER, "jumprelu_skip_transcoder"),
]


@pytest.mark.parametrize("cfg,sites,arch", CASES, ids=[f"{c.architecture}-{s.kind}-{a}" for c, s, a in CASES])
def test_export_reloads_to_the_same_function(tmp_path, cfg, sites, arch):
    trainer = trained(cfg, sites)
    d = trainer.first
    write_files(export_files(d, trainer.fire_counts[cfg.display_name()], trainer.tokens), str(tmp_path))
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert saved["architecture"] == arch and saved["normalize_activations"] == "none"
    loaded = load_dictionary(str(tmp_path))
    x = torch.randn(32, sites.d_in) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), d(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.encode(x), d.encode(x), rtol=1e-4, atol=1e-4)
    assert loaded.sites == sites
    # a second export of the loaded dictionary is byte-identical: the round trip is exact
    assert export_files(loaded)["sae_weights.safetensors"] == (tmp_path / "sae_weights.safetensors").read_bytes()


def test_cfg_and_weights_follow_saelens_6(tmp_path):
    trainer = trained(DictionaryConfig(architecture="topk", d_sae=24, k=4), SAE)
    write_files(export_files(trainer.first, trainer.fire_counts["topk-k-4"], trainer.tokens), str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert {
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
        "k",
        "rescale_acts_by_decoder_norm",
    } <= set(cfg)
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 24 and cfg["k"] == 4 and cfg["apply_b_dec_to_input"] is True
    assert (
        cfg["metadata"]["sae_lens_version"].startswith("6.")
        and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    )
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (12, 24),
        "W_dec": (24, 12),
        "b_enc": (24,),
        "b_dec": (12,),
    }
    sparsity = load_sparsity(str(tmp_path))
    assert sparsity.shape == (24,) and float(sparsity.max()) <= 0


def test_batchtopk_threshold_is_saved_with_the_weights(tmp_path):
    trainer = trained(DictionaryConfig(architecture="batchtopk", d_sae=24, k=4), SAE)
    learned = float(trainer.first.topk_threshold)
    assert learned > 0
    write_files(export_files(trainer.first), str(tmp_path))
    weights = load_file(tmp_path / "sae_weights.safetensors")
    torch.testing.assert_close(weights["threshold"], torch.full((24,), learned))


def test_loading_never_unpickles(tmp_path):
    trainer = trained(DictionaryConfig(architecture="relu", d_sae=24), SAE)
    write_files(export_files(trainer.first), str(tmp_path))
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": Payload()}))
    with pytest.raises(CheckpointFileError, match=rf"{tmp_path}/sae_weights.safetensors: not a readable safetensors"):
        load_dictionary(str(tmp_path))
    assert not marker.exists()


def test_a_truncated_weights_file_is_named_in_the_error(tmp_path):
    trainer = trained(DictionaryConfig(architecture="relu", d_sae=24), SAE)
    write_files(export_files(trainer.first), str(tmp_path))
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointFileError, match=rf"{weights}: not a readable safetensors file"):
        load_dictionary(str(tmp_path))


def test_a_saelens_cfg_without_our_metadata_loads(tmp_path):
    trainer = trained(DictionaryConfig(architecture="jumprelu", d_sae=24), SAE)
    files = export_files(trainer.first)
    cfg = json.loads(files["cfg.json"])
    del cfg["metadata"]["prisma_ray"]
    files["cfg.json"] = json.dumps(cfg).encode()
    write_files(files, str(tmp_path))
    loaded = load_dictionary(str(tmp_path))
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trainer.first(x), rtol=1e-4, atol=1e-4)
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations"):
        load_dictionary(str(tmp_path))


def saelens_layout(d: Dictionary, uri: Path, drop: tuple[str, ...] = ()) -> str:
    """Export `d` to `uri` as SAELens writes it: no `metadata.prisma_ray`, and without the metadata keys `drop`."""
    files = export_files(d)
    cfg = json.loads(files["cfg.json"])
    for key in ("prisma_ray", *drop):
        del cfg["metadata"][key]
    files["cfg.json"] = json.dumps(cfg).encode()
    write_files(files, str(uri))
    return str(uri)


@pytest.mark.parametrize("cfg,sites,arch", CASES, ids=[f"{c.architecture}-{s.kind}-{a}" for c, s, a in CASES])
def test_discovery_describes_what_loading_builds(tmp_path, cfg, sites, arch):
    """One reader of cfg.json: the sites and config discovery reports are those of the loaded dictionary."""

    def of_toy(group: tuple[Site, ...]) -> tuple[Site, ...]:
        return tuple(site.model_copy(update={"model": "toy"}) for site in group)

    d = Dictionary(cfg, Sites(inputs=of_toy(sites.inputs), outputs=of_toy(sites.outputs)))
    write_files(export_files(d), str(tmp_path / "ours"))
    for uri in (str(tmp_path / "ours"), saelens_layout(d, tmp_path / "saelens")):
        info, loaded = read_checkpoint_info(uri), load_dictionary(uri)
        assert (info.sites, info.config) == (loaded.sites, loaded.cfg), uri
        assert info.sites.autoencoder == sites.autoencoder, "a transcoder is discovered as one"
    assert info.architecture == loaded.cfg.architecture and info.name == "saelens"


def test_a_saelens_transcoder_without_its_output_hook_is_refused(tmp_path):
    """`"architecture": "transcoder"` without `metadata.hook_name_out`: neither loaded nor discovered as an SAE."""
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=24), TRANSCODER)
    uri = saelens_layout(d, tmp_path / "tc", drop=("hook_name_out",))
    for read in (read_checkpoint_info, load_dictionary):
        with pytest.raises(PrismaRayError, match=rf"{uri}.*metadata\.hook_name_out"):
            read(uri)


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    """Training 4 + 4 steps across a checkpoint equals 8 uninterrupted steps, bit for bit."""
    cfgs = [
        DictionaryConfig(architecture="topk", d_sae=24, k=4, dead_after_tokens=100),
        DictionaryConfig(architecture="jumprelu", d_sae=24),
    ]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 12, generator=gen) for _ in range(8)]

    def fresh():
        t = Trainer(cfgs, SAE, 8)
        t.initialize(batches[0])
        return t

    straight = fresh()
    for b in batches:
        straight.train_step(b)
    first = fresh()
    for b in batches[:4]:
        first.train_step(b)
    write_files(checkpoint_files(first), str(tmp_path))
    resumed = Trainer(cfgs, SAE, 8)
    restore_checkpoint(resumed, str(tmp_path))
    assert resumed.step == 4 and resumed.tokens == 4 * 32
    for b in batches[4:]:
        resumed.train_step(b)
    expected, got = straight.state_tensors(), resumed.state_tensors()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (tmp_path / "topk-k-4" / "cfg.json").exists(), "a checkpoint also holds every dictionary exported"


def test_a_dictionary_cannot_take_the_name_of_a_trainer_state_file(tmp_path):
    """A checkpoint holds the trainer state files beside one directory per dictionary: their names are taken."""
    trainer = Trainer([DictionaryConfig(architecture="topk", d_sae=24, k=4, name="trainer_state.json")], SAE, 1)
    with pytest.raises(PrismaRayError, match=r"\['trainer_state.json'\] .* trainer state"):
        checkpoint_files(trainer)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    trainer = trained(DictionaryConfig(architecture="topk", d_sae=24, k=4), SAE, steps=1)
    write_files(checkpoint_files(trainer), str(tmp_path))
    other = Trainer([DictionaryConfig(architecture="topk", d_sae=24, k=5, name="topk-k-4")], SAE, 1)
    with pytest.raises(ValueError, match="other dictionaries"):
        restore_checkpoint(other, str(tmp_path))


@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="SAELens venv (.venv-saelens) not installed")
@pytest.mark.slow
def test_saelens_loads_our_checkpoints(tmp_path):
    """SAELens 6's own loader gives the same outputs as ours, for each architecture it knows."""
    known = [
        case
        for case in CASES
        if case[2]
        in ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_skip_transcoder")
    ]
    x = torch.randn(16, 20) * 3 + 1
    torch.save(x, tmp_path / "x.pt")
    for i, (cfg, sites, _) in enumerate(known):
        trainer = trained(cfg, sites)
        write_files(export_files(trainer.first), str(tmp_path / str(i)))
        with torch.no_grad():
            torch.save(trainer.first(x[:, : sites.d_in]), tmp_path / f"{i}.expected.pt")
    script = f"""
import torch
from sae_lens import SAE
x = torch.load({str(tmp_path / "x.pt")!r})
for i in range({len(known)}):
    sae = SAE.load_from_disk({str(tmp_path)!r} + f"/{{i}}")
    out = sae(x[:, : sae.cfg.d_in])
    expected = torch.load({str(tmp_path)!r} + f"/{{i}}.expected.pt")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    print("ok", i, type(sae).__name__)
"""
    result = subprocess.run([str(SAELENS_PYTHON), "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == len(known)


def test_a_checkpoint_of_changed_settings_names_the_dictionary_and_its_path(tmp_path):
    trainer = trained(DictionaryConfig(architecture="topk", d_sae=24, k=4), SAE, steps=1)
    assert latest_checkpoint_state(str(tmp_path / "run")) is None
    write_files(checkpoint_files(trainer), str(tmp_path / "run" / "checkpoint_000000001"))
    where, meta = latest_checkpoint_state(str(tmp_path / "run"))
    assert where == str(tmp_path / "run" / "checkpoint_000000001") and meta["step"] == 1
    check_same_run(meta, [DictionaryConfig(architecture="topk", d_sae=24, k=4)], SAE)
    with pytest.raises(InvalidRequest, match=r"checkpoint X was .* \(settings of topk-k-4\); resume"):
        check_same_run(meta, [DictionaryConfig(architecture="topk", d_sae=24, k=4, lr=1e-2)], SAE, "X")
    with pytest.raises(InvalidRequest, match=r"\(the input/output sites \(stores, hooks or widths\)\)"):
        check_same_run(meta, [DictionaryConfig(architecture="topk", d_sae=24, k=4)], CROSS)
