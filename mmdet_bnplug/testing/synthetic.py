"""A synthetic COCO-format detection dataset: coloured shapes on textured backgrounds.

Deterministic for a seed. Each image holds 1 to ``max_objects`` shapes of five classes
(circle, square, triangle, ring, cross) at several scales on one of several background
textures with unannotated clutter (thin lines, dots), so that a small detector trained
from scratch on CPU learns it in minutes yet does not saturate the metric.
Written as ``<out_dir>/<split>/*.png`` plus ``<out_dir>/annotations/<split>.json``.
Each annotation has its box and its instance mask: the shape's exact visible silhouette
(as rendered, minus the parts of shapes drawn over it), COCO RLE. ``area`` is the box's,
so that the box metrics' size ranges do not depend on the masks.
"""
import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ('circle', 'square', 'triangle', 'ring', 'cross')
_SUBPIXEL_BITS = 4


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; sizes in pixels."""
    image_size: int = 128
    min_object_size: int = 16
    max_object_size: int = 64
    max_objects: int = 4
    max_covered: float = 0.15  # of the smaller box, so no shape hides another

    def validate(self):
        if self.image_size < 32:
            raise ValueError(f'image_size must be >= 32, got {self.image_size}')
        if not 4 <= self.min_object_size <= self.max_object_size <= self.image_size:
            raise ValueError(
                'need 4 <= min_object_size <= max_object_size <= image_size, got '
                f'min_object_size={self.min_object_size}, '
                f'max_object_size={self.max_object_size}, image_size={self.image_size}')
        if self.max_objects < 1:
            raise ValueError(f'max_objects must be >= 1, got {self.max_objects}')


def _background(rng, size):
    """A random texture, uint8 (size, size, 3)."""
    kind = rng.integers(4)
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # linear gradient
        direction = rng.uniform(-1, 1, size=2)
        ramp = (direction[0] * xx + direction[1] * yy)[..., None]
        img = base + ramp * rng.uniform(-80, 80, size=3)
    elif kind == 1:  # stripes
        freq = rng.uniform(4, 16)
        angle = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        img = base + wave[..., None] * rng.uniform(10, 40, size=3)
    elif kind == 2:  # checkerboard
        cells = rng.integers(4, 12)
        board = ((xx * cells).astype(int) + (yy * cells).astype(int)) % 2
        img = base + (board[..., None] - 0.5) * rng.uniform(10, 50, size=3)
    else:  # smooth blotches
        coarse = rng.normal(0, 1, size=(8, 8, 3)).astype(np.float32)
        blobs = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        img = base + blobs * rng.uniform(10, 40)
    img = img + rng.normal(0, rng.uniform(2, 12), size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    _clutter(rng, img)
    return img


def _clutter(rng, img):
    """Draw up to 4 thin lines and up to 4 dots in random colours, in place."""
    size = img.shape[0]
    for _ in range(rng.integers(0, 5)):
        p0, p1 = rng.integers(0, size, size=(2, 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour,
                 int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(rng.integers(0, 5)):
        centre = tuple(int(v) for v in rng.integers(0, size, size=2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.circle(img, centre, int(rng.integers(1, 4)), colour, -1, cv2.LINE_AA)


def _contrasting_colour(rng, background_mean):
    """An RGB colour at least 60 (L1/3) away from the background's mean colour."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background_mean).mean() >= 60:
            return tuple(float(c) for c in colour)


