"""Classification images for the study, generated in memory from the synthetic shapes.

Each image is ``mmdet_bnplug.testing.synthetic.make_image`` at 32x32 with exactly one annotated
shape (five classes: circle, square, triangle, ring, cross) on a random texture with
unannotated clutter (lines, dots the size of a small circle); the label is the shape's
class. Deterministic for a seed; cached per process.
"""
import functools

import numpy as np
import torch

from mmdet_bnplug.testing.synthetic import CLASSES, SyntheticSpec, make_image

NUM_CLASSES = len(CLASSES)
# fixed normalisation of uint8 pixels: (x / 255 - 0.5) / 0.25
_MEAN, _STD = 0.5 * 255, 0.25 * 255


@functools.lru_cache(maxsize=8)
def make_split(num_images: int, seed: int, min_size: int, max_size: int,
               image_size: int = 32):
    """``(images, labels)``: uint8 ``(N, 3, S, S)`` and int64 ``(N,)`` tensors; object
    sides (pixels) drawn log-uniformly from ``[min_size, max_size]``."""
    spec = SyntheticSpec(image_size=image_size, min_object_size=min_size,
                         max_object_size=max_size, max_objects=1)
    spec.validate()
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    labels = np.empty(num_images, np.int64)
    for i in range(num_images):
        img, objects = make_image(rng, spec)
        images[i], labels[i] = img, objects[0][0]
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> normalised float32 network input."""
    return (images.float() - _MEAN) / _STD
