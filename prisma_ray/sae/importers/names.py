"""Other tools' hook and model names mapped onto ours (TransformerLens-style hooks, registry models)."""

from __future__ import annotations

import re

from ...models.hook_points import GLOBAL_SITES, block_hook_names
from ...models.registry import ModelEntry, list_entries

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_MODULE = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks|resblocks)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_MODULE_OUTPUT = {
    None: "hook_resid_post",
    "mlp": "hook_mlp_out",
    "self_attn": "hook_attn_out",
    "attn": "hook_attn_out",
    "attention": "hook_attn_out",
}
_MODULE_INPUT = {None: "hook_resid_pre", "mlp": "hook_mlp_in"}
_PREFIX = re.compile(r"^(open[-_]?clip|hf-hub|hf|timm):", re.IGNORECASE)


def is_ours(name: str) -> bool:
    """Whether `name` is one of our hook points (`blocks.{l}.hook_resid_post`, `hook_embed`, ...)."""
    match = _BLOCK.match(name)
    return name in GLOBAL_SITES or (match is not None and name in block_hook_names(int(match.group(1))))


def module_hooks(path: str) -> tuple[str | None, str | None]:
    """`(input hook, output hook)` of a module path such as `layers.6`, `model.layers.6.mlp` or
    `encoder.layer.6.attention` (a block: resid_pre -> resid_post; its MLP: mlp_in -> mlp_out;
    its attention: output hook_attn_out only); `(None, None)` for other paths."""
    match = _MODULE.match(path)
    if match is None:
        return None, None
    layer, part = match.group(1), match.group(2)
    site_in = _MODULE_INPUT.get(part)
    return (f"blocks.{layer}.{site_in}" if site_in else None), f"blocks.{layer}.{_MODULE_OUTPUT[part]}"


def hook_name(name: str) -> str | None:
    """Our name for an activation another tool names `name` (ours already, or a module's output)."""
    return name if is_ours(name) else module_hooks(name)[1]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _open_clip_key(hub_id: str) -> str:
    """`laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K` -> `vitb32datacompxls13bb90k` (model + tag)."""
    return _norm(hub_id.rsplit("/", 1)[-1]).removeprefix("clip")


def _matches(entry: ModelEntry, query: str) -> bool:
    if entry.source == "hf":
        return _norm(entry.pretrained or "") == _norm(query)
    if entry.source == "timm":
        return _norm(f"{entry.architecture}.{entry.pretrained}") == _norm(query.removeprefix("timm/"))
    if entry.source == "open_clip":
        return _norm(entry.architecture.removesuffix("-quickgelu") + (entry.pretrained or "")) == _open_clip_key(query)
    return False


def registry_model(name: str) -> str | None:
    """Our registry name for a model as another tool names it (a registry name, a Hugging Face hub
    id, `open-clip:<hub id>`, `timm/<model>.<tag>`), or None when the registry has no such model."""
    entries = list_entries()
    if any(e.name == name for e in entries):
        return name
    prefix = _PREFIX.match(name)
    query = name[prefix.end() :] if prefix else name
    order = ("open_clip", "hf", "timm") if prefix and "clip" in prefix.group(1).lower() else ("hf", "timm", "open_clip")
    for source in order:
        for entry in entries:
            if entry.source == source and _matches(entry, query):
                return entry.name
    return None
