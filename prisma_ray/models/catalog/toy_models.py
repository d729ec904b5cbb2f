"""The embedded toy models (`source="prisma"`), trained by `jobs/train_toy_models.py` and shipped as safetensors."""

from ..registry import ModelEntry
from ..toy import SPECS


def _entry(name: str) -> ModelEntry:
    spec = SPECS[name]
    return ModelEntry(
        name=f"prisma-{name}",
        source="prisma",
        architecture=name,
        pretrained="bundled",
        family="videomae" if spec.modality == "video" else "toy-vit",
        modality=spec.modality,
        layers=spec.depth,
        width=spec.width,
        heads=spec.heads,
        image_size=spec.dataset.image_size,
        patch_size=spec.patch_size,
        frames=spec.frames,
    )


ENTRIES: list[ModelEntry] = [_entry(name) for name in SPECS]
