"""OpenCLIP image towers: `architecture` is the OpenCLIP model name, `pretrained` its pretrained tag.

Sizes are those of the bundled OpenCLIP model configs (`width // head_width` heads; timm-based
towers: the timm model's own). OpenAI, DFN and MetaCLIP weights were trained with QuickGELU, so
they use the `-quickgelu` model names, which OpenCLIP needs to build the matching activation.
"""

from ..registry import ModelEntry
from . import catalog_entry


def _entry(name: str, architecture: str, tag: str, family: str, *shape: int) -> ModelEntry:
    """An OpenCLIP entry: `shape` is (layers, width, heads, image_size, patch_size)."""
    return catalog_entry("open_clip", f"openclip-{name}", architecture, tag, family, shape)


ENTRIES: list[ModelEntry] = [
    _entry("vit-b-32-openai", "ViT-B-32-quickgelu", "openai", "clip", 12, 768, 12, 224, 32),
    _entry("vit-b-32-laion2b", "ViT-B-32", "laion2b_s34b_b79k", "clip", 12, 768, 12, 224, 32),
    _entry("vit-b-32-datacomp-xl", "ViT-B-32", "datacomp_xl_s13b_b90k", "clip", 12, 768, 12, 224, 32),
    _entry("vit-b-32-metaclip-fullcc", "ViT-B-32-quickgelu", "metaclip_fullcc", "clip", 12, 768, 12, 224, 32),
    _entry("vit-b-32-256-datacomp", "ViT-B-32-256", "datacomp_s34b_b86k", "clip", 12, 768, 12, 256, 32),
    _entry("vit-b-16-openai", "ViT-B-16-quickgelu", "openai", "clip", 12, 768, 12, 224, 16),
    _entry("vit-b-16-laion2b", "ViT-B-16", "laion2b_s34b_b88k", "clip", 12, 768, 12, 224, 16),
    _entry("vit-b-16-datacomp-xl", "ViT-B-16", "datacomp_xl_s13b_b90k", "clip", 12, 768, 12, 224, 16),
    _entry("vit-b-16-dfn2b", "ViT-B-16-quickgelu", "dfn2b", "clip", 12, 768, 12, 224, 16),
    _entry("vit-b-16-plus-240-laion400m", "ViT-B-16-plus-240", "laion400m_e32", "clip", 12, 896, 14, 240, 16),
    _entry("vit-l-14-openai", "ViT-L-14-quickgelu", "openai", "clip", 24, 1024, 16, 224, 14),
    _entry("vit-l-14-laion2b", "ViT-L-14", "laion2b_s32b_b82k", "clip", 24, 1024, 16, 224, 14),
    _entry("vit-l-14-datacomp-xl", "ViT-L-14", "datacomp_xl_s13b_b90k", "clip", 24, 1024, 16, 224, 14),
    _entry("vit-l-14-dfn2b", "ViT-L-14-quickgelu", "dfn2b", "clip", 24, 1024, 16, 224, 14),
    _entry("vit-l-14-metaclip-fullcc", "ViT-L-14-quickgelu", "metaclip_fullcc", "clip", 24, 1024, 16, 224, 14),
    _entry("vit-l-14-336-openai", "ViT-L-14-336-quickgelu", "openai", "clip", 24, 1024, 16, 336, 14),
    _entry("vit-l-14-clipa-datacomp1b", "ViT-L-14-CLIPA", "datacomp1b", "clipa", 24, 1024, 16, 224, 14),
    _entry("vit-h-14-laion2b", "ViT-H-14", "laion2b_s32b_b79k", "clip", 32, 1280, 16, 224, 14),
    _entry("vit-h-14-dfn5b", "ViT-H-14-quickgelu", "dfn5b", "clip", 32, 1280, 16, 224, 14),
    _entry("vit-h-14-378-dfn5b", "ViT-H-14-378-quickgelu", "dfn5b", "clip", 32, 1280, 16, 378, 14),
    _entry("vit-g-14-laion2b", "ViT-g-14", "laion2b_s34b_b88k", "clip", 40, 1408, 16, 224, 14),
    _entry("vit-bigg-14-laion2b", "ViT-bigG-14", "laion2b_s39b_b160k", "clip", 48, 1664, 16, 224, 14),
    _entry("vit-b-16-siglip-webli", "ViT-B-16-SigLIP", "webli", "siglip", 12, 768, 12, 224, 16),
    _entry("vit-b-16-siglip-384-webli", "ViT-B-16-SigLIP-384", "webli", "siglip", 12, 768, 12, 384, 16),
    _entry("vit-l-16-siglip-384-webli", "ViT-L-16-SigLIP-384", "webli", "siglip", 24, 1024, 16, 384, 16),
    _entry("vit-so400m-14-siglip-webli", "ViT-SO400M-14-SigLIP", "webli", "siglip", 27, 1152, 16, 224, 14),
    _entry("vit-so400m-14-siglip-384-webli", "ViT-SO400M-14-SigLIP-384", "webli", "siglip", 27, 1152, 16, 384, 14),
    _entry("vit-b-16-siglip2-webli", "ViT-B-16-SigLIP2", "webli", "siglip2", 12, 768, 12, 224, 16),
    _entry("vit-so400m-14-siglip2-webli", "ViT-SO400M-14-SigLIP2", "webli", "siglip2", 27, 1152, 16, 224, 14),
    _entry("eva02-b-16-merged2b", "EVA02-B-16", "merged2b_s8b_b131k", "eva02-clip", 12, 768, 12, 224, 16),
    _entry("eva02-l-14-merged2b", "EVA02-L-14", "merged2b_s4b_b131k", "eva02-clip", 24, 1024, 16, 224, 14),
    _entry("eva02-l-14-336-merged2b", "EVA02-L-14-336", "merged2b_s6b_b61k", "eva02-clip", 24, 1024, 16, 336, 14),
    _entry("pe-core-b-16-meta", "PE-Core-B-16", "meta", "pe-core", 12, 768, 12, 224, 16),
    _entry("pe-core-l-14-336-meta", "PE-Core-L-14-336", "meta", "pe-core", 24, 1024, 16, 336, 14),
]
