"""Pixel features of the object under a region: its colour and a rotation-invariant descriptor of its shape.

`ObjectDescriptors` is an image feature extractor for `PrototypeEmbedder` that reads the pixels, not a
model: like a CLIP image tower it is independent of the model whose latents are explained, and it
separates the synthetic `shapes` vocabulary by construction. On those images objects are flat saturated
(or white) colours over a grey texture (`prisma_ray.data.synthetic.background`), so an image's objects are
the connected components of its saturated or bright pixels. The object a region shows is the component
that covers most of the region; its features are

- colour: its mean RGB, in [0, 1] (3 values);
- shape: region-property shape descriptors of its mask (scikit-image `regionprops`): solidity (area over
  convex-hull area: a star or cross is far from convex), eccentricity, extent, circularity
  (4π area / perimeter²) and the 7 Hu moment invariants, log-scaled (`log10(|h| + 1e-7)`, so that a mirror
  image, which flips the sign of the seventh, and invariants near zero do not jump; Hu, "Visual
  pattern recognition by moment invariants", IRE Trans. Inf. Theory 1962), all invariant to position and
  (but for extent) rotation, so that a label's prototypes agree wherever and however the object lies.
"""

from __future__ import annotations

import numpy as np

from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.evidence import upsample

N_FEATURES = 3 + 4 + 7


def object_pixels(image: np.ndarray, saturation: int = 64, bright: int = 160) -> np.ndarray:
    """`bool[H, W]`: the pixels of `uint8[H, W, 3]` that are saturated (max - min channel >= `saturation`) or bright
    (every channel >= `bright`): the objects of a `shapes` image, whose background is a dark grey texture."""
    rgb = image.astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1) >= saturation) | (rgb.min(-1) >= bright)


def object_descriptor(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`float32[N_FEATURES]`: colour and shape descriptors (module doc) of the object `bool[H, W]` `mask` in
    `uint8[H, W, 3]` `image`; zeros where the mask is empty."""
    from skimage.measure import regionprops

    if not mask.any():
        return np.zeros(N_FEATURES, np.float32)
    props = regionprops(mask.astype(np.uint8))[0]
    hu = np.asarray(props.moments_hu, dtype=np.float64)
    log_hu = np.log10(np.abs(hu) + 1e-7)
    circularity = 4 * np.pi * props.area / max(props.perimeter, 1.0) ** 2
    shape = [props.solidity, props.eccentricity, props.extent, circularity]
    colour = image[mask].mean(0) / 255.0
    return np.concatenate([colour, shape, log_hu]).astype(np.float32)


class ObjectDescriptors:
    """`features(images, regions=None)` → `float32[n, N_FEATURES]`: the descriptor of the object each region
    shows (module doc).

    `regions` is `bool[n, H, W]` over the images or `bool[n, h, w]` over a patch grid (upsampled to the
    images); the object is the connected component of object pixels (4-connected) covering most of the region,
    or the image's largest object where the region covers none (without a region: the largest object). An image
    without object pixels gives zeros.
    """

    def __call__(self, images: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        from skimage.measure import label

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidRequest(f"ObjectDescriptors: images of shape {images.shape}; pass uint8[n, H, W, 3]")
        if regions is not None:
            regions = np.asarray(regions, dtype=bool)
            if len(regions) != len(images):
                raise InvalidRequest(
                    f"ObjectDescriptors: {len(regions)} regions for {len(images)} images; give one mask per image"
                )
            if regions.shape[1:] != images.shape[1:3]:
                regions = upsample(regions, images.shape[1:3])
        out = np.zeros((len(images), N_FEATURES), np.float32)
        for i, image in enumerate(images):
            components = label(object_pixels(image), connectivity=1)
            if components.max() == 0:
                continue
            sizes = np.bincount(components.reshape(-1))[1:]
            covered = np.bincount(components[regions[i]], minlength=len(sizes) + 1)[1:] if regions is not None else 0
            chosen = int(np.argmax(covered if np.any(covered) else sizes)) + 1
            out[i] = object_descriptor(image, components == chosen)
        return out
