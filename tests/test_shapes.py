"""The procedural shapes world: determinism, random access, held-out combinations, splits, domains."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from uqvlm.data.base import PairDataset, ZeroShotDataset
from uqvlm.data.shapes import (
    ALLOWED_COMBOS,
    COLORS,
    DOMAINS,
    HELD_OUT,
    SHAPES,
    ShapesPairs,
    ShapesZeroShot,
    list_domains,
)


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def test_vocabulary() -> None:
    assert len(SHAPES) >= 8 and len(COLORS) >= 8
    assert len(set(HELD_OUT)) == len(HELD_OUT) == 8
    assert {s for s, _ in HELD_OUT} == set(SHAPES)  # one held-out colour per shape
    assert set(ALLOWED_COMBOS).isdisjoint(HELD_OUT)
    assert len(ALLOWED_COMBOS) + len(HELD_OUT) == len(SHAPES) * len(COLORS)
    assert list_domains() == list(DOMAINS) and DOMAINS[0] == "photo"


def test_pairs_deterministic_and_seeded() -> None:
    a, b, c = ShapesPairs(n=20, seed=3), ShapesPairs(n=20, seed=3), ShapesPairs(n=20, seed=4)
    assert isinstance(a, PairDataset)
    for i in range(20):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ca == cb and np.array_equal(_px(ia), _px(ib))
    assert any(not np.array_equal(_px(a[i][0]), _px(c[i][0])) for i in range(20))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_random_access_is_order_independent() -> None:
    ds = ShapesZeroShot("noisy", "val", n=30, seed=1)
    forward = [_px(ds[i][0]) for i in range(30)]
    fresh = ShapesZeroShot("noisy", "val", n=30, seed=1)
    for i in reversed(range(30)):
        assert np.array_equal(_px(fresh[i][0]), forward[i])
    # Items do not depend on the dataset length either.
    longer = ShapesZeroShot("noisy", "val", n=100, seed=1)
    assert np.array_equal(_px(longer[7][0]), forward[7])
    with pytest.raises(IndexError):
        ds[30]


def test_held_out_combos_absent_from_pairs() -> None:
    held = set(HELD_OUT)
    for split in ("pretrain", "hessian"):
        ds = ShapesPairs(split, n=2_000, seed=0)
        seen = {ds.item_info(i)[:2] for i in range(len(ds))}
        assert seen.isdisjoint(held)
        assert len(seen) == len(ALLOWED_COMBOS)
        for i in range(200):  # captions never name a held-out combination
            caption = ds[i][1]
            assert not any(f"{c} {s}" in caption for s, c in held)


def test_zeroshot_covers_held_out_colours() -> None:
    ds = ShapesZeroShot("photo", "test", n=1_000)
    assert set(HELD_OUT) & {ds.item_info(i) for i in range(len(ds))}


def test_pair_splits_differ() -> None:
    pre, hes = ShapesPairs("pretrain", n=50), ShapesPairs("hessian", n=50)
    pre_px = {_px(pre[i][0]).tobytes() for i in range(50)}
    assert all(_px(hes[i][0]).tobytes() not in pre_px for i in range(50))
    assert pre.fingerprint() != hes.fingerprint()


def test_zeroshot_splits_disjoint() -> None:
    pixels = {
        split: {_px(ShapesZeroShot("photo", split, n=40)[i][0]).tobytes() for i in range(40)}
        for split in ShapesZeroShot.SPLITS
    }
    assert not pixels["train"] & pixels["val"]
    assert not pixels["train"] & pixels["test"]
    assert not pixels["val"] & pixels["test"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_domain_renders(domain: str) -> None:
    ds = ShapesZeroShot(domain, "test", n=16, image_size=32)
    assert isinstance(ds, ZeroShotDataset) and ds.name == f"shapes-{domain}"
    labels = []
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size == (32, 32)
        assert 0 <= label < len(ds.classnames)
        assert _px(img).std() > 5  # something is drawn
        labels.append(label)
    assert sorted(set(labels)) == list(range(len(SHAPES)))  # balanced classes
    big = ShapesZeroShot(domain, "test", n=2, image_size=64)
    assert big[0][0].size == (64, 64)


def test_domains_share_geometry_but_differ_in_style() -> None:
    photo = ShapesZeroShot("photo", "test", n=8)
    for domain in DOMAINS[1:]:
        other = ShapesZeroShot(domain, "test", n=8)
        assert [other.item_info(i) for i in range(8)] == [photo.item_info(i) for i in range(8)]
        assert not np.array_equal(_px(other[0][0]), _px(photo[0][0]))
        assert other.fingerprint() != photo.fingerprint()


def test_classnames_and_templates() -> None:
    ds = ShapesZeroShot("sketch", "train", n=8)
    assert ds.classnames == list(SHAPES)
    assert ds.templates and all("{c}" in t for t in ds.templates)
    prompts = ds.prompts()
    assert len(prompts) == len(SHAPES) and all(len(p) == len(ds.templates) for p in prompts)
    assert prompts[0][0] == ds.templates[0].format(c=SHAPES[0])
    with pytest.raises(ValueError):
        ShapesZeroShot("nope")
    with pytest.raises(ValueError):
        ShapesZeroShot("photo", "nope")


def test_pair_captions_name_the_shape() -> None:
    ds = ShapesPairs(n=200, seed=0)
    for i in range(len(ds)):
        shape, color, _ = ds.item_info(i)
        caption = ds[i][1]
        assert caption.endswith(shape) and caption.startswith(("a ", "an "))
        assert color in caption or f"a {shape}" in caption
        assert " a o" not in caption and " a a" not in caption  # articles agree
