import filecmp
import json
import os

import numpy as np
import pytest

from mmdet_bnplug.testing.synthetic import (
    CLASSES,
    SyntheticSpec,
    _background,
    make_image,
    write_split,
)


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    a = write_split(str(tmp_path / 'a'), 'train', 6, seed=7)
    b = write_split(str(tmp_path / 'b'), 'train', 6, seed=7)
    c = write_split(str(tmp_path / 'c'), 'train', 6, seed=8)
    assert open(a).read() == open(b).read()
    assert open(a).read() != open(c).read()
    for name in os.listdir(tmp_path / 'a' / 'train'):
        assert filecmp.cmp(tmp_path / 'a' / 'train' / name, tmp_path / 'b' / 'train' / name,
                           shallow=False)


def test_annotations_are_valid_coco(tmp_path):
    spec = SyntheticSpec(image_size=96, min_object_size=12, max_object_size=40)
    coco = json.load(open(write_split(str(tmp_path), 'val', 30, seed=1, spec=spec)))
    assert [c['name'] for c in coco['categories']] == list(CLASSES)
    assert len(coco['images']) == 30
    ids = {img['id'] for img in coco['images']}
    per_image = {i: 0 for i in ids}
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert ann['image_id'] in ids and ann['iscrowd'] == 0
        assert 12 <= w <= 40 and 12 <= h <= 40 and ann['area'] == w * h
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert 1 <= ann['category_id'] <= len(CLASSES)
        per_image[ann['image_id']] += 1
    assert min(per_image.values()) >= 1
    assert len({a['category_id'] for a in coco['annotations']}) == len(CLASSES)


def test_shapes_fill_their_boxes_and_nothing_else():
    spec = SyntheticSpec()
    for seed in range(40):
        img, objects = make_image(np.random.default_rng(seed), spec)
        background = _background(np.random.default_rng(seed), spec.image_size)
        changed = (img != background).any(-1)
        outside = np.ones_like(changed)
        for _, (x0, y0, x1, y1), _ in objects:
            # anti-aliased edges may touch one pixel beyond the box
            outside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
            assert changed[y0:y1, x0:x1].mean() > 0.4  # a triangle fills half its box
        assert img.dtype == np.uint8 and img.shape == (spec.image_size, spec.image_size, 3)
        assert not changed[outside].any()


@pytest.mark.parametrize('kwargs, name', [
    (dict(image_size=16), 'image_size'),
    (dict(min_object_size=50, max_object_size=40), 'min_object_size'),
    (dict(max_objects=0), 'max_objects'),
])
def test_bad_spec_is_refused(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        write_split(str(tmp_path), 'train', 1, seed=0, spec=SyntheticSpec(**kwargs))


def test_bad_image_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match='num_images'):
        write_split(str(tmp_path), 'train', 0, seed=0)


def test_masks_are_the_visible_silhouettes(tmp_path):
    """Each mask lies in its box, covers most of the pixels the shape changed, masks of
    one image are disjoint (later shapes hide earlier ones), and the RLE in the json
    decodes to it."""
    from pycocotools import mask as mask_utils
    spec = SyntheticSpec()
    for seed in range(20):
        img, objects = make_image(np.random.default_rng(seed), spec)
        background = _background(np.random.default_rng(seed), spec.image_size)
        changed = (np.abs(img.astype(int) - background).sum(-1) > 30)
        union = np.zeros(changed.shape, bool)
        for _, (x0, y0, x1, y1), mask in objects:
            assert mask.any() and not mask[:y0].any() and not mask[y1:].any()
            assert not mask[:, :x0].any() and not mask[:, x1:].any()
            assert changed[mask].mean() > 0.95  # a mask pixel is a shape pixel
            assert not (union & mask).any()
            union |= mask
    coco = json.load(open(write_split(str(tmp_path), 'train', 3, seed=5)))
    _, objects = make_image(np.random.default_rng(5), spec)  # the first image's objects
    first = [a for a in coco['annotations'] if a['image_id'] == 1]
    for ann, (_, _, mask) in zip(first, objects):
        decoded = mask_utils.decode(dict(ann['segmentation'],
                                         counts=ann['segmentation']['counts'].encode()))
        assert np.array_equal(decoded.astype(bool), mask)