def _draw(img, cls, box, colour):
    """Draw shape ``cls`` filling pixels [x0, x1) x [y0, y1) of ``box`` in place."""
    x0, y0, x1, y1 = box
    one = 1 << _SUBPIXEL_BITS  # cv2 fixed-point coordinates, for exact half-pixel centres
    if cls == 'circle':
        centre = ((x0 + x1 - 1) * one // 2, (y0 + y1 - 1) * one // 2)
        axes = ((x1 - x0 - 1) * one // 2, (y1 - y0 - 1) * one // 2)
        cv2.ellipse(img, centre, axes, 0, 0, 360, colour, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
    elif cls == 'ring':
        thickness = max(2, min(x1 - x0, y1 - y0) // 5)
        centre = ((x0 + x1 - 1) * one // 2, (y0 + y1 - 1) * one // 2)
        # cv2 draws thick outlines as rounded polylines: keep a pixel of margin
        axes = ((x1 - x0 - 2 - thickness) * one // 2, (y1 - y0 - 2 - thickness) * one // 2)
        cv2.ellipse(img, centre, axes, 0, 0, 360, colour, thickness, cv2.LINE_AA,
                    _SUBPIXEL_BITS)
    elif cls == 'square':
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), colour, -1)
    elif cls == 'cross':
        bar_w, bar_h = max(2, (x1 - x0) // 3), max(2, (y1 - y0) // 3)
        cx0 = x0 + (x1 - x0 - bar_w) // 2
        cy0 = y0 + (y1 - y0 - bar_h) // 2
        cv2.rectangle(img, (cx0, y0), (cx0 + bar_w - 1, y1 - 1), colour, -1)
        cv2.rectangle(img, (x0, cy0), (x1 - 1, cy0 + bar_h - 1), colour, -1)
    else:
        pts = np.array([[(x0 + x1 - 1) * one // 2, y0 * one], [x0 * one, (y1 - 1) * one],
                        [(x1 - 1) * one, (y1 - 1) * one]], np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, _SUBPIXEL_BITS)


def _covered_fraction(a, b):
    """Intersection of boxes a and b over the area of the smaller one."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def _sample_boxes(rng, spec):
    """Up to ``spec.max_objects`` boxes (x0, y0, x1, y1) that hardly overlap."""
    boxes = []
    wanted = rng.integers(1, spec.max_objects + 1)
    for _ in range(wanted * 10):
        if len(boxes) == wanted:
            break
        # log-uniform size so that every FPN level sees objects
        side = np.exp(rng.uniform(np.log(spec.min_object_size), np.log(spec.max_object_size)))
        aspect = np.exp(rng.uniform(-0.3, 0.3))
        w = int(np.clip(round(side * aspect), spec.min_object_size, spec.max_object_size))
        h = int(np.clip(round(side / aspect), spec.min_object_size, spec.max_object_size))
        x0 = int(rng.integers(0, spec.image_size - w + 1))
        y0 = int(rng.integers(0, spec.image_size - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if all(_covered_fraction(box, other) <= spec.max_covered for other in boxes):
            boxes.append(box)
    return boxes


def _silhouette(cls, box, size):
    """The pixels shape ``cls`` covers in ``box``, as drawn (anti-aliased edges at half
    coverage), bool (size, size)."""
    canvas = np.zeros((size, size), np.uint8)
    _draw(canvas, cls, box, 255)
    return canvas >= 128


def make_image(rng, spec):
    """One image (uint8 HxWx3, RGB) and its objects as (class index, (x0, y0, x1, y1),
    visible mask bool HxW)."""
    img = _background(rng, spec.image_size)
    objects = []
    for box in _sample_boxes(rng, spec):
        cls_idx = int(rng.integers(len(CLASSES)))
        x0, y0, x1, y1 = box
        colour = _contrasting_colour(rng, img[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        _draw(img, CLASSES[cls_idx], box, colour)
        mask = _silhouette(CLASSES[cls_idx], box, spec.image_size)
        for _, _, earlier in objects:  # the new shape hides what it covers
            earlier &= ~mask
        objects.append((cls_idx, box, mask))
    return img, objects


def _rle(mask):
    """COCO compressed RLE of a bool mask, with a JSON-ready ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']], counts=rle['counts'].decode('ascii'))


def write_split(out_dir, split, num_images, seed, spec=SyntheticSpec()):
    """Write ``num_images`` images and their COCO annotation file; return the json path."""
    spec.validate()
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, 'annotations')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, objects = make_image(rng, spec)
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(os.path.join(image_dir, file_name), img[..., ::-1])
        images.append(dict(id=image_id, file_name=file_name, width=spec.image_size,
                           height=spec.image_size))
        for cls_idx, (x0, y0, x1, y1), mask in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                    category_id=cls_idx + 1, bbox=[x0, y0, w, h],
                                    area=w * h, iscrowd=0, segmentation=_rle(mask)))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)])
    ann_file = os.path.join(ann_dir, f'{split}.json')
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return ann_file


def generate(out_dir, num_train=2000, num_val=200, seed=0, spec=SyntheticSpec()):
    """Write the ``train`` and ``val`` splits (independent seeds); return their json paths."""
    return (write_split(out_dir, 'train', num_train, seed, spec),
            write_split(out_dir, 'val', num_val, seed + 1_000_003, spec))
