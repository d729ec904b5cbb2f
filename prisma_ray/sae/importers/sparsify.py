"""EleutherAI sparsify checkpoints: one directory per hook point (its module path, e.g. `layers.6` or
`layers.6.mlp`) holding `cfg.json` + `sae.safetensors`.

TopK coders: `encoder.weight [d_sae, d_in]`, `encoder.bias`, `W_dec [d_sae, d_out]`, `b_dec`,
optional `W_skip [d_out, d_in]`; autoencoders subtract `b_dec` from the input, transcoders
(`transcode: true`) do not. The model is not recorded in the directory: pass it with `--model`.
"""

from __future__ import annotations

import posixpath

from .common import CheckpointImportError, Imported, SourceDir, require

FORMAT = "sparsify"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)


def read(src: SourceDir) -> Imported:
    cfg = src.read_json(CFG_FILE)
    unsupported = {key: cfg[key] for key in ("embed_skip", "gram_lookup") if cfg.get(key)}
    if cfg.get("activation", "topk") != "topk":
        unsupported["activation"] = cfg["activation"]
    if cfg.get("skip_connection") and not cfg.get("transcode"):
        unsupported["skip_connection"] = "without transcode"
    if unsupported:
        raise CheckpointImportError(f"{src.path(CFG_FILE)}: {unsupported} cannot be imported (plain TopK coders can)")
    state = src.read_safetensors(WEIGHTS_FILE)
    skip = bool(cfg.get("skip_connection"))
    require(
        state,
        ("encoder.weight", "encoder.bias", "W_dec", "b_dec") + (("W_skip",) if skip else ()),
        src.path(WEIGHTS_FILE),
    )
    weights = {
        "W_enc": state["encoder.weight"].t(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    if skip:
        weights["W_skip"] = state["W_skip"]
    return Imported(
        format=FORMAT,
        architecture="topk",
        weights=weights,
        hook_name=posixpath.basename(src.uri.rstrip("/")),
        k=int(cfg["k"]) if "k" in cfg else 32,
        transcoder=bool(cfg.get("transcode")),
        skip=skip,
    )
