"""Proxy Hessian pairs of the shapes world: the same images, other captions, another domain mix."""

from __future__ import annotations

import numpy as np
import pytest

from uqvlm.data.shapes import _CAPTIONS, _DRAWING_CAPTIONS, PAIR_STYLE_MIX, ShapesPairs
from uqvlm.data.shapes_proxy import PROXY_CAPTION_STYLES, PROXY_STYLE_MIX, ShapesProxyPairs


def _pretraining_captions(shape: str, color: str) -> set[str]:
    """Every caption a pretraining pair of this shape and colour can carry (all templates and sizes)."""
    out = set()
    for template in (*_CAPTIONS, *_DRAWING_CAPTIONS):
        for size in ("small", "large", ""):
            text = template.replace("{size} ", "" if not size else "{size} ")
            first = size or color
            out.add(text.format(a="an" if first[0] in "aeiou" else "a", size=size, color=color, shape=shape))
    return out


def test_images_are_the_shapes_pairs_and_captions_are_new_ones_of_the_same_shape():
    base = ShapesPairs(split="hessian", n=60, seed=3)
    proxy = ShapesProxyPairs(split="hessian", n=60, seed=3, style_mix=PAIR_STYLE_MIX)
    for i in range(len(base)):
        image, caption = proxy[i]
        assert np.array_equal(np.asarray(image), np.asarray(base[i][0]))
        shape, color, _ = base.item_info(i)
        assert base[i][1] in _pretraining_captions(shape, color)  # the enumeration is complete
        assert shape in caption and caption not in _pretraining_captions(shape, color)


def test_domain_mix_and_caption_styles_are_the_configured_ones():
    proxy = ShapesProxyPairs(n=3000, caption_styles=["tags"])
    styles = [proxy.item_info(i)[2] for i in range(len(proxy))]
    for style, p in PROXY_STYLE_MIX.items():
        frac = styles.count(style) / len(styles)
        assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / len(styles)), style
    for i in range(30):
        shape, color, _ = proxy.item_info(i)
        tags = {t.format(shape=shape, color=color) for t in PROXY_CAPTION_STYLES["tags"]}
        assert proxy.caption(i) in tags
    assert proxy.fingerprint() != ShapesProxyPairs(n=3000).fingerprint()
    assert ShapesProxyPairs(n=10).fingerprint() != ShapesPairs(split="hessian", n=10, seed=1).fingerprint()
    with pytest.raises(ValueError, match="unknown caption styles"):
        ShapesProxyPairs(caption_styles=["poetry"])


def test_registered_as_a_hessian_data_kind(compose):
    from uqvlm.data.registry import build_pair_dataset

    cfg = compose("hessian_data=shapes-proxy", "hessian_data.n=5")
    pairs = build_pair_dataset(cfg.hessian_data)
    assert isinstance(pairs, ShapesProxyPairs) and len(pairs) == 5
    assert pairs.caption_styles == list(PROXY_CAPTION_STYLES) and pairs.seed == 1
