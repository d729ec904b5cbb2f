"""Importing published dictionaries (ViT-Prisma, SAELens, sparsify): same function, our names, and
pickled files read without running anything from them."""

import collections
import json
import os
import pickle
import uuid
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from prisma_ray.cli import main
from prisma_ray.sae import load_dictionary, load_sparsity
from prisma_ray.sae.importers import CheckpointImportError, ImportConfig, UnsafePickleError, import_dictionary
from prisma_ray.sae.importers.names import hook_name, module_hooks, registry_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE, K = 8, 32, 4
CLIP_B32 = "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter_(1, idx, values.relu())


def f64(state: dict) -> dict:
    return {k: v.double() for k, v in state.items()}


def check_same_function(d, encode, forward) -> None:
    """`d` (our loaded dictionary, its float32 weights run in float64) against the source formulas
    on the source weights in float64: they differ only by the float32 rounding of folded weights."""
    x = rand(64, D_IN, seed=99).double() * 4 + 1
    with torch.no_grad():
        torch.testing.assert_close(d.double().encode(x), encode(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d(x), forward(x), rtol=1e-6, atol=1e-6)


def imported(tmp_path, src, **kwargs):
    result = import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out"), **kwargs))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    return result, load_dictionary(str(tmp_path / "out")), cfg


# --- ViT-Prisma ---------------------------------------------------------------------------------


def vit_prisma_dir(path, *, cfg: dict, state: dict, weights_name: str = "weights.pt"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({"d_in": D_IN, "expansion_factor": D_SAE // D_IN, "d_sae": None, "model_name": CLIP_B32, **cfg})
    )
    torch.save(collections.OrderedDict(state), path / weights_name)
    return path


def sae_state(d_out: int = D_IN, seed: int = 0) -> dict:
    return {
        "W_enc": rand(D_IN, D_SAE, seed=seed),
        "W_dec": rand(D_SAE, d_out, seed=seed + 1),
        "b_enc": rand(D_SAE, seed=seed + 2),
        "b_dec": rand(D_IN, seed=seed + 3),
    }


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_vit_prisma_sae(tmp_path, activation):
    s = {**sae_state(), "threshold": rand(D_SAE, seed=4).abs()} if activation == "jumprelu" else sae_state()
    cfg = {
        "hook_point_layer": 9,
        "layer_subtype": "hook_resid_post",
        "activation_fn_str": activation,
        "activation_fn_kwargs": {"k": K} if activation == "topk" else {},
        "normalize_activations": "none",
        "architecture": "jumprelu" if activation == "jumprelu" else "standard",
    }
    src = vit_prisma_dir(tmp_path / "src", cfg=cfg, state=s, weights_name="n_images_2600058.pt")
    result, d, saved = imported(tmp_path, src)
    s = f64(s)
    act = {
        "relu": torch.relu,
        "topk": lambda pre: topk(pre, K),
        "jumprelu": lambda pre: pre.relu() * (pre > s["threshold"]),
    }[activation]

    def encode(x):
        return act((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec"])
    assert result.format == "vit-prisma" and result.kind == "sae" and result.d_sae == D_SAE
    assert saved["architecture"] == {"relu": "standard"}.get(activation, activation)
    assert d.sites.inputs[0].name == "blocks.9.hook_resid_post"
    assert d.sites.inputs[0].model == "openclip-vit-b-32-datacomp-xl" and result.notes == []
    assert saved["metadata"]["prisma_ray"]["imported_from"]["model_name"] == CLIP_B32


SKIP_CFG = {
    "hook_point_layer": 3,
    "layer_subtype": "hook_mlp_in",
    "is_transcoder": True,
    "out_hook_point_layer": 3,
    "layer_out_subtype": "hook_mlp_out",
    "transcoder_with_skip_connection": True,
    "activation_fn_str": "relu",
    "model_name": "prisma-toy-vit-shapes",
}


def test_vit_prisma_skip_transcoder(tmp_path):
    s = {**sae_state(), "b_dec_out": rand(D_IN, seed=7), "W_skip": rand(D_IN, D_IN, seed=8)}
    cfg = {
        **SKIP_CFG,
        "d_out": D_IN,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "model_name": "wkcn/TinyCLIP-ViT-40M-32",
    }
    src = vit_prisma_dir(tmp_path / "src", cfg=cfg, state=s)
    result, d, saved = imported(tmp_path, src, skip_includes_identity=True)

    s = f64(s)

    def encode(x):
        return topk((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"], K)

    def forward(x):
        return encode(x) @ s["W_dec"] + s["b_dec_out"] + x @ (torch.eye(D_IN, dtype=torch.float64) + s["W_skip"]).T

    check_same_function(d, encode, forward)
    assert saved["architecture"] == "topk_skip_transcoder" and result.kind == "transcoder"
    assert (result.hook_name, result.hook_name_out) == ("blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out")
    assert result.model == "wkcn/TinyCLIP-ViT-40M-32" and "not in the registry" in result.notes[0]
    assert saved["metadata"]["prisma_ray"]["imported_from"]["skip_includes_identity"] is True
    assert len(result.notes) == 1, "an option given is not noted"


def skip_transcoder(path, w_skip: torch.Tensor):
    d_out = w_skip.shape[0]
    state = {**sae_state(d_out=d_out), "b_dec_out": rand(d_out, seed=7), "W_skip": w_skip}
    return vit_prisma_dir(path, cfg={**SKIP_CFG, "d_out": d_out}, state=state), f64(state)


def check_skip_map(d, s, skip_map: torch.Tensor) -> None:
    """`d` computes the ViT-Prisma transcoder whose skip term is `x @ skip_map.T`."""

    def encode(x):
        return torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec_out"] + x @ skip_map.T)


@pytest.mark.parametrize("includes", [True, False])
def test_vit_prisma_skip_identity_as_given(tmp_path, includes):
    src, s = skip_transcoder(tmp_path / "src", rand(D_IN, D_IN, seed=8))
    result, d, saved = imported(tmp_path, src, skip_includes_identity=includes)
    identity = torch.eye(D_IN, dtype=torch.float64)
    check_skip_map(d, s, identity + s["W_skip"] if includes else s["W_skip"])
    assert saved["metadata"]["prisma_ray"]["imported_from"]["skip_includes_identity"] is includes
    assert result.notes == []


@pytest.mark.parametrize(
    "w_skip,includes,note",
    [
        (torch.eye(D_IN) + rand(D_IN, D_IN, seed=8) * 0.1, False, "close to the identity"),
        (-torch.eye(D_IN) + rand(D_IN, D_IN, seed=8) * 0.1, True, "close to minus the identity"),
        (rand(6, D_IN, seed=8), False, "not square"),
    ],
    ids=["near-identity", "near-minus-identity", "not-square"],
)
def test_vit_prisma_skip_identity_detected_where_only_one_reading_is_plausible(tmp_path, w_skip, includes, note):
    src, s = skip_transcoder(tmp_path / "src", w_skip)
    result, d, saved = imported(tmp_path, src)
    check_skip_map(d, s, torch.eye(D_IN, dtype=torch.float64) + s["W_skip"] if includes else s["W_skip"])
    assert note in result.notes[0]
    assert ("skip_includes_identity" in result.notes[0]) == (note != "not square"), "a guess names the option"
    assert saved["metadata"]["prisma_ray"]["imported_from"]["skip_includes_identity"] is includes


@pytest.mark.parametrize(
    "w_skip", [rand(D_IN, D_IN, seed=8), rand(D_IN, D_IN, seed=8) * 0.01], ids=["random", "near-zero"]
)
def test_vit_prisma_skip_identity_undecidable_is_refused_naming_the_option(tmp_path, w_skip):
    src, _ = skip_transcoder(tmp_path / "src", w_skip)
    with pytest.raises(CheckpointImportError, match=r"weights\.pt: .*set skip_includes_identity \(CLI: --skip-incl"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_vit_prisma_skip_identity_option_is_checked(tmp_path):
    src, _ = skip_transcoder(tmp_path / "src", rand(6, D_IN, seed=8))
    with pytest.raises(CheckpointImportError, match=r"skip_includes_identity is true but W_skip is \(6, 8\)"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out"), skip_includes_identity=True))
    other = sparsify_dir(tmp_path / "layers.1", {}, sparsify_state())
    with pytest.raises(CheckpointImportError, match="applies to ViT-Prisma skip transcoders, not to a sparsify"):
        import_dictionary(ImportConfig(source=str(other), output=str(tmp_path / "out"), skip_includes_identity=False))


def test_cli_skip_includes_identity(tmp_path, capsys):
    src, _ = skip_transcoder(tmp_path / "src", rand(D_IN, D_IN, seed=8))
    assert main(["import-sae", str(src), str(tmp_path / "out")]) == 2
    assert "--skip-includes-identity" in capsys.readouterr().err
    assert main(["import-sae", str(src), str(tmp_path / "out"), "--no-skip-includes-identity"]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert saved["metadata"]["prisma_ray"]["imported_from"]["skip_includes_identity"] is False


def test_vit_prisma_older_config_defaults_to_mlp_out_and_refuses_run_time_normalisation(tmp_path):
    src = vit_prisma_dir(tmp_path / "src", cfg={"hook_point_layer": 2}, state=sae_state())
    assert imported(tmp_path, src)[0].hook_name == "blocks.2.hook_mlp_out"
    (src / "config.json").write_text(
        json.dumps({"d_in": D_IN, "hook_point_layer": 2, "normalize_activations": "layer_norm"})
    )
    with pytest.raises(CheckpointImportError, match=r"config\.json: normalize_activations='layer_norm'"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out2")))


# --- SAELens -------------------------------------------------------------------------------------


def saelens_dir(path, cfg: dict, weights: dict, sparsity: torch.Tensor | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **cfg}))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "sae_weights.safetensors")
    if sparsity is not None:
        save_file({"sparsity": sparsity}, path / "sparsity.safetensors")
    return path


def test_saelens_legacy_cfg_folds_b_dec_and_scaling_factor(tmp_path):
    """SAELens <6: names at the top level, no b_dec on the input, a fine-tuning scaling factor."""
    s = {**sae_state(), "scaling_factor": rand(D_SAE, seed=5).abs() + 0.5}
    cfg = {
        "architecture": "standard",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
        "hook_name": "blocks.4.hook_resid_pre",
        "model_name": "openai/clip-vit-base-patch32",
        "finetuning_scaling_factor": True,
    }
    result, d, saved = imported(tmp_path, saelens_dir(tmp_path / "src", cfg, s))

    s = f64(s)

    def encode(x):
        return torch.relu(x @ s["W_enc"] + s["b_enc"])

    check_same_function(d, encode, lambda x: (encode(x) * s["scaling_factor"]) @ s["W_dec"] + s["b_dec"])
    assert saved["architecture"] == "standard" and saved["apply_b_dec_to_input"] is True
    assert (result.hook_name, result.model) == ("blocks.4.hook_resid_pre", "hf-clip-vit-base-patch32")


def test_saelens_6_gated_sae_without_b_dec_on_input(tmp_path):
    s = sae_state()
    s = {
        "W_enc": s["W_enc"],
        "W_dec": s["W_dec"],
        "b_dec": s["b_dec"],
        "b_gate": rand(D_SAE, seed=11),
        "r_mag": rand(D_SAE, seed=12),
        "b_mag": rand(D_SAE, seed=13),
    }
    cfg = {
        "architecture": "gated",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.1.hook_mlp_out", "model_name": "prisma-toy-vit-shapes"},
    }
    _, d, _ = imported(tmp_path, saelens_dir(tmp_path / "src", cfg, s))

    s = f64(s)

    def encode(x):
        shared = x @ s["W_enc"]
        return (shared + s["b_gate"] > 0) * torch.relu(shared * s["r_mag"].exp() + s["b_mag"])

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec"])


def test_saelens_6_jumprelu_skip_transcoder_keeps_sparsity(tmp_path):
    s = {**sae_state(d_out=6), "threshold": rand(D_SAE, seed=4).abs(), "W_skip": rand(6, D_IN, seed=6)}
    s["b_dec"] = rand(6, seed=9)
    cfg = {
        "architecture": "jumprelu_skip_transcoder",
        "d_out": 6,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.2.hook_mlp_in", "hook_name_out": "blocks.2.hook_mlp_out", "model_name": ""},
    }
    sparsity = rand(D_SAE, seed=10).abs().neg()
    result, d, _ = imported(tmp_path, saelens_dir(tmp_path / "src", cfg, s, sparsity), model="prisma-toy-vit-shapes")

    s = f64(s)

    def encode(x):
        pre = x @ s["W_enc"] + s["b_enc"]
        return pre.relu() * (pre > s["threshold"])

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec"] + x @ s["W_skip"].T)
    assert result.kind == "transcoder" and result.d_out == 6 and result.model == "prisma-toy-vit-shapes"
    torch.testing.assert_close(load_sparsity(str(tmp_path / "out")), sparsity)


def test_saelens_run_time_normalisation_is_refused(tmp_path):
    src = saelens_dir(
        tmp_path / "src", {"architecture": "standard", "normalize_activations": "expected_average_only_in"}, sae_state()
    )
    with pytest.raises(CheckpointImportError, match="normalize_activations='expected_average_only_in'"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_saelens_transcoder_without_its_output_hook_is_refused(tmp_path):
    """Its output hook cannot be determined: refused, rather than imported with an invented one."""
    s = {**sae_state(d_out=6), "b_dec": rand(6, seed=9)}
    cfg = {"architecture": "transcoder", "d_out": 6, "apply_b_dec_to_input": False}
    src = saelens_dir(tmp_path / "src", {**cfg, "metadata": {"hook_name": "blocks.2.hook_mlp_in"}}, s)
    with pytest.raises(CheckpointImportError, match=r"src/cfg\.json: .*metadata\.hook_name_out"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    src = saelens_dir(
        tmp_path / "old", {**cfg, "hook_name": "blocks.2.hook_mlp_in", "hook_name_out": "blocks.2.hook_mlp_out"}, s
    )
    assert imported(tmp_path, src)[0].hook_name_out == "blocks.2.hook_mlp_out", "SAELens <6: at the top level"


# --- sparsify ------------------------------------------------------------------------------------


def sparsify_dir(path, cfg: dict, weights: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": K, **cfg}))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "sae.safetensors")
    return path


def sparsify_state(skip: bool = False) -> dict:
    s = {
        "encoder.weight": rand(D_SAE, D_IN, seed=20),
        "encoder.bias": rand(D_SAE, seed=21),
        "W_dec": rand(D_SAE, D_IN, seed=22),
        "b_dec": rand(D_IN, seed=23),
    }
    return {**s, "W_skip": rand(D_IN, D_IN, seed=24)} if skip else s


def test_sparsify_sae_on_a_layer(tmp_path):
    s = sparsify_state()
    src = sparsify_dir(tmp_path / "EleutherAI-sae" / "layers.6", {"expansion_factor": 4}, s)
    result, d, saved = imported(tmp_path, src, model="timm/vit_base_patch16_clip_224.openai")

    s = f64(s)

    def encode(x):
        return topk(torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]), K)

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec"])
    assert result.format == "sparsify" and saved["architecture"] == "topk" and saved["k"] == K
    assert (result.hook_name, result.model) == ("blocks.6.hook_resid_post", "timm-vit-base-patch16-clip-224-openai")


def test_sparsify_skip_transcoder_on_an_mlp(tmp_path):
    s = sparsify_state(skip=True)
    src = sparsify_dir(tmp_path / "model.layers.3.mlp", {"transcode": True, "skip_connection": True}, s)
    result, d, _ = imported(tmp_path, src)

    s = f64(s)

    def encode(x):
        return topk(torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"]), K)

    check_same_function(d, encode, lambda x: encode(x) @ s["W_dec"] + s["b_dec"] + x @ s["W_skip"].T)
    assert (result.hook_name, result.hook_name_out) == ("blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out")
    assert result.model == "" and "pass --model" in result.notes[0]


def test_sparsify_groupmax_is_refused(tmp_path):
    src = sparsify_dir(tmp_path / "layers.1", {"activation": "groupmax"}, sparsify_state())
    with pytest.raises(CheckpointImportError, match=r"cfg\.json: \{'activation': 'groupmax'\}"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))


# --- names and detection -------------------------------------------------------------------------


def test_hook_names_map_onto_ours():
    assert hook_name("blocks.9.hook_resid_post") == "blocks.9.hook_resid_post"
    assert hook_name("hook_embed") == "hook_embed"
    assert hook_name("layers.6") == "blocks.6.hook_resid_post"
    assert hook_name("vision_model.encoder.layers.2.mlp") == "blocks.2.hook_mlp_out"
    assert hook_name("encoder.layer.4.attention") == "blocks.4.hook_attn_out"
    assert hook_name("blocks.9.mlp.hook_post") is None and hook_name("blocks.9.hook_nonsense") is None
    assert module_hooks("transformer.h.5") == ("blocks.5.hook_resid_pre", "blocks.5.hook_resid_post")
    assert module_hooks("layers.1.self_attn") == (None, "blocks.1.hook_attn_out")


def test_model_names_map_onto_the_registry():
    assert registry_model(CLIP_B32) == "openclip-vit-b-32-datacomp-xl"
    assert registry_model("laion/CLIP-ViT-H-14-laion2B-s32B-b79K") == "hf-clip-vit-h-14-laion2b-s32b-b79k"
    assert registry_model("open-clip:laion/CLIP-ViT-H-14-laion2B-s32B-b79K") == "openclip-vit-h-14-laion2b"
    assert registry_model("facebook/dinov2-base") == "hf-dinov2-base"
    assert registry_model("prisma-toy-vit-shapes") == "prisma-toy-vit-shapes"
    assert registry_model("wkcn/TinyCLIP-ViT-40M-32-Text-19M-LAION400M") is None


def test_unknown_hook_names_are_kept_and_noted(tmp_path):
    src = vit_prisma_dir(tmp_path / "src", cfg={"hook_point": "blocks.9.mlp.hook_post"}, state=sae_state())
    result = imported(tmp_path, src)[0]
    assert result.hook_name == "blocks.9.mlp.hook_post" and "no equivalent" in result.notes[0]


def test_nothing_recognisable_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.md").write_text("hi")
    with pytest.raises(CheckpointImportError, match=r"no known checkpoint layout among its files \['README.md'\]"):
        import_dictionary(ImportConfig(source=str(tmp_path / "src"), output=str(tmp_path / "out")))


def test_cli_imports_and_never_overwrites(tmp_path, capsys):
    src = sparsify_dir(tmp_path / "layers.2", {}, sparsify_state())
    out = str(tmp_path / "out")
    assert main(["import-sae", str(src), out, "--format", "sparsify", "--model", "prisma-toy-vit-shapes"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hook_name"] == "blocks.2.hook_resid_post" and printed["model"] == "prisma-toy-vit-shapes"
    before = (tmp_path / "out" / "sae_weights.safetensors").read_bytes()
    assert main(["import-sae", str(src), out]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "out" / "sae_weights.safetensors").read_bytes() == before


# --- pickled files: nothing runs -----------------------------------------------------------------

FLAG = {"ran": False}


def _set_flag():
    FLAG["ran"] = True
    return torch.zeros(D_IN, D_SAE)


class SetsFlag:
    def __reduce__(self):
        return (_set_flag, ())


class RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class OldPrismaConfig:
    d_in: int = D_IN


def prisma_with(tmp_path, payload: bytes):
    src = vit_prisma_dir(tmp_path / "src", cfg={"hook_point_layer": 1}, state=sae_state())
    (src / "weights.pt").write_bytes(payload)
    return src


def torch_saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_pickle_that_runs_a_shell_command_is_refused(tmp_path, container):
    marker = f"/tmp/pwned-{uuid.uuid4().hex}"
    state = {**sae_state(), "W_enc": RunsShell(marker)}
    payload = torch_saved(state) if container == "torch-zip" else pickle.dumps(state)
    src = prisma_with(tmp_path, payload)
    with pytest.raises(UnsafePickleError, match=r"weights\.pt: refused to unpickle posix\.system") as err:
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert str(src) in str(err.value) and "nothing in this one was run" in str(err.value)
    assert not os.path.exists(marker) and not (tmp_path / "out").exists()


def test_a_pickle_that_calls_a_function_is_refused_though_a_naive_load_would_run_it(tmp_path):
    payload = torch_saved({**sae_state(), "W_enc": SetsFlag()})
    src = prisma_with(tmp_path, payload)
    FLAG["ran"] = False
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle .*_set_flag"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert FLAG["ran"] is False
    torch.load(src / "weights.pt", weights_only=False)  # the payload is live: a naive load runs it
    assert FLAG["ran"] is True


@pytest.mark.parametrize(
    "obj,refused",
    [
        ({**sae_state(), "counts": collections.Counter("aab")}, "collections.Counter"),
        ({"cfg": OldPrismaConfig(), "state_dict": sae_state()}, "OldPrismaConfig"),
    ],
    ids=["counter", "custom-class"],
)
def test_classes_other_than_tensors_and_plain_containers_are_refused(tmp_path, obj, refused):
    src = prisma_with(tmp_path, torch_saved(obj))
    with pytest.raises(UnsafePickleError, match=refused):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))


def test_a_state_dict_under_state_dict_with_plain_values_loads(tmp_path):
    s = sae_state()
    src = prisma_with(tmp_path, torch_saved({"state_dict": collections.OrderedDict(s), "n_images": 3, "tags": ["a"]}))
    _, d, _ = imported(tmp_path, src)
    torch.testing.assert_close(d.W_dec.detach(), s["W_dec"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-tensors"])
def test_corrupt_pickles_name_the_file(tmp_path, damage):
    good = torch_saved(sae_state())
    payload = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00not a checkpoint",
        "not-tensors": torch_saved({**sae_state(), "W_enc": "oops"}),
    }[damage]
    src = prisma_with(tmp_path, payload)
    with pytest.raises(CheckpointImportError, match=r"weights\.pt: ") as err:
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    assert not isinstance(err.value, UnsafePickleError)


def test_corrupt_safetensors_and_json_name_the_file(tmp_path):
    src = sparsify_dir(tmp_path / "layers.1", {}, sparsify_state())
    data = (src / "sae.safetensors").read_bytes()
    (src / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointImportError, match=r"sae\.safetensors: not a readable safetensors file"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    (src / "cfg.json").write_text('{"k": 4')
    with pytest.raises(CheckpointImportError, match=r"cfg\.json: not valid JSON"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))


def test_source_and_output_on_s3(tmp_path, s3):
    src = vit_prisma_dir(
        tmp_path / "src", cfg={"hook_point_layer": 5, "layer_subtype": "hook_resid_post"}, state=sae_state()
    )
    for f in src.iterdir():
        s3.client.put_object(Bucket=s3.bucket, Key=f"published/{f.name}", Body=f.read_bytes())
    cfg = ImportConfig(source=s3.uri("published"), output=s3.uri("imported", "l5"), storage=s3.options)
    assert import_dictionary(cfg).hook_name == "blocks.5.hook_resid_post"
    local = imported(tmp_path, src)[1]
    torch.testing.assert_close(load_dictionary(s3.uri("imported", "l5"), s3.options).W_enc, local.W_enc)


def test_a_transcoder_on_an_attention_module_keeps_the_input_name(tmp_path):
    src = sparsify_dir(tmp_path / "layers.1.self_attn", {"transcode": True}, sparsify_state())
    result = imported(tmp_path, src)[0]
    assert (result.hook_name, result.hook_name_out) == ("layers.1.self_attn.input", "blocks.1.hook_attn_out")
    assert "'layers.1.self_attn.input' has no equivalent" in result.notes[0]


def test_malformed_configs_and_tensors_are_clear_errors(tmp_path):
    src = vit_prisma_dir(tmp_path / "topk", cfg={"hook_point_layer": 1, "activation_fn_str": "topk"}, state=sae_state())
    with pytest.raises(CheckpointImportError, match="TopK dictionary whose config does not say k"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    src = sparsify_dir(tmp_path / "layers.1", {}, {**sparsify_state(), "W_dec": rand(D_SAE * D_IN, seed=1)})
    with pytest.raises(CheckpointImportError, match="W_enc and W_dec must be matrices"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    src = sparsify_dir(tmp_path / "layers.2", {}, {**sparsify_state(), "b_dec": rand(D_IN + 1, seed=1)})
    with pytest.raises(CheckpointImportError, match=r"layers\.2: .*wrong shapes \{'b_dec': \(9,\)\}"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
    cfg = {"hook_point_layer": 1, "is_transcoder": True, "out_hook_point_layer": 1}
    state = {**sae_state(), "b_dec": rand(3, seed=1), "b_dec_out": rand(D_IN, seed=2)}
    src = vit_prisma_dir(tmp_path / "tc", cfg=cfg, state=state)
    with pytest.raises(CheckpointImportError, match=r"tc: tensors of unexpected shapes"):
        import_dictionary(ImportConfig(source=str(src), output=str(tmp_path / "out")))
